"""Small bundles the device tests train, built once with the converter.

``python -m tests.build_bundles OUT_DIR`` writes ``OUT_DIR/<name>/`` for each entry of :data:`BUNDLES`, so the
legacy-runtime test run (no TensorFlow) can use them. Each bundle carries a ``build-spec.json`` stamp of its
options and of a hash of the sources that shape it (``converter/``, ``hosvd_contract/`` and this file); a bundle
is rebuilt when its stamp no longer matches, so the tests never train what an older converter built.

The IMU model reads windows of 32 samples × 3 accelerometer axes at 50 Hz (layout NLC) and tells 3 classes. The
image model reads 64×64×3 float32 images (48 KiB each, layout NHWC): large windows for the store-size tests.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("converter", "hosvd_contract", "tests/build_bundles.py")
STAMP = "build-spec.json"

IMU_SHAPE = (32, 3)
IMU_LABELS = ["idle", "walk", "shake"]
IMU_CHANNELS = ["ax", "ay", "az"]
IMAGE_SHAPE = (64, 64, 3)

# name -> convert() options on top of the IMU model's, or of the one ``model`` names in MODELS (add an entry for a
# new test bundle).
BUNDLES: dict[str, dict] = {
    # what the device tests train
    "imu_hosvd": dict(compression="hosvd", epsilon=0.9, batch_sizes=(8, 4), learning_rate=0.05),
    # a second, different bundle: the deploy tests push it to a running daemon and have it reload
    "imu_none": dict(compression="none", batch_sizes=(8,), learning_rate=0.05),
    # The other two methods, for the x86/aarch64 parity check (tests/arm64): no memory measurement needed.
    "imu_svd": dict(compression="svd", epsilon=0.9, batch_sizes=(8,), learning_rate=0.05, measure_memory=False),
    "imu_asi": dict(compression="asi", epsilon=0.9, batch_sizes=(8,), learning_rate=0.05, measure_memory=False),
    # 48 KiB windows: the training child's memory at 100 to 10,000 stored windows (test_store_scale)
    "image_hosvd": dict(model="image", compression="hosvd", epsilon=0.9, batch_sizes=(8,), learning_rate=0.05),
}


def source_digest(root: Path = REPO) -> str:
    """sha256 over the path and bytes of every file under :data:`SOURCES` (``__pycache__`` left out)."""
    digest = hashlib.sha256()
    for entry in SOURCES:
        base = root / entry
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*")
                                                     if p.is_file() and "__pycache__" not in p.parts)
        for path in files:
            digest.update(f"{path.relative_to(root)}\0".encode())
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_spec(name: str, root: Path = REPO) -> str:
    """The stamp a fresh bundle ``name`` carries: its options and the source digest."""
    return json.dumps({"options": BUNDLES[name], "sources": source_digest(root)}, sort_keys=True)


def stale(out_dir: str | Path, root: Path = REPO) -> list[str]:
    """Names of :data:`BUNDLES` under ``out_dir`` that are missing or were built from other options or sources."""
    out_dir = Path(out_dir)
    return [name for name in BUNDLES
            if not (out_dir / name / STAMP).is_file() or (out_dir / name / STAMP).read_text() != build_spec(name, root)]


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


def build(out_dir: str | Path) -> dict[str, Path]:
    """Build every bundle of :data:`BUNDLES` under ``out_dir`` whose stamp is stale; returns name -> directory."""
    from converter.convert import convert

    out_dir = Path(out_dir)
    for name in stale(out_dir):
        target = out_dir / name
        (target / STAMP).unlink(missing_ok=True)
        options = dict(BUNDLES[name])
        model, train_last, input_spec = MODELS[options.pop("model", "imu")]
        keras_model = model()
        calibration = None
        if options.get("compression", "hosvd") != "none":  # seeded representative inputs size the static ranks
            shape = tuple(keras_model.input_shape[1:])
            calibration = np.random.default_rng(0).standard_normal((32, *shape)).astype(np.float32)
        convert(keras_model, target, train_last=train_last, optimizer="sgd", labels=IMU_LABELS,
                input_spec=input_spec, calibration_data=calibration, **options)
        (target / STAMP).write_text(build_spec(name))
    return {name: out_dir / name for name in BUNDLES}


if __name__ == "__main__":
    for bundle_name, path in build(sys.argv[1]).items():
        print(f"{bundle_name}: {path}")
