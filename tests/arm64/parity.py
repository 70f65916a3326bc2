"""Train the parity bundles a few steps on this machine and print what another architecture must reproduce.

``python -m tests.arm64.parity BUNDLES_DIR`` prints one JSON line: the machine, the runtime, and per bundle and
plan mode (``whole``, then ``streamed`` after ``set_weights`` put the start back, as a checkpoint restore does) the
losses of :data:`STEPS` steps on seeded batches and every variable after them (trainable weights, optimizer and
compression state). Steps go through :func:`device_app.steps.train_step`, the device's own step, with one thread
so no reduction order depends on the thread count. ``test_parity.py`` runs it on x86 and on aarch64.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from device_app import steps
from device_app.bundle import Bundle
from device_app.runtime import runtime_name

PARITY_BUNDLES = ("imu_none", "imu_svd", "imu_hosvd", "imu_asi")
MODES = ("whole", "streamed")
STEPS = 5
MICRO_BATCH = 2
LEARNING_RATE = 0.05


def train(bundle_dir: Path, steps_per_mode: int = STEPS) -> dict[str, Any]:
    """Per mode: losses and final variables of ``steps_per_mode`` seeded steps from the bundle's start."""
    bundle = Bundle(bundle_dir, num_threads=1)
    manifest = bundle.manifest
    batch = manifest.default_batch_size
    rng = np.random.default_rng(0)
    xs = rng.normal(0.0, 1.0, (steps_per_mode, batch, *manifest.input.shape)).astype(np.float32)
    ys = rng.integers(0, len(manifest.labels), (steps_per_mode, batch)).astype(np.int32)
    start = bundle.get_weights()
    result: dict[str, Any] = {"inputs_sha256": hashlib.sha256(xs.tobytes() + ys.tobytes()).hexdigest()}
    for mode in MODES:
        bundle.set_weights(start)
        bundle.set_learning_rate(LEARNING_RATE)
        losses = [steps.train_step(bundle, x, y, mode, MICRO_BATCH)[0] for x, y in zip(xs, ys, strict=True)]
        trained = bundle.get_weights()
        result[mode] = {
            "losses": losses,
            "weights": {name: np.asarray(v, np.float64).ravel().tolist() for name, v in trained.items()},
            # how far training moved the kernels: a parity of weights that never moved would prove nothing
            "kernels_moved": max(float(np.max(np.abs(trained[w.name] - start[w.name])))
                                 for w in manifest.weights if w.role == "kernel"),
        }
    return result


def main(bundles_dir: str) -> dict[str, Any]:
    root = Path(bundles_dir)
    return {
        "machine": platform.machine(),
        "runtime": runtime_name(),
        "numpy": np.__version__,
        "bundles": {name: train(root / name) for name in PARITY_BUNDLES},
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
