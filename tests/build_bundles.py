"""Small bundles the device tests train, built once with the converter.

``python -m tests.build_bundles OUT_DIR`` writes ``OUT_DIR/<name>/`` for each entry of :data:`BUNDLES` (skipping
those already there with a matching spec), so the legacy-runtime test run (no TensorFlow) can use them.

The IMU model reads windows of 32 samples × 3 accelerometer axes at 50 Hz (layout NLC) and tells 3 classes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

IMU_SHAPE = (32, 3)
IMU_LABELS = ["idle", "walk", "shake"]
IMU_CHANNELS = ["ax", "ay", "az"]

BUNDLES: dict[str, dict] = {
    "imu_hosvd": dict(compression="hosvd", epsilon=0.9, batch_sizes=(8, 4), learning_rate=0.05),
    "imu_none": dict(compression="none", batch_sizes=(8,), learning_rate=0.05),
    # The other two methods, for the x86/aarch64 parity check (tests/arm64): no memory measurement needed.
    "imu_svd": dict(compression="svd", epsilon=0.9, batch_sizes=(8,), learning_rate=0.05, measure_memory=False),
    "imu_asi": dict(compression="asi", epsilon=0.9, batch_sizes=(8,), learning_rate=0.05, measure_memory=False),
}


def imu_model(seed: int = 0):
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inp = keras.Input(IMU_SHAPE, name="window")
    h = layers.Conv1D(8, 5, padding="same", activation="relu", name="conv_a")(inp)
    h = layers.MaxPooling1D(2, name="pool_a")(h)
    h = layers.Conv1D(12, 3, padding="same", name="conv_b")(h)
    h = layers.BatchNormalization(name="bn_b")(h)
    h = layers.ReLU(name="relu_b")(h)
    h = layers.Conv1D(12, 3, padding="same", activation="relu", name="conv_c")(h)
    h = layers.GlobalAveragePooling1D(name="gap")(h)
    out = layers.Dense(len(IMU_LABELS), activation="softmax", name="head")(h)
    return keras.Model(inp, out, name="imu_cnn")


def build(out_dir: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Build the named bundles (default: all) under ``out_dir``; returns name -> bundle directory."""
    from converter.convert import convert

    out_dir = Path(out_dir)
    built = {}
    for name in names or list(BUNDLES):
        options = BUNDLES[name]
        target = out_dir / name
        stamp = target / "build-spec.json"
        spec = json.dumps(options, sort_keys=True)
        if not (stamp.exists() and stamp.read_text() == spec):
            convert(imu_model(), target, train_last=3, optimizer="sgd", labels=IMU_LABELS,
                    input_spec=dict(layout="NLC", channels=IMU_CHANNELS, rate_hz=50.0), **options)
            stamp.write_text(spec)
        built[name] = target
    return built


if __name__ == "__main__":
    for bundle_name, path in build(sys.argv[1]).items():
        print(f"{bundle_name}: {path}")
