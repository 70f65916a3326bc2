"""The ``digits-wide`` demo's RAM ceiling: measured on this device, then searched by ``fit`` under it.

What a device holds besides the training step (daemon, evaluation arena, data buffers, and how far its
bundle-loaded RSS is from the converter's) differs between machines by more than compression saves on the
demo's small model: the device's need for the vanilla bundle at full depth was 196.0 MiB on one machine and
209.8 MiB on another, while hosvd saves about 11 MiB there. No fixed ceiling tells the same story on both, so the
demo does what the user of a new device does (``docs/demo.md``):

1. convert both methods at full depth and measure their peaks (:func:`measure_full_depth`);
2. start the device with the vanilla bundle under a ceiling nothing fits: its refusal names this device's
   ``--device-base-mb`` and ``--margin-mb`` (:func:`device_base`);
3. set the ceiling midway between what the two bundles need on this device (:func:`ceiling_between`);
4. run ``fit`` for each method under it, reusing the full-depth candidates (:func:`fit_bundles`).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MIB = float(1 << 20)
PROBE_CEILING_MB = 1  # nothing fits, so the planner's refusal names what this device holds besides the step
MIN_GAP_MB = 4.0  # what hosvd must save at full depth on this device for a ceiling between the two to be told apart
EPSILON = 0.8
_FIT_FLAGS = re.compile(r"--device-base-mb (\d+(?:\.\d+)?) --margin-mb (\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class DeviceBase:
    """What the device's planner adds to the converter's measured peak, from its refusal (MiB)."""

    base_mb: float
    margin_mb: float
    message: str


@dataclass(frozen=True)
class FullDepth:
    """Both methods converted and measured with every layer trained.

    Attributes:
        hosvd, vanilla: their ``converter.fit.Candidate`` (judged against no ceiling yet).
        vanilla_bundle: name of the vanilla bundle, in the bundles directory (the device starts with it).
        candidates_dir: where the hosvd bundle and every later ``fit`` candidate are converted.
        known: ``fit(known=...)``: the candidates measured so far, by ``(method, train_last)``.
    """

    hosvd: Any
    vanilla: Any
    vanilla_bundle: str
    candidates_dir: Path
    known: dict[tuple[str, int], Any]

    @property
    def depth(self) -> int:
        return int(self.hosvd.train_last)


@dataclass(frozen=True)
class CeilingFit:
    """What ``fit`` found under the demo's ceiling, and the vanilla bundle the device is to refuse.

    Attributes:
        ceiling_mb: the ceiling, chosen by :func:`ceiling_between`.
        base: what the device named as its base.
        full: the full-depth measurements it was chosen from.
        hosvd, vanilla: the searches (``converter.fit.FitResult``) for ``hosvd`` and ``none``.
        refused_bundle: name of the vanilla bundle one layer deeper than vanilla fits (or at hosvd's depth when
            hosvd trains deeper), in the bundles directory.
        refused: its measured candidate (``converter.fit.Candidate``), judged against the ceiling.
    """

    ceiling_mb: int
    base: DeviceBase
    full: FullDepth
    hosvd: Any
    vanilla: Any
    refused_bundle: str
    refused: Any


def measure_full_depth(model: Any, options: dict[str, Any], batch_size: int, bundles_dir: Path,
                       name: str) -> FullDepth:
    """Convert and measure ``hosvd`` and ``none`` training every layer (``options``: the demo's converter options).

    The vanilla bundle goes into ``bundles_dir`` as ``<name>-none-last<depth>``, the hosvd one into the fit
    candidates' directory next to it.
    """
    from converter.fit import max_train_last, measure_candidate

    depth = max_train_last(model)
    work = bundles_dir.parent / "fit-candidates"
    shutil.rmtree(work, ignore_errors=True)
    vanilla_bundle = f"{name}-none-last{depth}"
    shutil.rmtree(bundles_dir / vanilla_bundle, ignore_errors=True)
    kwargs = dict(options, batch_sizes=[batch_size], epsilon=EPSILON)
    hosvd = measure_candidate(model, work / f"hosvd-{depth}", "hosvd", depth, 0, 0, **kwargs)
    vanilla = measure_candidate(model, bundles_dir / vanilla_bundle, "none", depth, 0, 0, **kwargs)
    return FullDepth(hosvd, vanilla, vanilla_bundle, work, {("hosvd", depth): hosvd, ("none", depth): vanilla})


def device_base(refusal: str) -> DeviceBase:
    """Read ``--device-base-mb`` and ``--margin-mb`` from the ``fit`` command the planner's refusal names.

    Raises:
        ValueError: the message names no such command (the device refused for another reason).
    """
    match = _FIT_FLAGS.search(refusal)
    if match is None:
        raise ValueError(f"the device's refusal names no hosvd-convert fit command with --device-base-mb: {refusal}")
    return DeviceBase(float(match.group(1)), float(match.group(2)), refusal)


def extra_bytes(base: DeviceBase) -> int:
    """What ``fit`` adds to a measured peak for this device: its base and margin, as ``fit`` rounds them."""
    from converter.fit import MIB as FIT_MIB

    return int((base.base_mb + base.margin_mb) * FIT_MIB)


def need_mib(candidate: Any, base: DeviceBase) -> float:
    """What ``candidate`` needs on the device: ``fit``'s arithmetic with the device's own base and margin."""
    return candidate.judged(extra_bytes(base), 0).need_mib


def ceiling_between(full: FullDepth, base: DeviceBase) -> int:
    """The ceiling midway between what hosvd and vanilla at full depth need on this device (whole MiB).

    Raises:
        ValueError: hosvd saves less than ``MIN_GAP_MB`` there, so no ceiling separates the two reliably.
    """
    low, high = need_mib(full.hosvd, base), need_mib(full.vanilla, base)
    if high - low < MIN_GAP_MB:
        raise ValueError(f"at full depth hosvd needs {low:.1f} MiB and vanilla {high:.1f} MiB on this device: "
                         f"less than {MIN_GAP_MB:g} MiB apart, no ceiling separates them")
    return int((low + high) / 2)


def fit_bundles(model: Any, options: dict[str, Any], batch_size: int, bundles_dir: Path, name: str,
                full: FullDepth, base: DeviceBase) -> CeilingFit:
    """Choose the ceiling, run ``fit`` for ``hosvd`` and for ``none`` under it, and keep the vanilla bundle that
    does not fit in ``bundles_dir``.

    Raises:
        ValueError: no ceiling separates the methods at full depth, or it does not bind (vanilla trains every
            layer), so there is nothing to refuse.
    """
    from converter.fit import MIB as FIT_MIB
    from converter.fit import fit, measure_candidate

    ceiling_mb = ceiling_between(full, base)
    common: dict[str, Any] = dict(
        ram_ceiling_mb=ceiling_mb,
        batch_size=batch_size,
        epsilon=EPSILON,
        device_base_mb=base.base_mb,
        margin_mb=base.margin_mb,
        candidates_dir=full.candidates_dir,
        known=full.known,
        on_candidate=log_candidate,
        **options,
    )
    hosvd = fit(model, bundles_dir / f"{name}-hosvd", method="hosvd", **common)
    vanilla = fit(model, full.candidates_dir / "none-chosen", method="none", **common)
    depth = max(hosvd.chosen.train_last, vanilla.chosen.train_last + 1)
    if depth > vanilla.max_train_last:
        raise ValueError(f"ram_ceiling_mb {ceiling_mb} does not bind: vanilla trains every layer")
    target = f"{name}-none-last{depth}"
    refused = full.known.get(("none", depth))
    if depth != full.depth:  # a shallower refused bundle: the vanilla search's, or converted now
        shutil.rmtree(bundles_dir / target, ignore_errors=True)
        if refused is None:
            refused = measure_candidate(model, bundles_dir / target, "none", depth, 0, 0,
                                        batch_sizes=[batch_size], epsilon=EPSILON, **options)
        else:
            shutil.move(str(full.candidates_dir / f"none-{depth}"), bundles_dir / target)
    refused = refused.judged(extra_bytes(base), ceiling_mb * FIT_MIB)
    shutil.rmtree(full.candidates_dir, ignore_errors=True)
    return CeilingFit(ceiling_mb, base, full, hosvd, vanilla, target, refused)


def log_candidate(candidate: Any) -> None:
    log.info("fit %s: last %d layers need %.1f MiB (%s)", candidate.method, candidate.train_last,
             candidate.need_mib, "fits" if candidate.fits else "too big")


def ceiling_summary(ceiling: CeilingFit, refusal: str | None, peak_mib: float | None,
                    daemon_mib: Any) -> dict[str, Any]:
    """The summary's ``ceiling`` part: how the ceiling was chosen, what each method could train under it, what
    vanilla needed, what hosvd used on the device."""

    def searched(result: Any) -> dict[str, Any]:
        c = result.chosen
        return {"train_last": c.train_last, "need_mib": round(c.need_mib, 1), "measured_peak_mib": round(c.peak_mib, 1),
                "saved_allocated_mib": round(c.saved_bytes_allocated / MIB, 2),
                "candidates": [(x.train_last, round(x.need_mib, 1), x.fits) for x in result.candidates]}

    hosvd_used = None if peak_mib is None or daemon_mib is None else round(peak_mib + float(daemon_mib), 1)
    full = ceiling.full
    return {
        "ram_ceiling_mb": ceiling.ceiling_mb,
        "device_base_mb": ceiling.base.base_mb,
        "margin_mb": ceiling.base.margin_mb,
        "device_base_message": ceiling.base.message,
        "full_depth_need_mib": {"hosvd": round(need_mib(full.hosvd, ceiling.base), 1),
                                "vanilla": round(need_mib(full.vanilla, ceiling.base), 1)},
        "max_train_last": ceiling.hosvd.max_train_last,
        "hosvd": searched(ceiling.hosvd),
        "vanilla": searched(ceiling.vanilla),
        "vanilla_refused": {"bundle": ceiling.refused_bundle, "train_last": ceiling.refused.train_last,
                            "need_mib": round(ceiling.refused.need_mib, 1),
                            "measured_peak_mib": round(ceiling.refused.peak_mib, 1), "device_message": refusal},
        "hosvd_used_mib": hosvd_used,
        "fit_seconds": round(ceiling.hosvd.seconds + ceiling.vanilla.seconds, 1),
    }
