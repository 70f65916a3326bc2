"""A state directory that fills up (a small tmpfs the test mounts, the real daemon, real SQLite): a ``train`` still
yields a report, the status says the disk is full and where, collection pauses and resumes once space is back,
and nothing already stored is lost."""

from __future__ import annotations

import errno
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import idle

from device_app import checkpoint

SIZE_MB = 16


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs at ``tmp_path/disk``; skipped (with the reason) where this process may not mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m,mode=0755", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> Path:
    """Write a file until the file system has no byte left (ENOSPC at every size down to 1 byte); return it."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        size = 1 << 20
        while size:
            try:
                f.write(b"\0" * size)
            except OSError as err:
                assert err.errno == errno.ENOSPC
                size //= 2
    return filler


def _rows(db: Path) -> list[tuple[int, bytes]]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT id, x FROM samples ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []


def test_a_full_disk_loses_no_report_and_no_window(small_disk: Path, broker, client_factory, device_factory) -> None:
    state = small_disk / "state"
    replay = {"type": "csv", "name": "replay", "pacing": "realtime", "speed": 8.0}
    dev = device_factory(broker.port, windows_per_class=200, training={"checkpoint_every": 5, "steps": 10})
    dev.rewrite(device={"state_dir": str(state)}, model={"bundles_dir": str(dev.state_dir / "bundles")},
                sources=[{**replay, "path": dev.doc["sources"][0]["path"]}])
    dev.start()
    cl = client_factory(broker.port)
    deadline = time.monotonic() + 60
    while len(_rows(state / "store.sqlite")) < 10:
        assert time.monotonic() < deadline, "the replay did not store 10 windows"
        time.sleep(0.2)
    assert cl.request("train", {"transaction": "before"})["status"] == "ok"
    assert cl.wait("report", lambda p: p.get("transaction") == "before", timeout=120)["status"] == "ok"
    ckpt_dir = next((state / "checkpoints").iterdir())
    good = checkpoint.listing(ckpt_dir)

    filler = _fill(small_disk)
    status = cl.wait("status", lambda p: isinstance(p, dict) and p.get("state") == "error", timeout=30)
    assert "disk full" in status["error"] and str(state) in status["error"], status["error"]
    stored = _rows(state / "store.sqlite")

    # a train on the full disk: the report cannot be queued, so it is published directly
    assert cl.request("train", {"transaction": "full"})["status"] == "ok"
    report = cl.wait("report", lambda p: p.get("transaction") == "full", timeout=120)
    assert report["status"] == "error" and "disk full" in report["error"], report
    assert "work resumes from step" in report["error"]
    assert cl.request("status")["data"]["state"] == "error"
    log = dev.log()
    assert "could not queue the report in the outbox" in log and "publishing it directly" in log
    assert "collection paused" in log
    assert "cannot rollback" not in log  # SQLITE_FULL is reported as itself

    filler.unlink()  # space is back: collection resumes (backoff at most 30 s) and the status recovers
    cl.wait("status", lambda p: isinstance(p, dict) and p.get("state") in ("collecting", "idle")
            and p["samples"]["total"] > len(stored), timeout=90, start=len(cl.seen))
    assert "space is back; collection resumed" in dev.log()
    after = _rows(state / "store.sqlite")
    assert after[:len(stored)] == stored  # nothing stored before was lost or changed
    assert checkpoint.latest(ckpt_dir) is not None
    assert [s for s, _ in checkpoint.listing(ckpt_dir)][-len(good):] == [s for s, _ in good][-len(good):]
    assert cl.request("collect", {"action": "stop"})["status"] == "ok"
    assert cl.request("train", {"transaction": "after"})["status"] == "ok"
    assert cl.wait("report", lambda p: p.get("transaction") == "after", timeout=120)["status"] == "ok"
    cl.wait("status", idle, start=len(cl.seen))

