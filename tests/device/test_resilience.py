"""The daemon against its own history and neighbours (real Mosquitto, real daemon processes): retained requests
are never executed, one daemon per state directory, a CSV replay resumes instead of repeating, a killed training
child's report says where work resumes, a bundle changed on disk is noticed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
from conftest import REPO, idle, wait_until

from device_app.cli import main


def _restart(dev, cl) -> dict:
    """Stop and start the daemon; return its first idle status (messages of the old one all drained first)."""
    mark = len(cl.seen)
    dev.stop()
    cl.wait("status", lambda p: isinstance(p, dict) and p.get("state") == "offline", start=mark)
    mark = len(cl.seen)
    dev.start()
    return cl.wait("status", idle, timeout=60, start=mark)


def _checkpoints(state: Path) -> list[str]:
    return sorted(p.name for p in (state / "checkpoints").rglob("*") if p.is_file())


def _windows(db: Path) -> tuple[int, int]:
    """(stored windows, distinct window contents); (0, 0) before the daemon made its tables."""
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT COUNT(*), COUNT(DISTINCT x) FROM samples").fetchone()
    except sqlite3.OperationalError:
        return 0, 0


def test_retained_requests_are_never_executed(broker, client_factory, device_factory) -> None:
    dev = device_factory(broker.port, training={"checkpoint_every": 1000}).start()
    cl = client_factory(broker.port)
    cl.wait("status", idle, timeout=60)
    assert cl.request("train", {"transaction": "real", "steps": 10})["status"] == "ok"
    assert cl.wait("report", lambda p: p.get("transaction") == "real", timeout=120)["status"] == "ok"
    dev.stop()
    before = _checkpoints(dev.state_dir)
    assert before == ["ckpt-000000010.npz"]

    def publish_retained() -> None:
        cl.publish("request/rollback", {"transaction": "r-rollback"}, retain=True)
        cl.publish("request/train", {"transaction": "r-train", "steps": 5}, retain=True)

    def refused(transaction: str, start: int) -> str:
        answer = cl.wait(f"response/{transaction[2:]}", lambda p: p.get("transaction") == transaction,
                         timeout=60, start=start)
        assert answer["status"] == "error", answer
        assert "retained requests are never executed" in answer["error"]
        assert "publish it without retain" in answer["error"]
        return answer["error"]

    publish_retained()
    mark = len(cl.seen)
    dev.start()  # MQTT 5: refused, and the retained copies cleared
    assert "The retained copy was cleared." in refused("r-rollback", mark)
    refused("r-train", mark)
    cl.wait("status", idle, start=mark)
    fresh = client_factory(broker.port)
    fresh.wait("status")  # retained messages arrive on subscription, together
    for _ in range(20):
        fresh.all("status")
    assert not [t for t, _ in fresh.seen if "/request/" in t], fresh.seen  # nothing retained any more
    dev.stop()

    publish_retained()
    dev.rewrite(mqtt={"protocol": "3.1.1"})  # cannot clear safely without No Local: the copies stay
    for _restart in range(2):
        mark = len(cl.seen)
        dev.start()
        assert "mosquitto_pub -r -n -t 'hosvd-edge/dev1/request/rollback'" in refused("r-rollback", mark)
        refused("r-train", mark)
        cl.wait("status", idle, start=mark)
        dev.stop()
    assert _checkpoints(dev.state_dir) == before  # nothing rolled back, nothing trained
    assert not [p for p in cl.all("report") if p.get("transaction") == "r-train"]
    cl.publish("request/rollback", b"", retain=True)
    cl.publish("request/train", b"", retain=True)


def test_a_second_daemon_on_the_same_state_dir_exits_naming_the_first(broker, client_factory,
                                                                       device_factory) -> None:
    dev = device_factory(broker.port).start()
    cl = client_factory(broker.port)
    cl.wait("status", idle, timeout=60)
    started = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "device_app", "run", "--config", str(dev.config)], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - started
    # at once, not after waiting on the lock: 15 s leaves room for Python's start-up on emulated aarch64 (≈ 3 s)
    assert second.returncode != 0 and elapsed < 15.0, (second.returncode, elapsed, second.stderr)
    assert f"is in use by PID {dev.proc.pid} (hosvd-device run)" in second.stderr
    assert str(dev.state_dir) in second.stderr
    # a local training run would write the same checkpoints: refused the same way
    assert main(["train", "--config", str(dev.config), "--steps", "1"]) == 1
    assert cl.request("status")["status"] == "ok" and dev.alive()
    dev.kill()  # the kernel drops the lock with the process: a restart is not blocked by a stale file
    dev.start()
    assert client_factory(broker.port).wait("status", idle, timeout=60)["samples"]["total"] > 0


def test_csv_replay_resumes_across_sigkill_restart_and_reload(broker, client_factory, device_factory) -> None:
    replay = {"type": "csv", "name": "replay", "pacing": "realtime", "speed": 8.0}
    dev = device_factory(broker.port, windows_per_class=16)
    csv_dir = dev.doc["sources"][0]["path"]
    dev.rewrite(sources=[{**replay, "path": csv_dir}])
    dev.start()
    total = 3 * 16
    wait_until(lambda: _windows(dev.db)[0] >= 12, 60, "the replay storing 12 windows")
    dev.kill()  # mid-file: the resume point is whatever the last stored window reached
    partial = _windows(dev.db)
    assert partial[0] < total and partial[0] == partial[1]
    dev.rewrite(sources=[{**replay, "path": csv_dir, "pacing": "fast"}])
    dev.start()
    cl = client_factory(broker.port)
    cl.wait("status", lambda p: idle(p) and p["samples"]["total"] == total, timeout=60)
    assert _windows(dev.db) == (total, total)  # the rest of the files, nothing twice
    assert "resuming after row" in dev.log()
    for _ in range(2):
        assert _restart(dev, cl)["samples"]["total"] == total
    answer = cl.request("reload", {"bundle": "imu_hosvd"})
    assert answer["status"] == "ok", answer
    time.sleep(1.0)
    assert cl.request("status")["data"]["samples"]["total"] == total
    assert _windows(dev.db) == (total, total)
    # only an explicit replay stores the files again
    mark = len(cl.seen)
    assert cl.request("collect", {"action": "start", "replay": True})["status"] == "ok"
    cl.wait("status", lambda p: idle(p) and p["samples"]["total"] == 2 * total, timeout=60, start=mark)
    assert _windows(dev.db) == (2 * total, total)


def test_a_killed_training_child_reports_where_work_resumes(broker, client_factory, device_factory) -> None:
    training = {"checkpoint_every": 20, "progress_every": 5, "rollback_tolerance": 1.0}
    dev = device_factory(broker.port, training=training).start()
    cl = client_factory(broker.port)
    cl.wait("status", idle, timeout=60)
    assert cl.request("train", {"transaction": "k", "steps": 1_000_000})["status"] == "ok"
    wait_until(lambda: any(p.name.startswith("ckpt-") for p in (dev.state_dir / "checkpoints").rglob("*.npz")),
               120, "a checkpoint being written")
    cl.wait("progress", lambda p: p.get("transaction") == "k" and p["step"] >= 30, timeout=120)
    (child,) = [p for p in psutil.Process(dev.proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    os.kill(child.pid, signal.SIGKILL)
    report = cl.wait("report", lambda p: p.get("transaction") == "k", timeout=60)
    mark = len(cl.seen)
    newest = max(int(p.name[5:14]) for p in (dev.state_dir / "checkpoints").rglob("ckpt-*.npz"))
    assert report["status"] == "error" and report["global_step"] == newest and newest >= 20
    assert report["checkpoint"] == f"ckpt-{newest:09d}.npz"
    assert f"work resumes from step {newest} (ckpt-{newest:09d}.npz)" in report["error"]
    assert report["steps_done"] >= 30  # the last progress the daemon saw
    assert cl.wait("status", idle, start=mark)["global_step"] == newest


def test_a_bundle_modified_while_running_is_noticed(broker, client_factory, device_factory) -> None:
    dev = device_factory(broker.port).start()
    cl = client_factory(broker.port)
    cl.wait("status", idle, timeout=60)
    model = dev.state_dir / "bundles" / "imu_hosvd" / "model.tflite"
    original = model.read_bytes()
    model.write_bytes(original + b"\0")
    status = cl.wait("status", lambda p: isinstance(p, dict) and p.get("state") == "error", timeout=20)
    assert "bundle imu_hosvd changed on disk since it was loaded" in status["error"]
    for command, payload in (("train", {"steps": 5}), ("evaluate", {})):
        answer = cl.request(command, payload)
        assert answer["status"] == "error" and "changed on disk" in answer["error"], answer
    model.write_bytes(original)
    assert cl.request("reload", {"bundle": "imu_hosvd"})["status"] == "ok"
    cl.wait("status", lambda p: idle(p) and p["error"] is None, timeout=30)
