"""Memory of a bundle's training step on this machine's runtime, in a fresh process, through the device's own step.

``python -m device_app.measure BUNDLE_DIR --batch-size 32 --mode streamed --micro-batch 1`` loads the bundle as the
training child does (:class:`~device_app.bundle.Bundle` for that mode), runs ``--steps`` steps of
:mod:`device_app.steps` on seeded inputs of the manifest's shape, and prints one JSON line::

    {"base_rss_bytes": …, "peak_rss_bytes": …, "anon_rss_bytes": …, "base_anon_rss_bytes": …, "runtime": …}

``base`` is right after loading (before any signature ran), ``peak`` the process's high-water mark (VmHWM),
``anon`` the anonymous resident memory after the steps (the arena never shrinks, so it is the anonymous peak too).
A ``streamed`` run computes the batch's prefix features first (a prefix interpreter freed afterwards), then steps
``train_features`` on them, as the training loop does with its feature cache (:meth:`device_app.dataset.
BatchReader.prefetch`). The converter records these in the manifest's memory plan; it imports nothing of
TensorFlow.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from device_app.bundle import Bundle
from device_app.memory import anon_rss_bytes, peak_rss_bytes, rss_bytes
from device_app.runtime import runtime_name
from device_app.steps import MODES, train_step, train_step_on_features
from hosvd_contract import Manifest


def sample_batch(manifest: Manifest, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Seeded inputs and labels of the bundle's shapes (class ids for classification, floats for regression)."""
    x = rng.random((batch, *manifest.input.shape), dtype=np.float32)
    if manifest.task == "classification":
        return x, rng.integers(0, len(manifest.labels), batch).astype(np.int32)
    return x, rng.random((batch, *manifest.output_shape), dtype=np.float32)


def measure_steps(bundle_dir: str | Path, batch_size: int, mode: str, micro_batch: int, steps: int = 1,
                  threads: int = 2, seed: int = 0) -> dict[str, object]:
    """Load the bundle, run ``steps`` train steps, and return the memory figures (bytes)."""
    bundle = Bundle(bundle_dir, threads, mode)
    base, base_anon = rss_bytes(), anon_rss_bytes()
    rng = np.random.default_rng(seed)
    x, y = sample_batch(bundle.manifest, batch_size, rng)
    if mode == "streamed":  # as the training loop does: every window's features first (cached), then the steps
        features = bundle.features(x, micro_batch)
        del x  # the loop holds no raw windows then either
        for _ in range(steps):
            train_step_on_features(bundle, features, y)
    else:
        for _ in range(steps):
            train_step(bundle, x, y, mode, micro_batch)
    return {"base_rss_bytes": base, "peak_rss_bytes": peak_rss_bytes(), "base_anon_rss_bytes": base_anon,
            "anon_rss_bytes": anon_rss_bytes(), "runtime": runtime_name()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device_app.measure", description=__doc__.split("\n")[0])
    parser.add_argument("bundle", help="bundle directory (manifest.json + model.tflite)")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(measure_steps(args.bundle, args.batch_size, args.mode, args.micro_batch, args.steps,
                                   args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
