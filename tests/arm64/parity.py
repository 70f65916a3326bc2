"""Train the parity bundles a few steps on this machine and print what another architecture must reproduce.

``python -m tests.arm64.parity BUNDLES_DIR`` prints one JSON line: the machine, the runtime, and per bundle the
losses of :data:`STEPS` training steps on seeded batches, every variable after them (trainable weights, optimizer
and compression state), and the loss of the first step again after ``set_weights`` put the start back (what a
checkpoint restore does). It goes through :class:`device_app.bundle.Bundle`, the device's own code path, with one
thread so no reduction order depends on the thread count. ``test_parity.py`` runs it on x86 and on aarch64.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from device_app.bundle import Bundle
from device_app.runtime import runtime_name

PARITY_BUNDLES = ("imu_none", "imu_svd", "imu_hosvd", "imu_asi")
STEPS = 5
LEARNING_RATE = 0.05


def train(bundle_dir: Path, steps: int = STEPS) -> dict[str, Any]:
    """Losses, final variables and the restored first loss of ``steps`` seeded steps on one bundle."""
    bundle = Bundle(bundle_dir, num_threads=1)
    manifest = bundle.manifest
    batch = manifest.default_batch_size
    rng = np.random.default_rng(0)
    xs = rng.normal(0.0, 1.0, (steps, batch, *manifest.input.shape)).astype(np.float32)
    ys = rng.integers(0, len(manifest.labels), (steps, batch)).astype(np.int32)
    start = bundle.get_weights()
    bundle.set_learning_rate(LEARNING_RATE)
    losses = [bundle.train_step(x, y)[0] for x, y in zip(xs, ys, strict=True)]
    trained = bundle.get_weights()
    bundle.set_weights(start)
    bundle.set_learning_rate(LEARNING_RATE)
    restored = bundle.train_step(xs[0], ys[0])[0]
    return {
        "inputs_sha256": hashlib.sha256(xs.tobytes() + ys.tobytes()).hexdigest(),
        "losses": losses,
        "restored_loss": restored,
        "weights": {name: np.asarray(value, np.float64).ravel().tolist() for name, value in trained.items()},
        # how far training moved the kernels: a parity of weights that never moved would prove nothing
        "kernels_moved": max(float(np.max(np.abs(trained[w.name] - start[w.name])))
                             for w in manifest.weights if w.role == "kernel"),
    }


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
