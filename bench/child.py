"""The device side of one benchmark run, in a fresh process: ``python -m bench.child SPEC.json``.

Imports only numpy and ai-edge-litert (never TensorFlow), so its peak RSS is what a device process would see.
Prints one JSON line with the figures. The spec (written by :mod:`bench.runner`) says:

- ``model_path``, ``threads``, ``batch_size``, ``micro_batch``, ``input_shape``, ``classes``, ``seed``;
- ``plan``: ``whole`` runs ``train`` on the whole batch through the whole model (the TFLite-recipe way);
  ``streamed`` runs ``features`` on micro-batches, then ``train_features`` on the whole batch;
- ``train``/``train_features``: the signature keys for that batch size;
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

MIB = float(1 << 20)


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class Device:
    """The interpreter and the steps of one plan.

    Args:
        spec: the run spec (see the module docstring).
    """

    def __init__(self, spec: dict) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.spec = spec
        self.interpreter = Interpreter(model_path=spec["model_path"], num_threads=spec.get("threads", 2))
        self._runners: dict[str, Callable] = {}

    def run(self, key: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        if key not in self._runners:
            self._runners[key] = self.interpreter.get_signature_runner(key)
        return self._runners[key](**inputs)

    def features(self, x: np.ndarray) -> np.ndarray:
        """Frozen-prefix output ``(N, ...)``, ``micro_batch`` samples per invoke."""
        parts = [self.run("features", x=x[s])["features"] for s in _chunks(len(x), self.spec["micro_batch"])]
        return np.concatenate(parts)

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One train step of the plan on a whole batch; returns the loss."""
        if self.spec["plan"] == "whole":
            return float(self.run(self.spec["train"], x=x, y=y)["loss"])
        return self.cached_step(self.features(x), y)

    def cached_step(self, feats: np.ndarray, y: np.ndarray) -> float:
        """One ``train_features`` step on precomputed prefix features."""
        return float(self.run(self.spec["train_features"], features=feats, y=y)["loss"])

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """Top-1 accuracy over ``x`` in chunks of the train batch, through the plan's signatures."""
        correct = 0.0
        for s in _chunks(len(x), self.spec["batch_size"]):
            if self.spec["plan"] == "whole":
                out = self.run("evaluate", x=x[s], y=y[s])
            else:
                out = self.run("evaluate_features", features=self.features(x[s]), y=y[s])
            correct += float(out["correct"])
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
    base = status_bytes("VmRSS")
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
        x_train = rng.random((batch, *spec["input_shape"]), dtype=np.float32)
        y_train = rng.integers(0, spec["classes"], batch).astype(np.int32)
        losses, ms = _timed(lambda: device.step(x_train, y_train), spec["warmup"], spec["timed"])
    result["peak_rss_mib"] = status_bytes("VmHWM") / MIB
    result["ms_per_step"] = float(np.median(ms))
    result["ms_steps"] = ms
    if spec["plan"] == "streamed" and spec.get("cached_steps", 0) > 0:
        idx = np.arange(batch) % len(x_train)
        feats, y = device.features(x_train[idx]), y_train[idx]
        _, cached = _timed(lambda: device.cached_step(feats, y), 1, spec["cached_steps"])
        result["ms_per_step_cached"] = float(np.median(cached))
        result["peak_rss_with_cache_mib"] = status_bytes("VmHWM") / MIB
    return result


if __name__ == "__main__":
    print(json.dumps(main(json.loads(Path(sys.argv[1]).read_text()))))
