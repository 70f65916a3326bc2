"""Camera frames for image models (``NHWC`` bundles): one stored window per frame, every ``interval_s``.

Frames come from a V4L2 device (``/dev/video0``, or an index), a video file, or any capture URL OpenCV's
``VideoCapture`` opens (``rtsp://``, ``http://`` MJPEG, ...); with ``device`` unset, from the Raspberry Pi
camera through picamera2 when it is installed (Raspberry Pi OS ships it: ``apt install python3-picamera2``),
else ``/dev/video0``. Each frame is cropped to the model's aspect ratio (``crop = "center"``), resized to the
model's ``(H, W)``, turned into gray or RGB for 1 or 3 model channels, and scaled so that a full-scale pixel
(255) becomes ``full_scale``. The label comes from the ``collect`` request, as for the other sources.

A live camera keeps being read between stored frames, so the frame stored is the newest one, not one that
waited in the driver's queue; a video file is read as fast as it decodes and ends the source at its end.
OpenCV (extra ``camera``: ``opencv-python-headless``) and picamera2 are imported in :meth:`Source.setup`. A
device that is missing or stops delivering frames is a :class:`CameraError` (an ``OSError``): the collector
logs it with the device's name and sets the source up again with backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from device_app.schema import spec
from device_app.sources.base import Sample, SourceContext, SourceOptions
from device_app.sources.base import Source as BaseSource

log = logging.getLogger(__name__)
MODEL_CHANNELS = (1, 3)


@dataclass(frozen=True, kw_only=True)
class Options(SourceOptions):
    device: str | None = spec(
        None, doc="V4L2 device (/dev/video0), camera index (0), video file or capture URL; unset: the Pi "
                  "camera through picamera2 if installed, else /dev/video0")
    backend: str = spec("auto", doc="auto (picamera2 when device is unset and picamera2 is installed), "
                                    "opencv or picamera2", choices=["auto", "opencv", "picamera2"])
    camera_num: int = spec(0, doc="picamera2 camera number", min=0)
    capture_size: list[int] | None = spec(  # noqa: RUF009 - spec() copies list defaults
        None, doc="[width, height] to ask the camera for; default its own", min_len=2, max_len=2)
    interval_s: float = spec(1.0, doc="seconds between stored frames; 0 = every frame", min=0.0)
    crop: str = spec("center", doc="center: crop to the model's aspect ratio, then resize; none: stretch",
                     choices=["center", "none"])
    color: str = spec("rgb", doc="channel order for 3-channel models (1-channel models get gray)",
                      choices=["rgb", "bgr"])
    full_scale: float = spec(1.0, doc="what a full-scale pixel (255) becomes: 1.0 gives 0..1, 255.0 the raw "
                                      "values", min=0.0)


class CameraError(OSError):
    """The camera is missing, cannot be opened, or stopped delivering frames."""


class Capture(Protocol):
    """Where frames come from: ``(h, w, 3)`` BGR or ``(h, w)`` gray ``uint8`` arrays."""

    def frame_after(self, deadline: float, stop: threading.Event) -> np.ndarray | None:
        """The newest frame once ``time.monotonic()`` has passed ``deadline``; ``None`` at the end of a video
        file or when ``stop`` is set.

        Raises:
            CameraError: a live camera stopped delivering frames.
        """

    def close(self) -> None:
        """Release the camera."""


def _cv2() -> Any:
    try:
        import cv2  # optional dependency: imported when a camera source starts
    except ImportError as err:
        raise ImportError("the camera source needs OpenCV: pip install 'hosvd-edge[camera]' (or apt install "
                          "python3-opencv on Raspberry Pi OS)") from err
    return cv2


def _is_live(target: str | int) -> bool:
    """Devices and streams are live; a regular file is a recording with an end."""
    return not (isinstance(target, str) and Path(target).is_file())


class OpenCvCapture:
    """A ``cv2.VideoCapture``: a V4L2 device (by path or index), a video file or a URL.

    Args:
        target: device path, index, file or URL.
        name: the source's name, for messages.
        capture_size: ``(width, height)`` to ask for, or ``None``.

    Raises:
        CameraError: it cannot be opened (the message names it and, for a device path, why).
    """

    def __init__(self, target: str | int, name: str, capture_size: tuple[int, int] | None = None) -> None:
        cv2 = _cv2()
        self.target = target
        self.live = _is_live(target)
        if isinstance(target, str) and target.startswith("/dev/") and not Path(target).exists():
            raise CameraError(f"source {name}: camera {target} does not exist (is it plugged in? "
                              "`v4l2-ctl --list-devices` lists the cameras)")
        v4l2 = isinstance(target, int) or target.startswith("/dev/")
        self.cap = cv2.VideoCapture(target, cv2.CAP_V4L2) if v4l2 else cv2.VideoCapture(target)
        if not self.cap.isOpened():
            self.cap.release()
            hint = (" (busy, or not readable by this user: the video group, and DeviceAllow= under systemd)"
                    if v4l2 else "")
            raise CameraError(f"source {name}: cannot open camera {target}{hint}")
        if capture_size:
            self.cap.set(cv2.CAP_PROP_FRAME_WIDTH, capture_size[0])
            self.cap.set(cv2.CAP_PROP_FRAME_HEIGHT, capture_size[1])
        self.name = name

    def frame_after(self, deadline: float, stop: threading.Event) -> np.ndarray | None:
        # grab() without retrieve() only dequeues a buffer: keep draining the driver's queue until the
        # deadline so the frame decoded is the newest (grab blocks at the camera's frame rate: no spinning).
        while True:
            if stop.is_set():
                return None
            if not self.cap.grab():
                if not self.live:
                    return None
                raise CameraError(f"source {self.name}: camera {self.target} stopped delivering frames")
            if time.monotonic() >= deadline:
                break
        ok, frame = self.cap.retrieve()
        if not ok or frame is None:
            raise CameraError(f"source {self.name}: camera {self.target} returned no image")
        return frame

    def close(self) -> None:
        self.cap.release()


class Picamera2Capture:
    """The Raspberry Pi camera (libcamera) through picamera2, streaming ``RGB888`` (BGR order in memory, as
    OpenCV's) at ``capture_size`` or 640×480.

    Args:
        camera_num: which camera.
        name: the source's name, for messages.
        capture_size: ``(width, height)`` or ``None``.
        factory: builds the camera object (``picamera2.Picamera2``; a stand-in in tests).

    Raises:
        CameraError: no camera, or libcamera cannot start it.
    """

    def __init__(self, camera_num: int, name: str, capture_size: tuple[int, int] | None = None,
                 factory: Callable[[int], Any] | None = None) -> None:
        if factory is None:
            from picamera2 import Picamera2  # hardware library: imported at setup time only

            factory = Picamera2
        try:
            self.cam = factory(camera_num)
            size = tuple(capture_size) if capture_size else (640, 480)
            self.cam.configure(self.cam.create_video_configuration(main={"size": size, "format": "RGB888"}))
            self.cam.start()
        except (RuntimeError, IndexError) as err:  # what picamera2 raises for a missing or busy camera
            raise CameraError(f"source {name}: cannot start Pi camera {camera_num}: {err}") from err

    def frame_after(self, deadline: float, stop: threading.Event) -> np.ndarray | None:
        # libcamera keeps streaming; capture_array returns the next completed frame, so waiting is enough.
        if stop.wait(max(0.0, deadline - time.monotonic())):
            return None
        return self.cam.capture_array("main")

    def close(self) -> None:
        self.cam.stop()
        self.cam.close()


def center_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """The largest centred part of ``frame`` ``(h, w, ...)`` with the aspect ratio ``width / height``."""
    h, w = frame.shape[:2]
    if w * height > h * width:  # too wide
        keep = max(1, round(h * width / height))
        left = (w - keep) // 2
        return frame[:, left:left + keep]
    keep = max(1, round(w * height / width))
    top = (h - keep) // 2
    return frame[top:top + keep]


def fit_frame(frame: np.ndarray, shape: tuple[int, ...], crop: str, color: str, full_scale: float) -> np.ndarray:
    """One camera frame as the model's input.

    Args:
        frame: ``(h, w, 3)`` BGR or ``(h, w)`` gray ``uint8``.
        shape: the model's ``(H, W, C)``, ``C`` 1 or 3.
        crop: ``center`` or ``none``.
        color: ``rgb`` or ``bgr`` (3-channel models).
        full_scale: the value a pixel of 255 becomes.

    Returns:
        ``(H, W, C)`` float32. Resizing averages the source pixels under each output pixel (``INTER_AREA``)
        when shrinking, interpolates linearly when enlarging; gray is ``0.299 R + 0.587 G + 0.114 B``.
    """
    cv2 = _cv2()
    height, width, channels = shape
    if crop == "center":
        frame = center_crop(frame, height, width)
    x = np.ascontiguousarray(frame, dtype=np.float32)
    shrink = x.shape[0] >= height and x.shape[1] >= width
    x = cv2.resize(x, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if x.ndim == 2:
        x = x[:, :, None] if channels == 1 else cv2.cvtColor(x, cv2.COLOR_GRAY2RGB)
    elif channels == 1:
        x = cv2.cvtColor(x, cv2.COLOR_BGR2GRAY)[:, :, None]
    elif color == "rgb":
        x = cv2.cvtColor(x, cv2.COLOR_BGR2RGB)
    return (x * np.float32(full_scale / 255.0)).astype(np.float32)


class Source(BaseSource):
    """Yields one model input per ``interval_s`` from the capture."""

    options: Options
    layouts: ClassVar[tuple[str, ...]] = ("NHWC",)

    def __init__(self, options: Options, context: SourceContext,
                 picamera2_factory: Callable[[int], Any] | None = None) -> None:
        super().__init__(options, context)
        self.picamera2_factory = picamera2_factory
        self.capture: Capture | None = None

    def _use_picamera2(self) -> bool:
        opts = self.options
        if opts.backend != "auto":
            return opts.backend == "picamera2"
        if opts.device is not None:
            return False
        if self.picamera2_factory is not None:
            return True
        try:
            import picamera2  # noqa: F401 - only asking whether it is installed
        except ImportError:
            return False
        return True

    def setup(self) -> None:
        opts = self.options
        shape = self.context.shape
        if len(shape) != 3 or shape[-1] not in MODEL_CHANNELS:
            raise ValueError(f"source {opts.name}: a camera feeds (H, W, C) models with C in {MODEL_CHANNELS}; "
                             f"the bundle takes {list(shape)}")
        _cv2()  # fail now, with the install hint, rather than at the first frame
        size = tuple(opts.capture_size) if opts.capture_size else None
        if self._use_picamera2():
            self.capture = Picamera2Capture(opts.camera_num, opts.name, size, self.picamera2_factory)
            log.info("source %s: Pi camera %d through picamera2", opts.name, opts.camera_num)
        else:
            device = opts.device or "/dev/video0"
            target: str | int = int(device) if device.isdigit() else device
            self.capture = OpenCvCapture(target, opts.name, size)
            log.info("source %s: camera %s through OpenCV", opts.name, device)

    def samples(self, stop: threading.Event) -> Iterator[Sample]:
        assert self.capture is not None, "setup() first"
        opts = self.options
        next_at = time.monotonic()
        while not stop.is_set():
            frame = self.capture.frame_after(next_at, stop)
            if frame is None:
                return
            next_at = time.monotonic() + opts.interval_s
            yield Sample(time.time(), fit_frame(frame, self.context.shape, opts.crop, opts.color,
                                                opts.full_scale), opts.label)

    def cleanup(self) -> None:
        if self.capture is not None:
            self.capture.close()
            self.capture = None
