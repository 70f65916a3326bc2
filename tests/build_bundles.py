"""Small bundles the device tests train, built once with the converter.

``python -m tests.build_bundles OUT_DIR`` writes ``OUT_DIR/<name>/`` for each entry of :data:`BUNDLES` (skipping
those already there with a matching spec), so the legacy-runtime test run (no TensorFlow) can use them.

The IMU model reads windows of 32 samples × 3 accelerometer axes at 50 Hz (layout NLC) and tells 3 classes. The
image model reads 64×64×3 float32 images (48 KiB each, layout NHWC): large windows for the store-size tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

IMU_SHAPE = (32, 3)
IMU_LABELS = ["idle", "walk", "shake"]
IMU_CHANNELS = ["ax", "ay", "az"]

IMAGE_SHAPE = (64, 64, 3)

BUNDLES: dict[str, dict] = {
    "imu_hosvd": dict(compression="hosvd", epsilon=0.9, batch_sizes=(8, 4), learning_rate=0.05),
    "imu_none": dict(compression="none", batch_sizes=(8,), learning_rate=0.05),
    "image_hosvd": dict(model="image", compression="hosvd", epsilon=0.9, batch_sizes=(8,), learning_rate=0.05),
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


def image_model(seed: int = 0):
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inp = keras.Input(IMAGE_SHAPE, name="image")
    h = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv_a")(inp)
    h = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="conv_b")(h)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    out = layers.Dense(len(IMU_LABELS), activation="softmax", name="head")(h)
    return keras.Model(inp, out, name="image_cnn")


MODELS = {  # model function, train_last, input spec
    "imu": (imu_model, 3, dict(layout="NLC", channels=IMU_CHANNELS, rate_hz=50.0)),
    "image": (image_model, 2, dict(layout="NHWC")),
}


def build(out_dir: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Build the named bundles (default: all) under ``out_dir``; returns name -> bundle directory."""
    from converter.convert import convert

    out_dir = Path(out_dir)
    built = {}
    for name in names or list(BUNDLES):
        options = dict(BUNDLES[name])
        target = out_dir / name
        stamp = target / "build-spec.json"
        spec = json.dumps(options, sort_keys=True)
        model, train_last, input_spec = MODELS[options.pop("model", "imu")]
        if not (stamp.exists() and stamp.read_text() == spec):
            convert(model(), target, train_last=train_last, optimizer="sgd", labels=IMU_LABELS,
                    input_spec=input_spec, **options)
            stamp.write_text(spec)
        built[name] = target
    return built


if __name__ == "__main__":
    for bundle_name, path in build(sys.argv[1]).items():
        print(f"{bundle_name}: {path}")
