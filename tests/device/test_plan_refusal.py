"""The planner's refusal names ``hosvd-convert fit`` with this device's ceiling and the device base to pass, so
that the converter's need (measured peak + device base + margin) equals the planner's need for the same bundle."""

from __future__ import annotations

import dataclasses
import re

import pytest

from device_app.plan import MIB, PlanError, choose_plan, data_buffer_bytes
from hosvd_contract import Manifest, MemoryPlanEntry


def test_refusal_names_fit_with_the_ceiling_and_the_device_base(imu_manifest: Manifest) -> None:
    batch = imu_manifest.default_batch_size
    # the converter measured 50 MiB loaded, 130 MiB after one step; this device's probe loads it at 52 MiB
    entries = [MemoryPlanEntry(batch, "whole", batch, 1, 130 * MIB, 50 * MIB),
               MemoryPlanEntry(batch, "streamed", 1, 1, 140 * MIB, 50 * MIB)]
    manifest = dataclasses.replace(imu_manifest, memory_plan=entries)
    data = data_buffer_bytes(manifest, batch, 500)
    common = dict(daemon_bytes=40 * MIB, child_base_bytes=52 * MIB, margin_mb=16, max_windows=500,
                  eval_bytes={"whole": 3 * MIB, "streamed": 2 * MIB})
    with pytest.raises(PlanError) as info:
        choose_plan(manifest, ceiling_mb=180, **common)
    message = str(info.value)
    need_whole = (40 + 52 + 3 + 80 + 16) * MIB + data  # the closest candidate: 191 MiB + data buffers
    assert f"batch {batch} whole: {need_whole / MIB:.1f} MiB" in message
    found = re.search(r"hosvd-convert fit MODEL --ram-ceiling-mb (\d+) --batch-size (\d+) --device-base-mb (\d+) "
                      r"--margin-mb (\d+) --calibration-data DATA --out BUNDLE", message)
    assert found, message
    ceiling, fit_batch, base_mb, margin = map(int, found.groups())
    assert (ceiling, fit_batch, margin) == (180, batch, 16)
    # daemon 40 + evaluation 3 + data + (52 - 50) probe vs converter base, rounded up to whole MiB
    expected_base = (40 + 3 + 2) * MIB + data
    assert base_mb == -(-expected_base // MIB)
    # fit's need for this bundle is then the planner's need (to the MiB rounding): it would refuse it too
    assert 0 <= (130 * MIB + base_mb * MIB + margin * MIB) - need_whole < MIB
    # one MiB more ceiling than that need and the same bundle is accepted
    plan = choose_plan(manifest, ceiling_mb=-(-need_whole // MIB), **common)
    assert (plan.mode, plan.need_bytes) == ("whole", need_whole)
