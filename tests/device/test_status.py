"""`hosvd-device status`: the daemon's state, store counts, training run and last report read from the state
directory of a real daemon, without MQTT, and without changing a byte there."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from device_app.cli import main
from device_app.snapshot import STATE_FILE, Snapshot
from tests.device.conftest import idle


def _status(config: Path, capsys) -> tuple[int, str, dict]:
    code = main(["status", "--config", str(config)])
    text = capsys.readouterr().out
    assert main(["status", "--config", str(config), "--json"]) == code
    return code, text, json.loads(capsys.readouterr().out)


def _view(config: Path, capsys) -> dict:
    main(["status", "--config", str(config), "--json"])
    return json.loads(capsys.readouterr().out)


def _wait_view(config: Path, capsys, pred, timeout: float = 60.0) -> dict:
    """Poll the JSON view (one call per look: the daemon may change state between two calls)."""
    deadline = time.monotonic() + timeout
    while True:
        view = _view(config, capsys)
        if pred(view) or time.monotonic() > deadline:
            return view
        time.sleep(0.1)


def _files(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_status_reads_a_running_and_a_stopped_daemon(broker, client_factory, device_factory, capsys) -> None:
    dev = device_factory(broker.port, training={"steps": 5000, "progress_every": 5})
    code, text, view = _status(dev.config, capsys)
    assert code == 3 and "dev1: no daemon has run with this state directory" in text
    assert view["store"]["error"] == "no store yet"

    dev.start()
    cl = client_factory(broker.port)
    published = cl.wait("status", idle, timeout=60)
    view = _wait_view(dev.config, capsys, lambda v: (v["status"] or {}).get("state") == "idle")
    code, text, view = _status(dev.config, capsys)
    assert code == 0 and view["running"] and view["pid"] == dev.proc.pid
    assert view["store"]["samples"] == published["samples"] and view["store"]["outbox"] == 0
    total = published["samples"]["total"]
    assert f"dev1: running (pid {dev.proc.pid}" in text and "state idle" in text
    assert f"{total} windows (train " in text and "last report: none yet" in text
    assert "bundle imu_hosvd (imu_cnn, sha256 " in text and "checkpoint: none" in text

    answer = cl.request("train", {"transaction": "glance"})
    assert answer["status"] == "ok", answer
    cl.wait("progress", lambda p: p.get("transaction") == "glance", timeout=60)
    view = _wait_view(dev.config, capsys, lambda v: v["progress"] is not None)
    assert view["job"]["transaction"] == "glance" and view["job"]["steps"] == 5000
    assert view["job"]["plan"] == answer["data"]["plan"]
    assert view["progress"]["step"] >= 1 and view["progress"]["total"] == 5000
    text = _status(dev.config, capsys)[1]
    assert "training (transaction 'glance', started " in text and "/5000, loss " in text
    assert f"plan: batch {answer['data']['plan']['batch_size']} " in text

    assert cl.request("stop")["status"] == "ok"
    report = cl.wait("report", lambda p: p.get("transaction") == "glance", timeout=60)
    view = _wait_view(dev.config, capsys, lambda v: v["report"] is not None and v["job"] is None)
    assert view["report"] == report and view["progress"] is None
    assert view["checkpoint"]["step"] == report["global_step"]
    text = _status(dev.config, capsys)[1]
    assert "last report (transaction 'glance', finished " in text
    assert f"stopped, {report['steps_done']} steps, loss {report['first_loss']:.4f} -> " in text
    assert f"checkpoint: {report['checkpoint']} (step {report['global_step']}" in text

    assert dev.stop() == 0
    before = _files(dev.state_dir)
    code, text, view = _status(dev.config, capsys)
    assert code == 3 and not view["running"] and "dev1: not running (last seen " in text
    assert "state offline" in text and view["report"] == report
    assert _files(dev.state_dir) == before, "status changed the state directory"

    dev.doc["sources"][0]["autostart"] = False
    dev.rewrite()
    dev.start()
    view = _wait_view(dev.config, capsys, lambda v: v["running"] and (v["status"] or {}).get("state") == "idle")
    assert view["report"] == report, "the last report is kept across restarts"


def test_snapshot_survives_a_state_dir_it_cannot_write(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="device_app.snapshot"):
        snap = Snapshot(tmp_path / "gone")  # the directory does not exist: every write fails
        snap.update(status={"state": "idle"})
        snap.update(status={"state": "training"})
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and f"cannot write {tmp_path / 'gone' / STATE_FILE}" in warnings[0]
    assert not list(tmp_path.iterdir())
