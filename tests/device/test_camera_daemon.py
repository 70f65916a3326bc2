"""An image bundle on the real daemon fed by camera sources: two recorded clips (dark and bright scenes)
collected with labels through `collect` requests over a real Mosquitto, then trained over MQTT."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="the camera extra (opencv-python-headless) is not installed")

pytestmark = pytest.mark.needs_tf  # the image bundle is converted here (the shared test bundles are IMU ones)
LABELS = ["dark", "bright"]
FRAMES = 24


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small 8×8×3 classifier, conv + dense trained, no compression (the fastest to convert)."""
    import keras
    from keras import layers

    from converter.convert import convert

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3), name="image")
    h = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    out = layers.Dense(len(LABELS), activation="softmax", name="head")(h)
    target = tmp_path_factory.mktemp("image") / "img_none"
    convert(keras.Model(inp, out), target, train_last=2, compression="none", batch_sizes=(4,),
            learning_rate=0.5, labels=LABELS, input_spec={"layout": "NHWC"}, measure_memory=False)
    return target


def _clip(path: Path, level: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 10.0, (32, 24))
    for _ in range(FRAMES):
        writer.write(np.clip(rng.normal(level, 20, (24, 32, 3)), 0, 255).astype(np.uint8))
    writer.release()
    return path


def test_camera_windows_train_an_image_bundle(broker, client_factory, device_factory, image_bundle: Path,
                                               tmp_path: Path) -> None:
    dark, bright = _clip(tmp_path / "dark.avi", 40, 1), _clip(tmp_path / "bright.avi", 210, 2)
    sources = [{"type": "camera", "name": "cam_dark", "device": str(dark), "interval_s": 0.0, "autostart": False},
               {"type": "camera", "name": "cam_bright", "device": str(bright), "interval_s": 0.0,
                "autostart": False}]
    dev = device_factory(broker.port, sources=sources, model={"bundle": "img_none"},
                         store={"val_fraction": 0.25}, training={"steps": 60, "progress_every": 10})
    shutil.copytree(image_bundle, dev.state_dir / "bundles" / "img_none")
    dev.start()
    cl = client_factory(broker.port)
    cl.wait("status", lambda p: p.get("state") == "idle" and p.get("bundle") == "img_none", timeout=60)
    for label, source in zip(LABELS, ("cam_dark", "cam_bright"), strict=True):
        answer = cl.request("collect", {"action": "start", "sources": [source], "label": label})
        assert answer["status"] == "ok", answer
        cl.wait("status", lambda p, label=label: sum(p["samples"]["by_label"].get(label, {}).values()) == FRAMES
                and not p["collecting"], timeout=30)
    status = cl.request("status")["data"]
    assert status["samples"]["by_label"] == {"dark": {"train": 18, "val": 6}, "bright": {"train": 18, "val": 6}}

    answer = cl.request("train", {"transaction": "img"})
    assert answer["status"] == "ok", answer
    report = cl.wait("report", lambda p: p.get("transaction") == "img", timeout=120)
    assert report["status"] == "ok", report
    assert report["n_train"] == 36 and report["n_val"] == 12
    assert report["final_loss"] < report["first_loss"]
    assert report["val_after"]["accuracy"] == 1.0, report["val_after"]
