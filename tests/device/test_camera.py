"""The camera source: frames from a video file the test writes with OpenCV (the same VideoCapture path a V4L2
device or a capture URL takes) into a real store, cropped and resized to the bundle's input; the Pi camera
through a stand-in with picamera2's interface; a missing device named and retried with backoff."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from device_app import collector as collector_module
from device_app.collector import Collector
from device_app.sources import make_source, options_class
from device_app.sources.base import SourceContext
from device_app.sources.camera import CameraError, Source, center_crop
from device_app.store import Store
from device_app.windowing import check_sources_fit
from hosvd_contract import BundleError, InputSpec

cv2 = pytest.importorskip("cv2", reason="the camera extra (opencv-python-headless) is not installed")

FRAME_H, FRAME_W = 48, 64


def _options(**kw: object):
    return options_class("camera")(**{"type": "camera", "name": "cam", **kw})


def _context(shape: tuple[int, int, int]) -> SourceContext:
    return SourceContext.for_input(InputSpec(shape=list(shape), layout="NHWC"))


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (FRAME_H, FRAME_W, 3), dtype=np.uint8) for _ in range(n)]


def _write_video(path: Path, frames: list[np.ndarray]) -> Path:
    """A lossless (FFV1) video, so the frames read back are exactly the ones written."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 10.0, (FRAME_W, FRAME_H))
    assert writer.isOpened(), "OpenCV cannot write FFV1 here"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def _block_mean(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Mean over non-overlapping rows × cols blocks of (h, w, c): what area resizing by whole factors does."""
    h, w, c = x.shape
    return x.reshape(h // rows, rows, w // cols, cols, c).mean(axis=(1, 3))


def _collect(tmp_path: Path, opts, shape: tuple[int, int, int], label: str) -> np.ndarray:
    store = Store(tmp_path / "store.sqlite", val_fraction=0.0)
    collector = Collector([opts], _context(shape), shape[0], store)
    collector.start(label=label)
    deadline = time.monotonic() + 30
    while collector.active() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not collector.active(), "the video did not end the source"
    x = store.windows(store.split_index("train", [label]).ids)
    store.close()
    return x


def test_camera_fills_the_store_with_frames_cropped_and_resized_to_the_bundle_input(tmp_path: Path) -> None:
    frames = _frames(6)
    video = _write_video(tmp_path / "clip.avi", frames)
    stored = _collect(tmp_path, _options(device=str(video), interval_s=0.0), (8, 8, 3), label="cat")
    assert stored.shape == (6, 8, 8, 3) and stored.dtype == np.float32
    for got, frame in zip(stored, frames, strict=True):
        square = frame[:, 8:56].astype(np.float64)  # 64×48 centre-cropped to 48×48, then 6×6 -> 1 pixel
        expected = _block_mean(square, 6, 6)[:, :, ::-1] / 255.0  # BGR -> RGB, 0..1
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_gray_model_without_crop_stretches_the_whole_frame(tmp_path: Path) -> None:
    frames = _frames(3, seed=1)
    video = _write_video(tmp_path / "clip.avi", frames)
    opts = _options(device=str(video), interval_s=0.0, crop="none", full_scale=255.0)
    stored = _collect(tmp_path, opts, (6, 4, 1), label="dog")
    assert stored.shape == (3, 6, 4, 1)
    for got, frame in zip(stored, frames, strict=True):
        b, g, r = np.moveaxis(_block_mean(frame.astype(np.float64), 8, 16), -1, 0)
        np.testing.assert_allclose(got[:, :, 0], 0.299 * r + 0.587 * g + 0.114 * b, rtol=0, atol=2e-3)


def test_center_crop_keeps_the_models_aspect_ratio() -> None:
    frame = np.zeros((480, 640, 3))
    assert center_crop(frame, 8, 8).shape == (480, 480, 3)
    assert center_crop(frame, 10, 40).shape == (160, 640, 3)


class FakePicamera2:
    """Stands in for picamera2.Picamera2 (the calls the source makes), streaming numbered BGR frames."""

    instances: ClassVar[list[FakePicamera2]] = []

    def __init__(self, camera_num: int) -> None:
        if camera_num != 0:
            raise IndexError("list index out of range")  # what picamera2 raises for a camera that is not there
        self.config: dict | None = None
        self.started = self.closed = False
        self.captured = 0
        FakePicamera2.instances.append(self)

    def create_video_configuration(self, main: dict) -> dict:
        return {"main": dict(main)}

    def configure(self, config: dict) -> None:
        self.config = config

    def start(self) -> None:
        self.started = True

    def capture_array(self, name: str = "main") -> np.ndarray:
        assert self.started and name == "main"
        self.captured += 1
        w, h = self.config["main"]["size"]
        return np.full((h, w, 3), (self.captured, 2 * self.captured, 3 * self.captured), dtype=np.uint8)

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        self.closed = True


def test_pi_camera_through_picamera2_at_the_configured_interval() -> None:
    FakePicamera2.instances.clear()
    opts = _options(interval_s=0.05, capture_size=[32, 24])  # device unset: the Pi camera when available
    src = Source(opts, _context((4, 4, 3)), picamera2_factory=FakePicamera2)
    src.setup()
    cam = FakePicamera2.instances[0]
    assert cam.config == {"main": {"size": (32, 24), "format": "RGB888"}}
    stop = threading.Event()
    samples = []
    for sample in src.samples(stop):
        samples.append(sample)
        if len(samples) == 4:
            stop.set()
    src.cleanup()
    assert cam.closed and not cam.started
    firsts = np.array([s.values[0, 0] for s in samples])
    np.testing.assert_allclose(firsts, [[3 * k / 255, 2 * k / 255, k / 255] for k in (1, 2, 3, 4)], rtol=1e-6)
    gaps = np.diff([s.t for s in samples])
    assert (gaps >= 0.045).all(), gaps  # one frame per interval, not one per camera frame


def test_missing_pi_camera_is_a_camera_error() -> None:
    src = Source(_options(backend="picamera2", camera_num=3), _context((4, 4, 3)), picamera2_factory=FakePicamera2)
    with pytest.raises(CameraError, match="source cam: cannot start Pi camera 3"):
        src.setup()


def test_missing_device_is_named_and_retried_with_backoff(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(collector_module, "RETRY_MIN_S", 0.05)
    missing = "/dev/video-hosvd-test-missing"
    store = Store(tmp_path / "store.sqlite")
    collector = Collector([_options(device=missing)], _context((8, 8, 3)), 8, store)
    with caplog.at_level(logging.ERROR, logger="device_app.collector"):
        collector.start()
        deadline = time.monotonic() + 10
        while len([r for r in caplog.records if missing in r.getMessage()]) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        collector.stop()
    failures = [r for r in caplog.records if missing in r.getMessage()]
    assert len(failures) >= 4, [r.getMessage() for r in caplog.records]
    assert f"source cam failed: source cam: camera {missing} does not exist" in failures[0].getMessage()
    assert "retrying in" in failures[0].getMessage()
    gaps = np.diff([r.created for r in failures[:4]])
    assert (gaps >= np.array([0.05, 0.1, 0.2]) * 0.9).all(), gaps  # 0.05 s doubling
    assert store.counts()["total"] == 0
    store.close()


def test_a_device_that_is_not_a_camera_says_so() -> None:
    src = make_source(_options(device="/dev/null"), _context((8, 8, 3)))
    with pytest.raises(CameraError, match=r"cannot open camera /dev/null \(busy, or not readable"):
        src.setup()


def test_camera_needs_an_image_bundle_and_sensors_a_window_bundle() -> None:
    image = InputSpec(shape=[8, 8, 3], layout="NHWC")
    window = InputSpec(shape=[32, 3], layout="NLC", rate_hz=50.0)
    check_sources_fit([_options()], image, "digits")
    with pytest.raises(BundleError, match=r"\[\[sources\]\] cam \(camera\) feeds NHWC models; the bundle takes "
                                          r"NLC input \[32, 3\]"):
        check_sources_fit([_options()], window, "imu")
    synthetic = options_class("synthetic")(type="synthetic", name="synth")
    with pytest.raises(BundleError, match=r"synth \(synthetic\) feeds NLC models"):
        check_sources_fit([synthetic], image, "digits")


def test_a_model_with_other_than_1_or_3_channels_is_refused() -> None:
    src = make_source(_options(device="/dev/null"), _context((8, 8, 2)))
    with pytest.raises(ValueError, match=r"a camera feeds \(H, W, C\) models with C in \(1, 3\); the bundle "
                                         r"takes \[8, 8, 2\]"):
        src.setup()


def test_without_opencv_the_error_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    src = make_source(_options(device="/dev/video0"), _context((8, 8, 3)))
    with pytest.raises(ImportError, match=r"pip install 'hosvd-edge\[camera\]'"):
        src.setup()
