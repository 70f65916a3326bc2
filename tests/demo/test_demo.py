"""``python -m demo --fast`` end to end: convert, embedded broker, device daemon, MQTT training, summary."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.needs_tf
@pytest.mark.slow
def test_demo_fast_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--fast", "--no-progress", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log_tail = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    device_log = out / "device" / "device.log"
    if device_log.is_file():
        log_tail += f"\ndevice log:\n{device_log.read_text()[-4000:]}"
    assert proc.returncode == 0, log_tail

    summary_path = out / "demo-summary.json"
    assert summary_path.is_file(), log_tail
    assert str(summary_path) in proc.stdout, "the summary path must be printed"
    summary = json.loads(summary_path.read_text())
    keys = [
        "accuracy_before",
        "accuracy_after",
        "peak_rss_mib",
        "ram_ceiling_mib",
        "saved_activation_mib",
        "saved_activation_mib_vanilla",
    ]
    for key in keys:
        value = summary.get(key)
        assert isinstance(value, int | float) and math.isfinite(value), f"{key} = {value!r}"
    assert 0.0 <= summary["accuracy_before"] <= 1.0
    assert summary["accuracy_after"] >= summary["accuracy_before"], summary
    assert 0.0 < summary["peak_rss_mib"] <= summary["ram_ceiling_mib"], summary
    assert 0.0 < summary["saved_activation_mib"] < summary["saved_activation_mib_vanilla"], summary
    assert Path(summary["paths"]["report"]).is_file()
    assert summary["progress"], "no progress message reached the demo"
    # everything the demo started has stopped: no daemon or broker left in the demo's output directory
    leftover = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"processes left behind: {leftover.stdout}"
