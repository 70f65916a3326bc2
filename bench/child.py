"""The device side of one benchmark run, in a fresh process: ``python -m bench.child SPEC.json``.

Imports only numpy and the device app (never TensorFlow), and steps through the device's own step
(:func:`device_app.steps.train_step`), so its peak RSS is what a device process would see. Prints one JSON line
with the figures. The spec (written by :mod:`bench.runner`) says:

- ``bundle_dir``, ``threads``, ``batch_size``, ``micro_batch``, ``seed``;
- ``plan``: ``whole`` runs ``train`` on the whole batch through the whole model (the TFLite-recipe way);
  ``streamed`` runs ``features`` on micro-batches, then ``train_features`` on the whole batch;
- ``warmup``/``timed``: steps before and during timing (median ms per step);
- ``cached_steps``: extra ``train_features`` steps on precomputed features (the feature cache) after the run;
- ``data`` (optional): an ``.npz`` with ``x_train, y_train, x_test, y_test`` for a fine-tuning run: accuracy
  on the test set before and after ``warmup + timed`` steps of seeded mini-batches, and the loss curve.
  Without it the inputs are seeded random numbers.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from device_app import steps
from device_app.bundle import Bundle
from device_app.measure import sample_batch
from device_app.memory import MIB, anon_rss_bytes, peak_rss_bytes, rss_bytes


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class Device:
    """The loaded bundle and the steps of one plan.

    Args:
        spec: the run spec (see the module docstring).
    """

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.bundle = Bundle(spec["bundle_dir"], spec.get("threads", 2))

    def features(self, x: np.ndarray) -> np.ndarray:
        """Frozen-prefix output ``(N, ...)``, ``micro_batch`` samples per invoke."""
        return self.bundle.features(x, self.spec["micro_batch"])

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One train step of the plan on a whole batch; returns the loss."""
        return steps.train_step(self.bundle, x, y, self.spec["plan"], self.spec["micro_batch"])[0]

    def cached_step(self, feats: np.ndarray, y: np.ndarray) -> float:
        """One ``train_features`` step on precomputed prefix features."""
        return steps.train_step_on_features(self.bundle, feats, y)[0]

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """Top-1 accuracy over ``x`` in chunks of the train batch, through the plan's signatures."""
        correct = 0.0
        for s in _chunks(len(x), self.spec["batch_size"]):
            out = steps.evaluate(self.bundle, x[s], y[s], self.spec["plan"], self.spec["micro_batch"])
            correct += out["accuracy"] * out["n"]
        return correct / len(x)


def _timed(fn: Callable[[], float], warmup: int, timed: int) -> tuple[list[float], list[float]]:
    """Run ``fn`` ``warmup + timed`` times; return all losses and the timed steps' milliseconds."""
    losses, ms = [], []
    for i in range(warmup + timed):
        start = time.perf_counter()
        losses.append(fn())
        if i >= warmup:
            ms.append((time.perf_counter() - start) * 1e3)
    return losses, ms


def main(spec: dict) -> dict:
    """Run the spec and return the figures (RSS in MiB, times in ms)."""
    device = Device(spec)
    base = rss_bytes()
    rng = np.random.default_rng(spec["seed"])
    batch = spec["batch_size"]
    result: dict = {"base_rss_mib": base / MIB}
    if spec.get("data"):
        data = np.load(spec["data"])
        x_train, y_train = data["x_train"], data["y_train"].astype(np.int32)
        x_test, y_test = data["x_test"], data["y_test"].astype(np.int32)
        result["accuracy_before"] = device.accuracy(x_test, y_test)

        def batches() -> Callable[[], float]:
            def draw() -> float:
                idx = rng.choice(len(x_train), batch, replace=len(x_train) < batch)
                return device.step(x_train[idx], y_train[idx])
            return draw

        losses, ms = _timed(batches(), spec["warmup"], spec["timed"])
        result["accuracy_after"] = device.accuracy(x_test, y_test)
        result["loss_curve"] = losses
    else:
        x_train, y_train = sample_batch(device.bundle.manifest, batch, rng)
        losses, ms = _timed(lambda: device.step(x_train, y_train), spec["warmup"], spec["timed"])
    result["peak_rss_mib"] = peak_rss_bytes() / MIB
    result["anon_rss_mib"] = anon_rss_bytes() / MIB  # the arena never shrinks: the anonymous peak as well
    result["ms_per_step"] = float(np.median(ms))
    result["ms_steps"] = ms
    if spec["plan"] == "streamed" and spec.get("cached_steps", 0) > 0:
        idx = np.arange(batch) % len(x_train)
        feats, y = device.features(x_train[idx]), y_train[idx]
        _, cached = _timed(lambda: device.cached_step(feats, y), 1, spec["cached_steps"])
        result["ms_per_step_cached"] = float(np.median(cached))
        result["peak_rss_with_cache_mib"] = peak_rss_bytes() / MIB
    return result


if __name__ == "__main__":
    print(json.dumps(main(json.loads(Path(sys.argv[1]).read_text()))))
