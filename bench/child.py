"""The device side of one benchmark run, in a fresh process: ``python -m bench.child SPEC.json``.

Imports only numpy and the device app (never TensorFlow), and steps through the device's own step
(:func:`device_app.steps.train_step`), so its peak RSS is what a device process would see. Prints one JSON line
with the figures. The spec (written by :mod:`bench.runner`) says:

- ``bundle_dir``, ``threads``, ``batch_size``, ``micro_batch``, ``seed``;
- ``plan``: ``whole`` runs ``train`` on the whole batch through the whole model (the TFLite-recipe way);
  ``streamed`` runs as the device's training loop does with its feature cache: ``features`` (micro-batches, on
  a prefix interpreter freed afterwards) for every input first, then ``train_features`` steps on the whole
  batch. ``ms_per_step`` is then the prefix's time for one batch (measured in that first pass) plus the
  ``train_features`` step, ``ms_per_step_cached`` the step alone (later epochs, features cached);
- ``warmup``/``timed``: steps before and during timing (median ms per step);
- ``cached_steps``: ignored (the streamed run's steps are the cached ones);
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
    """The loaded bundle and the steps of one plan (on raw windows for ``whole``, prefix features for
    ``streamed``).

    Args:
        spec: the run spec (see the module docstring).
    """

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.streamed = spec["plan"] == "streamed"
        self.bundle = Bundle(spec["bundle_dir"], spec.get("threads", 2), spec["plan"])

    def inputs(self, x: np.ndarray) -> np.ndarray:
        """What the plan's steps take: ``x`` itself, or its frozen-prefix features (``micro_batch`` a time)."""
        return self.bundle.features(x, self.spec["micro_batch"]) if self.streamed else x

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One train step of the plan on a whole batch of :meth:`inputs`; returns the loss."""
        if self.streamed:
            return steps.train_step_on_features(self.bundle, x, y)[0]
        return steps.train_step(self.bundle, x, y, "whole", self.spec["micro_batch"])[0]

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """Top-1 accuracy over :meth:`inputs` ``x`` in chunks of the train batch."""
        correct = 0.0
        for s in _chunks(len(x), self.spec["batch_size"]):
            out = self.bundle.evaluate(x[s], y[s], from_features=self.streamed)
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
    x_test = y_test = None
    if spec.get("data"):
        data = np.load(spec["data"])
        x_train, y_train = data["x_train"], data["y_train"].astype(np.int32)
        x_test, y_test = data["x_test"], data["y_test"].astype(np.int32)
    else:
        x_train, y_train = sample_batch(device.bundle.manifest, batch, rng)
    start = time.perf_counter()
    x_train = device.inputs(x_train)
    prefix_ms = (time.perf_counter() - start) * 1e3 / len(x_train)  # per window; 0 for whole plans
    if x_test is not None:
        x_test = device.inputs(x_test)
        result["accuracy_before"] = device.accuracy(x_test, y_test)

        def draw() -> float:
            idx = rng.choice(len(x_train), batch, replace=len(x_train) < batch)
            return device.step(x_train[idx], y_train[idx])

        losses, ms = _timed(draw, spec["warmup"], spec["timed"])
        result["accuracy_after"] = device.accuracy(x_test, y_test)
        result["loss_curve"] = losses
    else:
        losses, ms = _timed(lambda: device.step(x_train, y_train), spec["warmup"], spec["timed"])
    result["peak_rss_mib"] = peak_rss_bytes() / MIB
    result["anon_rss_mib"] = anon_rss_bytes() / MIB  # the arena never shrinks: the anonymous peak as well
    result["ms_per_step"] = float(np.median(ms))
    result["ms_steps"] = ms
    if device.streamed:
        result["ms_per_step_cached"] = result["ms_per_step"]
        result["ms_per_step"] += batch * prefix_ms
        result["ms_prefix_per_window"] = prefix_ms
        result["peak_rss_with_cache_mib"] = result["peak_rss_mib"]
    return result


if __name__ == "__main__":
    print(json.dumps(main(json.loads(Path(sys.argv[1]).read_text()))))
