"""``python -m demo --fast`` end to end: fit under the RAM ceiling, embedded broker, device daemon refusing the deeper
vanilla bundle, MQTT training of the fitted hosvd bundle inside the ceiling, summary."""

from __future__ import annotations

import json
import math
import re
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
    # on-device training of the fitted bundle helps the new user (measured: 22.3 % -> 90.2 %, 539 samples)
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.2, summary
    assert 0.0 < summary["saved_activation_mib"] < summary["saved_activation_mib_vanilla"], summary

    ceiling = summary["ceiling"]
    limit = summary["ram_ceiling_mib"]
    # the ceiling was set on this device, midway between what hosvd and vanilla training every layer need there,
    # from the base its planner named when it refused the vanilla bundle under a ceiling nothing fits
    assert ceiling["ram_ceiling_mb"] == limit
    full = ceiling["full_depth_need_mib"]
    assert full["hosvd"] < limit < full["vanilla"] and full["vanilla"] - full["hosvd"] >= 4, ceiling
    assert limit - 0.1 <= (full["hosvd"] + full["vanilla"]) / 2 < limit + 1.1, ceiling
    probe = ceiling["device_base_message"]
    assert probe.startswith("no training plan fits ram_ceiling_mb = 1: daemon "), probe
    assert f"--device-base-mb {ceiling['device_base_mb']:g} --margin-mb {ceiling['margin_mb']:g} " in probe, probe
    # fit, both sides of the chosen depth: hosvd's need fits, one layer deeper does not or there is none deeper
    # (measured candidates)
    hosvd, vanilla = ceiling["hosvd"], ceiling["vanilla"]
    needs = {depth: (need, fits) for depth, need, fits in hosvd["candidates"]}
    assert needs[hosvd["train_last"]][0] <= limit, hosvd
    if hosvd["train_last"] < ceiling["max_train_last"]:
        assert needs[hosvd["train_last"] + 1][0] > limit, hosvd
    # the ceiling binds and favours compression: hosvd trains more layers than vanilla can (measured: 6 and 3)
    assert hosvd["train_last"] > vanilla["train_last"], ceiling
    vanilla_needs = {depth: need for depth, need, _ in vanilla["candidates"]}
    assert vanilla_needs[vanilla["train_last"]] <= limit < vanilla_needs[vanilla["train_last"] + 1], vanilla
    assert summary["train_last"] == hosvd["train_last"]
    manifest = json.loads((Path(summary["paths"]["bundle"]) / "manifest.json").read_text())
    assert manifest["fit"]["train_last"] == manifest["train_last"] == hosvd["train_last"]
    # the vanilla bundle at hosvd's depth is refused by the device's planner, which names fit
    refused = ceiling["vanilla_refused"]
    assert refused["train_last"] == hosvd["train_last"]
    assert refused["need_mib"] > limit
    message = refused["device_message"]
    assert message.startswith(f"no training plan fits ram_ceiling_mb = {limit:g}: daemon "), message
    assert f"hosvd-convert fit MODEL --ram-ceiling-mb {limit:g} --batch-size 64 --device-base-mb " in message, message
    # the device's planner and fit agree on the refused bundle's need (to the base's rounding up to whole MiB)
    planned = float(re.search(r"batch 64 streamed \(micro-batch 1\): ([\d.]+) MiB", message).group(1))
    assert abs(planned - refused["need_mib"]) <= 2, (planned, refused)
    # the fitted hosvd bundle was accepted and trained inside the same ceiling, daemon included
    report = summary["device_report"]
    assert report["status"] == "ok" and report["ram_ceiling_mb"] == limit, report
    assert report["plan"]["need_mb"] <= limit, report["plan"]
    assert 0.0 < summary["peak_rss_mib"] <= summary["peak_rss_mib"] + summary["daemon_rss_mib"] <= limit, summary
    assert ceiling["hosvd_used_mib"] == round(summary["peak_rss_mib"] + summary["daemon_rss_mib"], 1) <= limit
    assert Path(summary["paths"]["report"]).is_file()
    assert summary["progress"], "no progress message reached the demo"
    # everything the demo started has stopped: no daemon or broker left in the demo's output directory
    leftover = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"processes left behind: {leftover.stdout}"
