"""The training child's memory does not grow with the store: an image bundle (64×64×3 float32, 48 KiB a window)
trained with 100, 1,000 and 10,000 stored windows peaks within 5 % and below the plan's need, and a ceiling the
100-window run fits is one the 10,000-window run completes under. Real SQLite file, real interpreter, the real
training child started by :func:`device_app.jobs.start_training`."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from device_app.config import Config, parse_config
from device_app.jobs import probe_bundle, start_training
from device_app.store import Store

STEPS = 5
SIZES = (100, 1000, 10_000)
FILL = """
import json, sqlite3, sys
import numpy as np
from device_app.store import Store

db, start, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
Store(db).close()  # the schema
conn = sqlite3.connect(db, isolation_level=None)
conn.execute("PRAGMA journal_mode=DELETE")  # written once, not WAL then checkpoint: 3x faster for 480 MB
conn.execute("PRAGMA synchronous=OFF")
rng = np.random.default_rng(start)
labels, shape = ["idle", "walk", "shake"], json.dumps([64, 64, 3])
for first in range(start, stop, 250):
    xs = rng.random((min(250, stop - first), 64, 64, 3), dtype=np.float32)
    rows = [(0.0, "fill", labels[i % 3], "val" if i % 50 == 0 else "train", shape, x.tobytes())
            for i, x in enumerate(xs, start=first)]
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO samples (created, source, label, split, shape, x) VALUES (?, ?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")
conn.execute("PRAGMA journal_mode=WAL")  # as the daemon keeps it
conn.close()
"""


def _config(root: Path, bundles: Path, ceiling_mb: int = 0) -> Config:
    return parse_config({
        "device": {"id": "scale", "state_dir": str(root / "state")},
        "model": {"bundle": "image_hosvd", "bundles_dir": str(bundles), "threads": 1},
        "store": {"max_samples": 20000, "val_fraction": 0.02},
        "training": {"steps": STEPS, "checkpoint_every": 1000, "progress_every": 1, "ram_ceiling_mb": ceiling_mb,
                     "rollback_tolerance": 1.0},
    }, root / "device.toml")


def _fill(db: Path, start: int, stop: int) -> None:
    """Add windows ``start..stop`` (2 % in ``val``) in another process, so this one (the plan's "daemon") stays the
    same size."""
    subprocess.run([sys.executable, "-c", FILL, str(db), str(start), str(stop)], check=True,
                   cwd=Path(__file__).resolve().parents[2])


def test_peak_rss_does_not_depend_on_how_many_windows_are_stored(tmp_path: Path, bundles_dir: Path) -> None:
    cfg = _config(tmp_path, bundles_dir)
    cfg.state_dir.mkdir(parents=True)
    probe = probe_bundle(cfg, bundles_dir / "image_hosvd")
    reports = {}
    stored = 0
    for n in SIZES:
        _fill(cfg.db_path, stored, n)
        stored = n
        reports[n] = start_training(cfg, probe=probe).wait(300)
    store = Store(cfg.db_path)
    assert store.counts()["total"] == SIZES[-1]
    store.close()
    for n, report in reports.items():
        assert report["status"] == "ok" and report["steps_done"] == STEPS, (n, report.get("error"))
        assert report["n_train"] + report["n_val"] == n and report["from_features"]
        plan = report["plan"]
        # the caller's RSS plus the child's measured peak stays below what the plan said it would need
        assert plan["daemon_mb"] + report["peak_rss_mb"] < plan["need_mb"], (n, report["peak_rss_mb"], plan)
    peaks = [reports[n]["peak_rss_mb"] for n in SIZES]
    assert max(peaks) <= 1.05 * min(peaks), peaks

    # with 10,000 stored: a ceiling the 100-window run fits (its need rounded up to the MiB, plus 1 MiB for this
    # process's own noise) is one the run completes under, the watcher never stopping the child
    ceiling = math.ceil(reports[100]["plan"]["need_mb"]) + 1
    tight = _config(tmp_path, bundles_dir, ceiling_mb=ceiling)
    report = start_training(tight, probe=probe).wait(300)
    assert report["status"] == "ok", report.get("error")
    assert report["watched_peak_rss_mb"] <= ceiling - report["plan"]["daemon_mb"]

