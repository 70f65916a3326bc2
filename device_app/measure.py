"""Memory of a bundle's training step on this machine's runtime, in a fresh process, through the device's own step.

``python -m device_app.measure BUNDLE_DIR --batch-size 32 --mode streamed --micro-batch 1`` loads the bundle as the
training child does (:class:`~device_app.bundle.Bundle` for that mode), runs ``--steps`` steps of
:mod:`device_app.steps` on seeded inputs of the manifest's shape, and prints one JSON line::

    {"base_rss_bytes": …, "peak_rss_bytes": …, "anon_rss_bytes": …, "base_anon_rss_bytes": …, "runtime": …}

``base`` is right after loading (before any signature ran), ``peak`` the process's high-water mark (VmHWM),
``anon`` the anonymous resident memory after the steps (the arena never shrinks, so it is the anonymous peak too).
A ``streamed`` run computes the batch's prefix features first, a few windows at a time on a prefix interpreter freed
afterwards, then steps ``train_features`` on them, as the training loop does with its feature cache
(:meth:`device_app.dataset.BatchReader.prefetch`). The converter records these in the manifest's memory plan;
it imports nothing of TensorFlow.
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


def streamed_features(bundle: Bundle, batch: int, micro_batch: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Prefix features and labels of a seeded batch, the raw windows made and pushed through the prefix
    :meth:`~device_app.bundle.Bundle.prefix_chunk` at a time, as the training loop's prefetch reads them from
    the store (:meth:`device_app.dataset.BatchReader.prefetch`)."""
    chunk = bundle.prefix_chunk(micro_batch)
    parts, labels = [], []
    with bundle.prefix(micro_batch) as features:
        for start in range(0, batch, chunk):
            x, y = sample_batch(bundle.manifest, min(chunk, batch - start), rng)
            parts.append(features(x))
            labels.append(y)
    return np.concatenate(parts), np.concatenate(labels)


def measure_steps(bundle_dir: str | Path, batch_size: int, mode: str, micro_batch: int, steps: int = 1,
                  threads: int = 2, seed: int = 0) -> dict[str, object]:
    """Load the bundle, run ``steps`` train steps, and return the memory figures (bytes)."""
    bundle = Bundle(bundle_dir, threads, mode)
    base, base_anon = rss_bytes(), anon_rss_bytes()
    rng = np.random.default_rng(seed)
    if mode == "streamed":  # as the training loop does: every window's features first (cached), then the steps
        features, y = streamed_features(bundle, batch_size, micro_batch, rng)
        for _ in range(steps):
            train_step_on_features(bundle, features, y)
    else:
        x, y = sample_batch(bundle.manifest, batch_size, rng)
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
