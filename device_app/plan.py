"""Choose how to run training inside the RAM ceiling, from the bundle's measured memory plan.

Each ``manifest.memory_plan`` entry is one way to run a step (batch size; ``whole`` or ``streamed`` prefix
with a micro-batch) with the peak RSS the converter measured in a fresh process and that process's RSS right
after loading the bundle. The step's own cost is the difference (``measured_delta_bytes``; the analytic
``estimated_peak_bytes`` when nothing was measured). On the device::

    need = daemon RSS + child base RSS + evaluation + step delta + data buffers + safety margin

``child base RSS`` and ``evaluation`` (what the ``evaluate``/``evaluate_features`` arena adds) are measured on
the device by a probe child (:mod:`device_app.jobs.child`).

The data buffers are what the child holds of the store (:func:`data_buffer_bytes`): it reads one batch at a
time (:mod:`device_app.dataset`), so they depend on the batch and on ``[store] max_samples``, never on how
many windows are stored now. A plan fits when ``need <= ram_ceiling_mb``. Among the plans that fit, the largest
batch wins (the requested one if a request names it); at equal batch, ``streamed`` wins when the feature cache
is on (later epochs then run only the trainable suffix), else ``whole``. When nothing fits, :class:`PlanError`
lists every candidate's need and the ``hosvd-convert fit`` command (this ceiling, and what this device holds
besides the converter's measured peak as ``--device-base-mb``) that converts the deepest bundle that fits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hosvd_contract import Manifest, MemoryPlanEntry

MIB = 1 << 20
INDEX_BYTES_PER_WINDOW = 12  # a split's ids (int64) and label indices (int32): store.SplitIndex
SAMPLER_BYTES_PER_WINDOW = 16  # the class-balanced sampler's position and shuffled lists (int64 each)
COPIES_PER_BATCH = 4  # SQLite's blobs, the stacked batch, the normalised copy, the interpreter's input tensor
SQLITE_CACHE_BYTES = 2_048_000  # SQLite's default page cache per connection (cache_size = -2000)


class PlanError(RuntimeError):
    """No way to train fits the ceiling, or the request asks for something the bundle does not have."""


@dataclass(frozen=True)
class Plan:
    """The chosen way to train, with the memory arithmetic that justified it (bytes)."""

    batch_size: int
    mode: str
    micro_batch: int
    need_bytes: int
    ceiling_bytes: int
    step_bytes: int
    child_base_bytes: int
    daemon_bytes: int
    data_bytes: int = 0
    eval_bytes: int = 0

    @property
    def child_limit_bytes(self) -> int:
        """RSS the child may reach before the watcher stops it (0 = no ceiling)."""
        return max(0, self.ceiling_bytes - self.daemon_bytes) if self.ceiling_bytes else 0

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        mb = {k.replace("_bytes", "_mb"): round(v / MIB, 1) for k, v in d.items() if k.endswith("_bytes")}
        d.update(mb)
        return {k: v for k, v in d.items() if not k.endswith("_bytes")}


def step_bytes(entry: MemoryPlanEntry) -> int:
    """What one step adds to a loaded process: measured delta, else the converter's estimate."""
    delta = entry.measured_delta_bytes
    return delta if delta is not None else entry.estimated_peak_bytes


def data_buffer_bytes(manifest: Manifest, batch_size: int, max_windows: int) -> int:
    """What a training child holds of the store besides the interpreter: SQLite's page cache, the split indexes and
    the sampler's lists for up to ``max_windows`` windows, and one batch of windows and of prefix features
    (float32) in every copy a batch passes through."""
    window = 4 * _elements(manifest.input.shape)
    features = 4 * _elements(manifest.features_shape)
    per_window = INDEX_BYTES_PER_WINDOW + SAMPLER_BYTES_PER_WINDOW
    return SQLITE_CACHE_BYTES + max_windows * per_window + COPIES_PER_BATCH * batch_size * (window + features)


def _elements(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _candidates(manifest: Manifest, batch_size: int, streamed_ok: bool) -> list[MemoryPlanEntry]:
    entries = list(manifest.memory_plan)
    if not entries:  # no memory plan: one whole-batch entry per train signature, cost unknown (0)
        entries = [MemoryPlanEntry(s.batch_size, "whole", s.batch_size, 0) for s in manifest.train_signatures]
    have = sorted({s.batch_size for s in manifest.train_signatures})
    entries = [e for e in entries if e.batch_size in have and (streamed_ok or e.mode == "whole")]
    if batch_size:
        if batch_size not in have:
            raise PlanError(f"batch_size {batch_size} is not in the bundle; it has train signatures for "
                            f"{have}")
        entries = [e for e in entries if e.batch_size == batch_size]
    preferred = "streamed" if streamed_ok else "whole"
    return sorted(entries, key=lambda e: (-e.batch_size, e.mode != preferred))


def choose_plan(manifest: Manifest, *, ceiling_mb: int, daemon_bytes: int, child_base_bytes: int,
                margin_mb: int = 16, batch_size: int = 0, streamed_ok: bool = True, max_windows: int = 0,
                eval_bytes: dict[str, int] | None = None) -> Plan:
    """Pick the plan for one training run.

    Args:
        manifest: the bundle's manifest (``memory_plan``, ``train_signatures``).
        ceiling_mb: ``[training] ram_ceiling_mb``; 0 means no ceiling (largest batch, no checks).
        daemon_bytes: the daemon's RSS now.
        child_base_bytes: RSS of a child that loaded the bundle and ran nothing (probe).
        margin_mb: safety margin added to every need.
        batch_size: a requested batch size, 0 for the largest that fits.
        streamed_ok: the bundle has ``features``/``train_features`` and the feature cache is on.
        max_windows: the most windows the store can hold (``[store] max_samples``), for the data buffers.
        eval_bytes: what evaluation adds per mode (``whole``/``streamed``), measured by the probe child.

    Returns:
        The plan.

    Raises:
        PlanError: nothing fits (the message lists each candidate's need), or ``batch_size`` is not exported.
    """
    ceiling = ceiling_mb * MIB
    margin = margin_mb * MIB
    candidates = _candidates(manifest, batch_size, streamed_ok)
    if not candidates:
        raise PlanError("the bundle's memory plan has no usable entry")
    needs = []
    closest: tuple[int, int, MemoryPlanEntry] | None = None  # (need, device base for fit, entry)
    for e in candidates:
        step = step_bytes(e)
        data = data_buffer_bytes(manifest, e.batch_size, max_windows)
        evaluation = (eval_bytes or {}).get(e.mode, 0)
        need = daemon_bytes + child_base_bytes + evaluation + step + data + margin
        if not ceiling or need <= ceiling:
            return Plan(e.batch_size, e.mode, e.micro_batch, need, ceiling, step, child_base_bytes,
                        daemon_bytes, data, evaluation)
        needs.append(f"batch {e.batch_size} {e.mode}"
                     f"{f' (micro-batch {e.micro_batch})' if e.mode == 'streamed' else ''}: "
                     f"{need / MIB:.1f} MiB")
        if closest is None or need < closest[0]:
            closest = (need, need - margin - _converter_peak(e, child_base_bytes), e)
    raise PlanError(
        f"no training plan fits ram_ceiling_mb = {ceiling_mb}: daemon {daemon_bytes / MIB:.1f} MiB + bundle "
        f"loaded {child_base_bytes / MIB:.1f} MiB + evaluation + step + data + margin {margin_mb} MiB needs "
        + "; ".join(needs) + ". Raise [training] ram_ceiling_mb, or let the converter pick the deepest fine-tuning "
        f"that fits this device: {fit_command(ceiling_mb, closest[2].batch_size, closest[1], margin_mb)}")


def _converter_peak(entry: MemoryPlanEntry, child_base_bytes: int) -> int:
    """The peak the converter measured for ``entry`` (the device's probe base + step when it measured none)."""
    if entry.measured_peak_rss_bytes is not None and entry.measured_base_rss_bytes is not None:
        return entry.measured_peak_rss_bytes
    return child_base_bytes + step_bytes(entry)


def fit_command(ceiling_mb: int, batch_size: int, device_base_bytes: int, margin_mb: int) -> str:
    """The ``hosvd-convert fit`` command for this device: its ceiling, and as ``--device-base-mb`` what the device
    holds besides the converter's measured peak (daemon, evaluation, data buffers, and the difference of this
    device's bundle-loaded RSS from the converter's), rounded up."""
    base_mb = -(-max(device_base_bytes, 0) // MIB)
    return (f"hosvd-convert fit MODEL --ram-ceiling-mb {ceiling_mb} --batch-size {batch_size} "
            f"--device-base-mb {base_mb} --margin-mb {margin_mb} --calibration-data DATA --out BUNDLE")
