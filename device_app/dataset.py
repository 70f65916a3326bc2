"""What a training child reads from the store, one batch at a time: class-balanced batches of window ids, the
model inputs of a batch (raw windows, or frozen-prefix features from the cache), streamed evaluation.

Nothing here holds more than one batch of windows (or features) in memory, whatever the store's size: the only
per-window state is the split's :class:`~device_app.store.SplitIndex` (12 bytes a window) and the sampler's
per-class position lists (16 bytes a window). :func:`device_app.plan.data_buffer_bytes` is what the planner
adds for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np

from device_app import steps
from device_app.bundle import Bundle
from device_app.store import DiskFull, SplitIndex, Store

log = logging.getLogger(__name__)


def balanced_batches(y: np.ndarray, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless batches of positions into ``y``, the classes present as equally represented as the batch allows.

    Each class keeps its own shuffled list of positions and deals from it, reshuffling when it runs out, so a
    rare class is seen as often as a common one and every window of a class is used once before any repeats.
    Which classes get the extra slots of a batch that does not divide evenly rotates at random.
    """
    classes = np.unique(y)
    if len(classes) == 0:
        raise ValueError("no windows to draw batches from")
    pools = {int(c): np.flatnonzero(y == c) for c in classes}
    order = {c: rng.permutation(p) for c, p in pools.items()}
    cursor = dict.fromkeys(pools, 0)
    while True:
        picked = rng.permutation(classes)
        share = np.full(len(classes), batch_size // len(classes))
        share[: batch_size % len(classes)] += 1
        batch = []
        for c, k in zip(picked, share, strict=True):
            c = int(c)
            for _ in range(int(k)):
                if cursor[c] == len(order[c]):
                    order[c], cursor[c] = rng.permutation(pools[c]), 0
                batch.append(order[c][cursor[c]])
                cursor[c] += 1
        yield rng.permutation(np.array(batch, np.int64))


class BatchReader:
    """Model inputs for a list of window ids, read from the store one batch at a time.

    Args:
        bundle: the loaded bundle.
        store: the window store.
        from_features: return frozen-prefix features (``train_features``/``evaluate_features`` inputs) instead
            of raw windows.
        micro_batch: windows per ``features`` call when features have to be computed.
        cache: keep computed features in the store's cache (and use what it holds). When the disk is full the
            cache is switched off for the rest of the run and training goes on without it.
    """

    def __init__(self, bundle: Bundle, store: Store, from_features: bool, micro_batch: int, cache: bool) -> None:
        self.bundle = bundle
        self.store = store
        self.from_features = from_features
        self.micro_batch = micro_batch
        self.cache = cache and from_features
        self.computed = 0
        self.cached = 0
        self.vanished = 0  # windows deleted from the store (retention) after the split was read

    def inputs(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """The windows ``ids``, or their prefix features, by id: only those still stored (retention may delete a
        window while a run goes on, since the daemon keeps collecting)."""
        if not self.from_features:
            return self.store.windows_by_id(ids)
        sha = self.bundle.sha256
        found = self.store.cached_features(ids, sha) if self.cache else {}
        self.cached += len(found)
        windows = self.store.windows_by_id(sorted({int(i) for i in ids} - set(found)))
        if windows:
            found.update(self._compute(windows, lambda x: self.bundle.features(x, self.micro_batch), sha))
        return found

    def _compute(self, windows: dict[int, np.ndarray], features: Callable[[np.ndarray], np.ndarray],
                 sha: str) -> dict[int, np.ndarray]:
        """The prefix features of ``windows`` (by id), counted and put in the cache when it is on; a full disk
        turns the cache off, with a warning, and loses nothing (the features are returned all the same)."""
        missing = sorted(windows)
        computed = features(np.stack([windows[i] for i in missing]))
        self.computed += len(missing)
        if self.cache:
            try:
                self.store.put_features(np.array(missing), computed, sha)
            except DiskFull as err:
                log.warning("%s; going on without the feature cache", err)
                self.cache = False
        return dict(zip(missing, computed, strict=True))

    def prefetch(self, ids: np.ndarray) -> None:
        """Compute and cache the prefix features of every window of ``ids`` not cached yet, a few windows at a
        time (:meth:`~device_app.bundle.Bundle.prefix_chunk`: a whole batch of raw images was the largest thing
        alive here), on one prefix interpreter that is gone when this returns: a streamed run does this before
        its first train step, so the prefix's memory never adds to the train step's arena (docs/bench.md, "What
        the device runtime holds"). Stops early (caching off, with a warning) when the disk is full; windows
        missed are then computed as they are drawn."""
        if not self.cache:
            return
        sha = self.bundle.sha256
        chunk = self.bundle.prefix_chunk(self.micro_batch)
        with self.bundle.prefix(self.micro_batch) as features:
            for start in range(0, len(ids), chunk):
                part = ids[start:start + chunk]
                have = self.store.cached_features(part, sha)
                windows = self.store.windows_by_id(sorted({int(i) for i in part} - set(have)))
                if windows:
                    self._compute(windows, features, sha)
                if not self.cache:  # the disk is full
                    return

    def _present(self, ids: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x, y, kept positions)`` for the windows of ``ids`` that are still stored."""
        found = self.inputs(ids)
        keep = np.array([i for i, sid in enumerate(ids) if int(sid) in found], np.int64)
        self.vanished += len(ids) - len(keep)
        if len(keep) == 0:
            return np.zeros((0,)), y[:0], keep
        # Row by row into one batch array, each stored row released after its last use: the batch is held once,
        # not twice (np.stack over the fetched rows), which is what the converter's measurement assumes.
        last_use = {int(ids[i]): j for j, i in enumerate(keep)}
        first = found[int(ids[keep[0]])]
        x = np.empty((len(keep), *first.shape), first.dtype)
        del first
        for j, i in enumerate(keep):
            sid = int(ids[i])
            x[j] = found[sid]
            if last_use[sid] == j:
                del found[sid]
        return x, y[keep], keep

    def evaluate(self, index: SplitIndex, batch: int) -> dict[str, float] | None:
        """Mean loss and accuracy over a split, ``batch`` windows at a time; ``None`` for an empty split."""
        loss = correct = 0.0
        n = 0
        for start in range(0, len(index), batch):
            x, y, _ = self._present(index.ids[start:start + batch], index.y[start:start + batch])
            if len(x):
                part = self.bundle.evaluate(x, y, self.from_features, batch)
                loss += part["loss"] * part["n"]
                correct += part["accuracy"] * part["n"]
                n += part["n"]
        return {"loss": loss / n, "accuracy": correct / n, "n": n} if n else None

    def train_step(self, ids: np.ndarray, y: np.ndarray, mode: str) -> tuple[float, float]:
        """One optimizer step on the windows ``ids`` through :mod:`device_app.steps`; a window deleted meanwhile is
        replaced by another of the batch (the train signature's batch size is fixed).

        Raises:
            LookupError: every window of the batch is gone.
        """
        x, y, keep = self._present(ids, y)
        if len(keep) == 0:
            raise LookupError(f"none of the windows {list(ids)[:8]} is stored any more")
        if len(keep) < len(ids):
            fill = np.resize(np.arange(len(keep)), len(ids))
            x, y = x[fill], y[fill]
        if self.from_features:
            return steps.train_step_on_features(self.bundle, x, y)
        return steps.train_step(self.bundle, x, y, mode, self.micro_batch)

