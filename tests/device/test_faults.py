"""Faults against real parts: SIGKILL while a checkpoint is written, the broker going away during training, a
RAM ceiling too small for any plan, a child that outgrows its limit."""

from __future__ import annotations

import sqlite3
import textwrap
from pathlib import Path

import pytest
from conftest import idle, wait_until

from device_app.jobs import ChildError, ChildRun, Job

SLOW_FSYNC_HOOK = '''
import os, time
_marker = os.environ.get("HOSVD_TEST_STALL_CKPT_MARKER")
if _marker:
    _fsync = os.fsync
    def _stalling_fsync(fd):
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if ".ckpt-000000020.npz." in name and name.endswith(".tmp"):
            with open(_marker, "w") as f:
                f.write(name)
            time.sleep(120)
        return _fsync(fd)
    os.fsync = _stalling_fsync
'''


def test_sigkill_while_writing_a_checkpoint_keeps_the_last_good_one(broker, client_factory, device_factory,
                                                                     tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(SLOW_FSYNC_HOOK))
    marker = tmp_path / "stalled"
    dev = device_factory(broker.port)
    dev.start(env={"PYTHONPATH": str(hook), "HOSVD_TEST_STALL_CKPT_MARKER": str(marker)})
    cl = client_factory(broker.port)
    cl.wait("status", idle, timeout=60)
    assert cl.request("train", {"steps": 40})["status"] == "ok"
    wait_until(lambda: marker.exists() and marker.read_text(), 60, "the checkpoint writer reaching step 20")
    dev.kill()  # SIGKILL to the daemon and its training child, mid-write

    ckpt_dir = next((dev.state_dir / "checkpoints").iterdir())
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert "ckpt-000000010.npz" in names and "ckpt-000000020.npz" not in names
    torn = [n for n in names if n.endswith(".tmp")]
    assert torn and Path(marker.read_text()).name == torn[0]

    dev.doc["sources"][0]["autostart"] = False
    dev.rewrite()
    dev.start()  # no hook this time
    cl2 = client_factory(broker.port)
    assert cl2.wait("status", idle, timeout=60)["global_step"] == 10
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    assert "a checkpoint whose writing was interrupted" in dev.log()
    evaluation = cl2.request("evaluate", {"split": "all"})
    assert evaluation["status"] == "ok" and evaluation["data"]["global_step"] == 10


def _outbox_size(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]


def test_broker_restart_during_training_still_delivers_the_report(broker, client_factory,
                                                                  device_factory) -> None:
    training = {"progress_every": 100, "checkpoint_every": 100000, "rollback_tolerance": 1.0}
    dev = device_factory(broker.port, training=training).start()
    cl = client_factory(broker.port)
    cl.wait("status", idle, timeout=60)
    # Calibrate: how long does a step take here? Then train for ~3 s so the broker is down when it ends.
    cl.request("train", {"transaction": "calib", "steps": 50})
    calib = cl.wait("report", lambda p: p.get("transaction") == "calib", timeout=120)
    per_step = max(calib["elapsed_s"], 1e-3) / 50
    steps = int(min(50000, max(200, 3.0 / per_step)))
    assert cl.request("train", {"transaction": "long", "steps": steps})["status"] == "ok"
    cl.wait("progress", lambda p: p.get("transaction") == "long", timeout=60)
    broker.stop()
    wait_until(lambda: _outbox_size(dev.db) == 1, 120, "the report reaching the outbox")
    assert dev.alive()
    broker.start()
    cl2 = client_factory(broker.port)
    report = cl2.wait("report", lambda p: p.get("transaction") == "long", timeout=60)
    assert report["status"] == "ok" and report["steps_done"] == steps
    assert report["global_step"] == 50 + steps
    wait_until(lambda: _outbox_size(dev.db) == 0, 30, "the outbox emptying after delivery")
    assert cl2.wait("status", idle)["global_step"] == 50 + steps
    assert "Sending 1 queued message(s) from the outbox" in dev.log()
    # the restarted broker forgot every subscription: answering proves the daemon subscribed again
    assert cl2.request("status")["data"]["global_step"] == 50 + steps


def test_too_small_ceiling_is_a_clear_refusal(broker, client_factory, device_factory) -> None:
    dev = device_factory(broker.port, training={"ram_ceiling_mb": 40}).start()
    cl = client_factory(broker.port)
    cl.wait("status", idle, timeout=60)
    answer = cl.request("train", {"steps": 5})
    assert answer["status"] == "error"
    assert "no training plan fits ram_ceiling_mb = 40" in answer["error"]
    assert "batch" in answer["error"] and "MiB" in answer["error"]
    assert dev.alive()
    status = cl.request("status")["data"]
    assert status["state"] == "idle" and status["global_step"] == 0 and status["job"] is None
    assert not cl.all("report")


def test_child_above_its_limit_is_stopped_before_the_oom_killer(imu_bundle: Path, tmp_path: Path) -> None:
    job = Job("probe", str(imu_bundle), str(tmp_path / "s.sqlite"), str(tmp_path / "ck"), threads=1)
    run = ChildRun(job, limit_bytes=8 << 20, poll_s=0.005)
    with pytest.raises(ChildError, match=r"above its limit of 8\.0 MiB"):
        run.run()
    assert not run.process.is_alive()
    assert run.process.exitcode == -9
