"""``fit()``: the deepest fine-tuning of a model whose measured training step fits a device's RAM ceiling.

The search is over the number of trainable weighted layers counted from the end (``train_last``), per method.
Every candidate is a real bundle written by :func:`converter.convert.convert` and measured on ai-edge-litert in a
fresh process by the device's own step runner (:mod:`converter.measure` → ``python -m device_app.measure``). A
candidate needs, as the device's planner (``device_app/plan.py``) counts it::

    need = measured peak RSS of the training child (bundle loaded + one step) + device base + safety margin

where the device base is what the device holds besides that child's step (the daemon's RSS, the evaluation
arena, the data buffers; the planner's refusal message prints it) and the margin covers what varies between
runs. The peak grows with depth, so the search (:func:`deepest_fitting`) doubles the depth from 1 while it fits,
then bisects between the deepest that fits and the shallowest that does not: at most ``2 + 2·log2(depths)``
conversions per method instead of one per depth. Deep candidates are the slow ones (MobileNetV2 224² hosvd: 11 s
at depth 1, 186 s at 32), so a doubling never goes further than one past where the last two fitting candidates'
slope says the ceiling is crossed. The chosen
bundle is the deepest that fits; the search (every measured candidate) is recorded in its manifest's ``fit``
field (``docs/bundle.md``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from converter.compression import Method, parse_method
from converter.compression.factored import tucker_elements
from converter.convert import SOURCE_MODEL, convert, load_model
from converter.engine import saved_shape
from converter.errors import ConversionError
from converter.graph import parse_model, split
from converter.layers import WEIGHTED_TYPES
from hosvd_contract import MANIFEST_FILE, MODEL_FILE, Manifest, load_manifest

log = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_MARGIN_MB = 16.0  # the device's default [training] safety_margin_mb
# What a device holds besides the training child's step: the demo's daemon at rest (41 MiB measured, see
# docs/demo.md), its evaluation arena and data buffers (a few MiB for small models), rounded up.
DEFAULT_DEVICE_BASE_MB = 48.0
AUTO_METHODS = (Method.NONE, Method.HOSVD, Method.ASI)  # ties go to the first: ``none`` computes exact gradients


class FitError(ConversionError):
    """Nothing fits the ceiling (the message names what the smallest candidate needed)."""


@dataclass(frozen=True)
class Candidate:
    """One measured bundle of the search (bytes)."""

    method: str
    train_last: int
    mode: str  # the memory-plan entry with the lowest measured peak (``whole`` or ``streamed``)
    micro_batch: int
    peak_rss_bytes: int  # the fresh child's measured peak: bundle loaded + one train step
    need_bytes: int  # peak + device base + margin
    saved_bytes_allocated: int  # saved activations at the static (allocated) ranks, the paper's metric
    fits: bool
    seconds: float

    @property
    def peak_mib(self) -> float:
        return self.peak_rss_bytes / MIB

    @property
    def need_mib(self) -> float:
        return self.need_bytes / MIB

    def judged(self, extra_bytes: int, ceiling_bytes: int) -> Candidate:
        """This measured peak judged again: need = peak + ``extra_bytes`` (device base + margin) against
        ``ceiling_bytes``."""
        need = self.peak_rss_bytes + extra_bytes
        return dataclasses.replace(self, need_bytes=need, fits=need <= ceiling_bytes)


@dataclass(frozen=True)
class FitResult:
    """The search: every candidate measured, and the chosen one (its bundle is ``out_dir``)."""

    chosen: Candidate
    candidates: list[Candidate]
    deepest: dict[str, int]  # method -> deepest fitting train_last (0: nothing fits)
    max_train_last: int
    ceiling_mb: float
    device_base_mb: float
    margin_mb: float
    batch_size: int
    seconds: float
    manifest: Manifest

    def record(self) -> dict[str, Any]:
        """The manifest's ``fit`` field."""
        return {
            "ram_ceiling_mb": self.ceiling_mb, "device_base_mb": self.device_base_mb, "margin_mb": self.margin_mb,
            "batch_size": self.batch_size, "method": self.chosen.method, "train_last": self.chosen.train_last,
            "max_train_last": self.max_train_last, "deepest": dict(self.deepest),
            "seconds": round(self.seconds, 1),
            "candidates": [dataclasses.asdict(c) | {"seconds": round(c.seconds, 1)} for c in self.candidates],
        }


def max_train_last(model: keras.Model) -> int:
    """The deepest ``train_last`` the converter accepts for this model (an unsupported layer caps it)."""
    weighted = sum(1 for n in parse_model(model).nodes if n.keras_type in WEIGHTED_TYPES)
    deepest = 0
    for depth in range(1, weighted + 1):
        try:
            split(parse_model(model), depth)  # a fresh parse each time: split marks nodes trainable in place
        except ConversionError:
            break
        deepest = depth
    return deepest


def allocated_saved_bytes(model: keras.Model, manifest: Manifest) -> int:
    """Saved activations of the bundle's trainable layers at their static ranks (float32, the paper's metric):
    what the bundle allocates, where the manifest's ``saved_bytes_compressed`` counts the ε-ranks met on the
    calibration data."""
    graph = parse_model(model)
    sp = split(graph, manifest.train_last)
    batch = manifest.default_batch_size
    nodes = {n.name: n for n in sp.trainable}
    total = 0
    for info in manifest.layers:
        if not info.trainable:
            continue
        if info.compression in (None, "none") or not info.ranks:
            total += info.saved_bytes_vanilla
            continue
        shape = saved_shape(nodes[info.name], batch)
        modes = (0,) if info.compression == Method.SVD else range(len(shape))
        ranks = tuple(r if m in modes and r < shape[m] else None for m, r in enumerate(info.ranks))
        total += 4 * tucker_elements(shape, ranks)
    return total


def _lowest_entry(manifest: Manifest) -> Any:
    measured = [e for e in manifest.memory_plan if e.measured_peak_rss_bytes is not None]
    if not measured:
        raise ConversionError("the bundle's memory plan has no measured entry; fit needs the measurement")
    return min(measured, key=lambda e: e.measured_peak_rss_bytes)


def measure_candidate(model: keras.Model, bundle_dir: Path, method: str, train_last: int, ceiling_bytes: int,
                      extra_bytes: int, **convert_kwargs: Any) -> Candidate:
    """Convert one candidate into ``bundle_dir``, measure it, and judge it against the ceiling.

    Args:
        extra_bytes: device base + margin, added to the measured peak.
        convert_kwargs: :func:`converter.convert.convert` options (``batch_sizes``, ``calibration_data``, ...).
    """
    started = time.perf_counter()
    # Candidates of each method are measured on their own (auto compares none itself): no second conversion.
    manifest = convert(model, bundle_dir, train_last=train_last, compression=method, measure_memory=True,
                       compare_vanilla=False, **convert_kwargs)
    entry = _lowest_entry(manifest)
    need = entry.measured_peak_rss_bytes + extra_bytes
    return Candidate(method, train_last, entry.mode, entry.micro_batch, entry.measured_peak_rss_bytes, need,
                     allocated_saved_bytes(model, manifest), need <= ceiling_bytes, time.perf_counter() - started)


class _Search:
    """Converts and measures candidates of one model, caching each (method, depth) once."""

    def __init__(self, model: keras.Model, work_dir: Path, ceiling: int, extra: int, convert_kwargs: dict[str, Any],
                 on_candidate: Callable[[Candidate], None], known: dict[tuple[str, int], Candidate]):
        self.model = model
        self.work_dir = work_dir
        self.ceiling = ceiling
        self.extra = extra  # device base + margin
        self.convert_kwargs = convert_kwargs
        self.on_candidate = on_candidate
        self.known = known  # every candidate measured so far, also by earlier searches (other ceilings)
        self.measured: dict[tuple[str, int], Candidate] = {}  # this search's, judged against its ceiling

    def bundle_dir(self, method: str, depth: int) -> Path:
        return self.work_dir / f"{method}-{depth}"

    def measure(self, method: str, depth: int) -> Candidate:
        key = (method, depth)
        if key not in self.measured:
            if key not in self.known:
                self.known[key] = measure_candidate(self.model, self.bundle_dir(method, depth), method, depth,
                                                    self.ceiling, self.extra, **self.convert_kwargs)
            # a peak measured under another ceiling is judged again, not converted again
            self.measured[key] = self.known[key].judged(self.extra, self.ceiling)
            self.on_candidate(self.measured[key])
        return self.measured[key]

    def deepest(self, method: str, max_depth: int) -> int:
        """The deepest fitting depth of ``method`` (0 when even depth 1 does not fit): :func:`deepest_fitting`."""
        return deepest_fitting(lambda depth: self.measure(method, depth).need_bytes, self.ceiling, max_depth)


def deepest_fitting(need: Callable[[int], float], ceiling: float, max_depth: int) -> int:
    """The deepest ``depth`` in ``1..max_depth`` with ``need(depth) <= ceiling`` (0 when depth 1 does not fit), for a
    need that grows with depth, asking ``need`` for each depth at most once.

    The depth doubles from 1 while it fits, then bisection runs between the deepest that fits and the shallowest
    that does not. A doubling is capped at one past the depth where the line through the last two fitting needs
    crosses the ceiling (the need is measured by converting, slower the deeper: an uncapped doubling from 16 to 32
    cost MobileNetV2's hosvd search 186 s for an answer of 17). A capped step that fits is followed by the next
    prediction, and from the second such step in a row each is at least twice as long as the one before, so a
    prediction that keeps falling short costs about as many steps as doubling: at most :func:`search_steps`
    ``(max_depth)`` depths are asked for (checked against exhaustive search on random growing needs,
    ``tests/converter/test_fit.py``). (Doubling the step after the first short one made hosvd's search at 256 MiB
    convert the whole model, 632 s of its 1,566, right after the last 30 fitted 5 MiB under the ceiling.)
    """
    needs: dict[int, float] = {}

    def fits(depth: int) -> bool:
        needs[depth] = need(depth)
        return needs[depth] <= ceiling

    if not fits(1):
        return 0
    lo, hi = 1, max_depth + 1  # lo fits, hi does not (max_depth + 1 is never asked for)
    least = 1  # the shortest step a capped doubling may take
    short = False  # whether the last step was a capped one that fitted
    while hi > lo + 1:
        if hi <= max_depth:  # a bracket: bisect it
            probe = (lo + hi) // 2
            lo, hi = (probe, hi) if fits(probe) else (lo, probe)
            continue
        doubling = min(2 * lo, max_depth)
        probe = min(doubling, max(lo + least, _crossing(needs, ceiling) + 1))
        if fits(probe):
            capped = probe < doubling
            least = 2 * (probe - lo) if capped and short else 1
            short, lo = capped, probe
        else:
            hi = probe
    return lo


def _crossing(needs: dict[int, float], ceiling: float) -> int:
    """The deepest depth the line through the two deepest fitting needs keeps within ``ceiling`` (a large number when
    there is one point or the line does not rise)."""
    fitting = sorted(d for d, n in needs.items() if n <= ceiling)
    if len(fitting) < 2:
        return 1 << 30
    a, b = fitting[-2:]
    slope = (needs[b] - needs[a]) / (b - a)
    return b + int((ceiling - needs[b]) / slope) if slope > 0 else 1 << 30


def search_steps(max_depth: int) -> int:
    """The most candidates one method's search measures: depth 1, the doublings, the halvings, and one more for
    capped doublings (no growing need of 200,000 random ones up to 130 depths took more)."""
    doublings = math.ceil(math.log2(max_depth)) if max_depth > 1 else 0
    return min(max_depth, 2 + 2 * doublings)


def fit(
    model: keras.Model | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    ram_ceiling_mb: float,
    batch_size: int,
    calibration_data: np.ndarray,
    method: str = "hosvd",
    epsilon: float = 0.8,
    margin_mb: float = DEFAULT_MARGIN_MB,
    device_base_mb: float = DEFAULT_DEVICE_BASE_MB,
    on_candidate: Callable[[Candidate], None] | None = None,
    candidates_dir: str | os.PathLike | None = None,
    known: dict[tuple[str, int], Candidate] | None = None,
    **convert_kwargs: Any,
) -> FitResult:
    """Write the deepest bundle whose measured need fits ``ram_ceiling_mb``.

    Args:
        model: a Keras model, or a path to a ``.keras`` file (or a directory holding one).
        out_dir: the bundle directory to write.
        ram_ceiling_mb: the device's ``[training] ram_ceiling_mb``.
        batch_size: the static train batch size.
        calibration_data: representative inputs (N, ...) for the ranks (see :func:`converter.convert.convert`).
        method: ``none``, ``svd``, ``hosvd``, ``asi``, or ``auto`` (``none``, ``hosvd`` and ``asi`` searched
            each; the one training the most layers wins, ``none`` at a tie).
        epsilon: energy share kept per mode.
        margin_mb: safety margin added to every need (the device adds its ``safety_margin_mb`` too).
        device_base_mb: what the device holds besides the training child's step (daemon, evaluation, data).
        on_candidate: called with each candidate as soon as it is measured (progress, tables).
        candidates_dir: keep the other candidates' bundles here (``<method>-<train_last>``); by default they are
            converted next to ``out_dir`` and removed.
        known: candidates an earlier search of the same model, options and ``candidates_dir`` measured (under
            another ceiling), by ``(method, train_last)``: judged against this ceiling without converting them
            again. Filled in with this search's new candidates, so one dict serves a series of ceilings.
        convert_kwargs: further :func:`converter.convert.convert` options (optimizer, labels, loss, ...).

    Returns:
        The search; the chosen bundle is in ``out_dir`` with the search in its manifest's ``fit`` field.

    Raises:
        FitError: nothing fits (the message names the smallest candidate's need).
        ConversionError: bad options, or a model the converter cannot train.
    """
    started = time.perf_counter()
    if ram_ceiling_mb <= 0:
        raise ConversionError(f"--ram-ceiling-mb must be positive, got {ram_ceiling_mb}")
    if margin_mb < 0 or device_base_mb < 0:
        raise ConversionError(f"--margin-mb and --device-base-mb must be >= 0, got {margin_mb} and {device_base_mb}")
    if batch_size < 1:
        raise ConversionError(f"--batch-size must be positive, got {batch_size}")
    if calibration_data is None or len(calibration_data) == 0:
        raise ConversionError("fit needs --calibration-data: the ranks, and so the measured peaks, depend on it")
    methods = list(AUTO_METHODS) if method == "auto" else [parse_method(method)]
    if not isinstance(model, keras.Model):
        model = load_model(model)
    depth_cap = max_train_last(model)
    if depth_cap == 0:
        raise ConversionError("the model has no weighted layer the converter can train")

    out = Path(out_dir)
    if known and candidates_dir is None:
        raise ConversionError("fit(known=...) needs the candidates_dir the known candidates' bundles are in")
    work_dir = Path(candidates_dir) if candidates_dir is not None else out.parent / f".{out.name}.fit"
    if not known:
        shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(convert_kwargs, epsilon=epsilon, batch_sizes=[batch_size], calibration_data=calibration_data)
    search = _Search(model, work_dir, int(ram_ceiling_mb * MIB), int((device_base_mb + margin_mb) * MIB), kwargs,
                     on_candidate or (lambda c: None), {} if known is None else known)
    try:
        deepest = {m.value: search.deepest(m.value, depth_cap) for m in methods}
        best = max(deepest.values())
        if best == 0:
            smallest = min((search.measured[(m.value, 1)] for m in methods), key=lambda c: c.need_bytes)
            raise FitError(
                f"nothing fits ram_ceiling_mb = {ram_ceiling_mb:g}: the smallest candidate ({smallest.method}, "
                f"train_last 1, batch {batch_size}) needs {smallest.need_mib:.1f} MiB (measured peak "
                f"{smallest.peak_mib:.1f} + device base {device_base_mb:g} + margin {margin_mb:g}). Raise the "
                "ceiling, or lower --batch-size")
        winner = next(m.value for m in methods if deepest[m.value] == best)
        chosen = search.measured[(winner, best)]
        _install(search.bundle_dir(winner, best), out)
    finally:
        if candidates_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    result = FitResult(chosen, list(search.measured.values()), deepest, depth_cap, float(ram_ceiling_mb),
                       float(device_base_mb), float(margin_mb), batch_size, time.perf_counter() - started,
                       load_manifest(out))
    manifest = dataclasses.replace(result.manifest, fit=result.record())
    (out / MANIFEST_FILE).write_text(manifest.to_json())
    return dataclasses.replace(result, manifest=manifest)


def _install(candidate_dir: Path, out: Path) -> None:
    """Move the chosen candidate's files into ``out`` (replacing a bundle there)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, MANIFEST_FILE, SOURCE_MODEL):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(candidate_dir / name, target)


def candidate_table(candidates: Sequence[Candidate], ceiling_mb: float) -> str:
    """The measured candidates, shallowest first: trainable layers, method, peak, need, saved, fits."""
    rows = [("trainable layers", "method", "mode", "measured peak MiB", "need MiB", "allocated saved MiB",
             f"fits {ceiling_mb:g} MiB?")]
    for c in sorted(candidates, key=lambda c: (c.method, c.train_last)):
        rows.append((str(c.train_last), c.method, c.mode, f"{c.peak_mib:.1f}", f"{c.need_mib:.1f}",
                     f"{c.saved_bytes_allocated / MIB:.2f}", "yes" if c.fits else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows)
