"""The demo's ceiling: read from the device planner's own refusal, then set between what hosvd and vanilla at full
depth need on that device (``demo.ceiling``)."""

from __future__ import annotations

import pytest

from converter.fit import Candidate
from demo.ceiling import DeviceBase, FullDepth, ceiling_between, device_base, need_mib
from device_app.plan import MIB, fit_command


def candidate(method: str, peak_mib: float) -> Candidate:
    return Candidate(method, 6, "streamed", 1, int(peak_mib * MIB), 0, 0, False, 0.0)


def full_depth(hosvd_peak_mib: float, vanilla_peak_mib: float) -> FullDepth:
    hosvd, vanilla = candidate("hosvd", hosvd_peak_mib), candidate("none", vanilla_peak_mib)
    return FullDepth(hosvd, vanilla, "x-none-last6", None, {})  # type: ignore[arg-type]


def test_the_base_is_what_the_planners_fit_command_names() -> None:
    # the planner rounds the device base up to whole MiB: 70.2 MiB -> 71
    refusal = ("no training plan fits ram_ceiling_mb = 1: daemon 40.9 MiB + ... Raise [training] ram_ceiling_mb, or "
               "let the converter pick the deepest fine-tuning that fits this device: "
               + fit_command(1, 64, int(70.2 * MIB), 16))
    base = device_base(refusal)
    assert (base.base_mb, base.margin_mb, base.message) == (71.0, 16.0, refusal)


def test_a_refusal_for_another_reason_is_an_error_that_quotes_it() -> None:
    with pytest.raises(ValueError, match=r"names no hosvd-convert fit command.*busy: a train job runs"):
        device_base("busy: a train job runs")


def test_the_ceiling_lies_midway_between_the_two_needs_on_this_device() -> None:
    base = DeviceBase(71.0, 16.0, "")
    full = full_depth(105.3, 116.0)
    assert need_mib(full.hosvd, base) == pytest.approx(192.3)
    assert need_mib(full.vanilla, base) == pytest.approx(203.0)
    ceiling = ceiling_between(full, base)
    assert ceiling == 197  # int(197.65): hosvd fits with 4.7 MiB to spare, vanilla is 6.0 MiB over
    assert need_mib(full.hosvd, base) <= ceiling < need_mib(full.vanilla, base)


def test_no_ceiling_when_compression_saves_too_little_at_full_depth() -> None:
    with pytest.raises(ValueError, match=r"hosvd needs 190\.0 MiB and vanilla 193\.0 MiB .*less than 4 MiB apart"):
        ceiling_between(full_depth(103.0, 106.0), DeviceBase(71.0, 16.0, ""))
