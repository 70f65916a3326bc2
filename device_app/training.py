"""The training and evaluation runs a child process performs on a loaded :class:`~device_app.bundle.Bundle`.

Plain functions over a bundle, a store and a job; progress goes out through an ``emit`` callback and a stop
request comes in through a ``threading.Event``-like object, so the same code runs in the daemon's child and
in tests. Rules: restore the newest checkpoint first; checkpoint every ``checkpoint_every`` steps and at the
end; on a non-finite loss restore the last good weights and stop; when validation accuracy ends more than
``rollback_tolerance`` below where the run started, discard the run's checkpoints and restore the start.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from device_app import checkpoint, steps
from device_app.bundle import Bundle
from device_app.jobs import Job
from device_app.store import Dataset, Store

log = logging.getLogger(__name__)
Emit = Callable[[dict[str, Any]], None]


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


class TrainingError(RuntimeError):
    """Training cannot start (no data, no plan) or failed; the message says why."""


def restore(bundle: Bundle, checkpoints_root: str) -> checkpoint.Checkpoint | None:
    """Load the newest readable checkpoint of this bundle into it; return it (``None``: initial weights)."""
    names = {w.name for w in bundle.manifest.weights}
    ckpt = checkpoint.latest(checkpoint.bundle_dir(checkpoints_root, bundle.sha256), names)
    if ckpt is not None:
        bundle.set_weights(ckpt.weights)
        log.info("Restored checkpoint %s (step %d)", ckpt.path, ckpt.step)
    return ckpt


def prefix_features(bundle: Bundle, store: Store | None, data: Dataset, micro_batch: int) -> np.ndarray:
    """Frozen-prefix outputs of ``data``, from the store's cache where present (``store=None``: no cache).

    Missing ones are computed ``micro_batch`` windows at a time and added to the cache.
    """
    if len(data) == 0:
        return np.zeros((0, *bundle.manifest.features_shape), np.float32)
    cached = store.cached_features(data.ids, bundle.sha256) if store is not None else {}
    missing = [i for i, sid in enumerate(data.ids) if int(sid) not in cached]
    if missing:
        computed = bundle.features(data.x[missing], micro_batch)
        if store is not None:
            store.put_features(data.ids[missing], computed, bundle.sha256)
        cached.update({int(data.ids[i]): f for i, f in zip(missing, computed, strict=True)})
        log.info("Computed prefix features for %d windows (%d were cached)", len(missing),
                 len(data) - len(missing))
    return np.stack([cached[int(sid)] for sid in data.ids])


def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless index batches: shuffled epochs, sampling with replacement when ``n < batch_size``."""
    while True:
        if n < batch_size:
            yield rng.integers(0, n, batch_size)
            continue
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i:i + batch_size]


def _finite(weights: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in weights.values())


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _metrics(bundle: Bundle, x: np.ndarray, y: np.ndarray, from_features: bool) -> dict[str, float] | None:
    return bundle.evaluate(x, y, from_features) if len(x) else None


def run_training(bundle: Bundle, store: Store, job: Job, emit: Emit, stop: StopFlag,
                 rss: Callable[[], int]) -> dict[str, Any]:
    """Train per ``job`` and return the report's data.

    Args:
        bundle: the loaded bundle.
        store: the window store (read, plus the feature cache).
        job: a ``train`` job with its plan.
        emit: receives ``{"event": "progress", ...}`` dicts.
        stop: checked before every step; when set the run ends early with a checkpoint.
        rss: returns the current RSS in bytes (for progress messages).

    Raises:
        TrainingError: no labelled training data.
    """
    assert job.plan is not None
    plan = job.plan
    labels = bundle.manifest.labels
    ckpt_dir = checkpoint.bundle_dir(job.checkpoints_root, bundle.sha256)
    start = restore(bundle, job.checkpoints_root)
    start_step = start.step if start else 0
    if job.learning_rate is not None:
        bundle.set_learning_rate(job.learning_rate)
    train, val = store.dataset("train", labels), store.dataset("val", labels)
    if len(train) == 0:
        raise TrainingError(f"no labelled training windows in the store for labels {labels}: collect "
                            "and label data first")
    from_features = plan.mode == "streamed" and bundle.has_features
    cache = store if job.feature_cache else None
    x_train = prefix_features(bundle, cache, train, plan.micro_batch) if from_features else train.x
    x_val = prefix_features(bundle, cache, val, plan.micro_batch) if from_features else val.x
    val_before = _metrics(bundle, x_val, val.y, from_features)
    start_weights = good = bundle.get_weights()
    t0 = time.monotonic()
    rng = np.random.default_rng(job.seed + start_step)
    losses: list[float] = []
    corrects: list[float] = []
    status, reason, written = "ok", "", []
    batch_iter = batches(len(train), plan.batch_size, rng)
    for i in range(job.steps):
        if stop.is_set():
            status, reason = "stopped", f"stop requested after {i} steps"
            break
        idx = next(batch_iter)
        if from_features:
            loss, correct = steps.train_step_on_features(bundle, x_train[idx], train.y[idx])
        else:
            loss, correct = steps.train_step(bundle, x_train[idx], train.y[idx], plan.mode, plan.micro_batch)
        step = start_step + i + 1
        if not math.isfinite(loss):
            bundle.set_weights(good)
            status = "rolled_back"
            reason = f"loss became non-finite ({loss}) at step {step}; restored the last good weights"
            break
        losses.append(loss)
        corrects.append(correct / plan.batch_size)
        if (i + 1) % job.progress_every == 0 or i == 0 or i + 1 == job.steps:
            window = slice(-job.progress_every, None)
            emit({"event": "progress", "step": i + 1, "total": job.steps, "global_step": step,
                  "loss": _mean(losses[window]), "accuracy": _mean(corrects[window]),
                  "rss_mb": round(rss() / 2**20, 1), "elapsed": round(time.monotonic() - t0, 3)})
        if (i + 1) % job.checkpoint_every == 0 and i + 1 < job.steps:
            weights = bundle.get_weights()
            if not _finite(weights):
                bundle.set_weights(good)
                status = "rolled_back"
                reason = f"weights became non-finite by step {step}; restored the last good weights"
                break
            good = weights
            written.append(checkpoint.save(ckpt_dir, step, good, _meta(bundle, loss), job.keep_checkpoints))
    steps_done = len(losses)
    val_after = _metrics(bundle, x_val, val.y, from_features)
    tol = job.rollback_tolerance
    if (status == "ok" and tol is not None and val_before and val_after
            and val_after["accuracy"] < val_before["accuracy"] - tol):
        _discard_run(bundle, ckpt_dir, written, start_step, start_weights, job.keep_checkpoints)
        status = "rolled_back"
        reason = (f"validation accuracy fell from {val_before['accuracy']:.3f} to "
                  f"{val_after['accuracy']:.3f} (tolerance {tol}); kept the weights from before this run")
    elif steps_done and status != "rolled_back":
        final = bundle.get_weights()
        if _finite(final):
            written.append(checkpoint.save(ckpt_dir, start_step + steps_done, final,
                                           _meta(bundle, losses[-1], val_after), job.keep_checkpoints))
        else:
            bundle.set_weights(good)
            status, reason = "rolled_back", "weights became non-finite; restored the last good weights"
    newest = checkpoint.listing(ckpt_dir)
    k = min(job.progress_every, steps_done) or 1
    return {
        "status": status, "reason": reason, "steps_done": steps_done,
        "global_step": newest[0][0] if newest else 0, "first_loss": _mean(losses[:k]),
        "final_loss": _mean(losses[-k:]), "final_accuracy": _mean(corrects[-k:]),
        "val_before": val_before, "val_after": val_after, "n_train": len(train), "n_val": len(val),
        "from_features": from_features, "plan": plan.to_dict(),
        "elapsed_s": round(time.monotonic() - t0, 3),
        "checkpoint": newest[0][1].name if newest else None,
    }


def _discard_run(bundle: Bundle, ckpt_dir: Path, written: list[Path], start_step: int,
                 start_weights: dict[str, np.ndarray], keep: int) -> None:
    """Undo a run: discard its checkpoints, restore the weights it started from, and make sure the newest
    checkpoint holds them (pruning may have removed the one the run started from)."""
    for path in written:
        if path.exists():
            checkpoint.discard(path)
    bundle.set_weights(start_weights)
    newest = checkpoint.listing(ckpt_dir)
    if start_step and (not newest or newest[0][0] != start_step):
        checkpoint.save(ckpt_dir, start_step, start_weights, _meta(bundle, float("nan")), keep)


def _meta(bundle: Bundle, loss: float, val: dict[str, float] | None = None) -> dict[str, Any]:
    return {"bundle_sha256": bundle.sha256, "model_name": bundle.manifest.model_name, "loss": loss,
            "val": val, "time": time.time()}


def run_evaluation(bundle: Bundle, store: Store, job: Job) -> dict[str, Any]:
    """Evaluate the newest checkpoint (or the initial weights) on ``job.split``.

    Returns:
        ``{"split", "loss", "accuracy", "n", "global_step"}``.

    Raises:
        TrainingError: no labelled windows in that split.
    """
    ckpt = restore(bundle, job.checkpoints_root)
    data = store.dataset(job.split, bundle.manifest.labels)
    if len(data) == 0:
        raise TrainingError(f"no labelled windows in split {job.split!r} to evaluate")
    result = bundle.evaluate(data.x, data.y)
    return {"split": job.split, **result, "global_step": ckpt.step if ckpt else 0}
