"""The training and evaluation runs a child process performs on a loaded :class:`~device_app.bundle.Bundle`.

Plain functions over a bundle, a store and a job; progress goes out through an ``emit`` callback and a stop
request comes in through a ``threading.Event``-like object, so the same code runs in the daemon's child and
in tests. The store is read one batch at a time (:mod:`device_app.dataset`): class-balanced batches of window
ids, evaluation in batches too, so memory does not grow with the number of stored windows. A streamed run with
the feature cache first caches the prefix features of every window it will read (the whole training split, or
the batches of a short run, drawn up front) and of the validation split
(:meth:`~device_app.dataset.BatchReader.prefetch`), so the prefix interpreter is gone before the train step's
arena is allocated. Rules: restore the newest checkpoint first; checkpoint every ``checkpoint_every`` steps and
at the end; on a non-finite loss restore the last good weights and stop; when validation accuracy ends more
than ``rollback_tolerance`` below where the run started, discard the run's checkpoints and restore the start.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from device_app import checkpoint
from device_app.bundle import Bundle
from device_app.dataset import BatchReader, balanced_batches
from device_app.jobs.spec import Job
from device_app.store import Store, disk_full_message, is_disk_full
from hosvd_contract import BundleError

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


def start_from(bundle: Bundle, job: Job) -> checkpoint.Checkpoint | None:
    """:func:`restore`, then overlay ``job.start_weights`` (trainable weights only) when the job names a file.

    Raises:
        BundleError: the file holds a weight that is not trainable in this bundle, or a wrong shape.
    """
    ckpt = restore(bundle, job.checkpoints_root)
    if job.start_weights:
        trainable = {w.name for w in bundle.manifest.weights if w.trainable}
        with np.load(job.start_weights, allow_pickle=False) as data:
            given = {k: np.array(data[k]) for k in data.files}
        if not set(given) <= trainable:
            raise BundleError(f"start weights {job.start_weights} hold {sorted(set(given) - trainable)}, which "
                              f"are not trainable weights of this bundle (trainable: {sorted(trainable)})")
        bundle.set_weights({**bundle.get_weights(), **given})
        log.info("Starting from the %d trainable weights in %s", len(given), job.start_weights)
    return ckpt


def _finite(weights: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in weights.values())


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


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
    start = start_from(bundle, job)
    start_step = start.step if start else 0
    if job.learning_rate is not None:
        bundle.set_learning_rate(job.learning_rate)
    train, val = store.split_index("train", labels), store.split_index("val", labels)
    if len(train) == 0:
        raise TrainingError(f"no labelled training windows in the store for labels {labels}: collect "
                            "and label data first")
    from_features = plan.mode == "streamed" and bundle.has_features
    reader = BatchReader(bundle, store, from_features, plan.micro_batch, job.feature_cache)
    rng = np.random.default_rng(job.seed + start_step)
    batch_iter = balanced_batches(train.y, plan.batch_size, rng)
    if reader.cache:  # streamed with the cache: every window the run will read gets its features first
        used = train.ids
        if job.steps * plan.batch_size < len(train):  # a short run: draw its batches now, prefetch only those
            drawn = [next(batch_iter) for _ in range(job.steps)]
            used = np.unique(train.ids[np.concatenate(drawn)]) if drawn else train.ids[:0]
            batch_iter = iter(drawn)
        reader.prefetch(np.concatenate([used, val.ids]))
    eval_batch = job.eval_batch or plan.batch_size
    val_before = reader.evaluate(val, eval_batch)
    start_weights = good = bundle.get_weights()
    t0 = time.monotonic()
    losses: list[float] = []
    corrects: list[float] = []
    status, reason, written = "ok", "", []
    for i in range(job.steps):
        if stop.is_set():
            status, reason = "stopped", f"stop requested after {i} steps"
            break
        idx = next(batch_iter)
        loss, correct = reader.train_step(train.ids[idx], train.y[idx], plan.mode)
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
            written.append(_save(ckpt_dir, step, good, _meta(bundle, loss), job.keep_checkpoints))
    steps_done = len(losses)
    val_after = reader.evaluate(val, eval_batch)
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
            written.append(_save(ckpt_dir, start_step + steps_done, final, _meta(bundle, losses[-1], val_after),
                                 job.keep_checkpoints))
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
        "from_features": from_features, "features_computed": reader.computed, "features_cached": reader.cached,
        "windows_vanished": reader.vanished,
        "plan": plan.to_dict(),
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
        _save(ckpt_dir, start_step, start_weights, _meta(bundle, float("nan")), keep)


def _save(ckpt_dir: Path, step: int, weights: dict[str, np.ndarray], meta: dict[str, Any], keep: int) -> Path:
    """:func:`checkpoint.save`, with a full disk reported as such (the previous checkpoints stay as they were)."""
    try:
        return checkpoint.save(ckpt_dir, step, weights, meta, keep)
    except OSError as err:
        if is_disk_full(err):
            raise TrainingError(disk_full_message(ckpt_dir, f"cannot write the checkpoint of step {step}",
                                                  err)) from err
        raise


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
    ckpt = start_from(bundle, job)
    index = store.split_index(job.split, bundle.manifest.labels)
    if len(index) == 0:
        raise TrainingError(f"no labelled windows in split {job.split!r} to evaluate")
    reader = BatchReader(bundle, store, from_features=False, micro_batch=1, cache=False)
    result = reader.evaluate(index, job.eval_batch or bundle.manifest.default_batch_size)
    if result is None:
        raise TrainingError(f"the windows of split {job.split!r} were deleted while it was being evaluated")
    return {"split": job.split, **result, "global_step": ckpt.step if ckpt else 0}
