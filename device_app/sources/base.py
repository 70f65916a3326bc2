"""The interface every sensor source implements, and the options every ``[[sources]]`` table shares."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from device_app.schema import spec
from hosvd_contract import InputSpec


@dataclass(frozen=True)
class Sample:
    """One reading: ``t`` in seconds, one value per model channel, an optional label.

    ``t`` is ``None`` when the source has no sampling time for it (a CSV without a ``timestamp`` column):
    such samples cannot be resampled (:mod:`device_app.resample`). A frame source (a camera, for ``NHWC``
    models) puts a whole model input in ``values``: an ``(H, W, C)`` array.

    ``mark`` is set by sources that can resume (CSV replay): ``(key, n)`` says that with this sample ``n`` rows
    of the input ``key`` have been read. The collector saves the marks of a window's samples with the window,
    and the source skips that many rows when it starts again (:attr:`SourceContext.resume_from`).
    """

    t: float | None
    values: tuple[float, ...] | np.ndarray
    label: str | None = None
    mark: tuple[str, int] | None = None


def _from_start(key: str) -> int:
    return 0


@dataclass(frozen=True)
class SourceContext:
    """What a source learns from the bundle and the daemon.

    ``channels`` are the model's input channel names in column order (``manifest.input.channels``, or
    ``ch0..chN`` when the bundle names none), ``rate_hz`` the rate the model expects (``None`` if unknown),
    ``shape`` and ``layout`` the model's per-sample input (``manifest.input``). ``topic`` is the MQTT topic
    an ``mqtt`` source listens on. ``resume_from(key)`` gives how many rows of the input ``key`` are already in
    stored windows (0 when replaying from the start).
    """

    channels: list[str]
    rate_hz: float | None = None
    topic: str = ""
    shape: tuple[int, ...] = ()
    layout: str = "NLC"
    resume_from: Callable[[str], int] = field(default=_from_start, compare=False)

    @classmethod
    def for_input(cls, spec: InputSpec) -> SourceContext:
        """The context for a bundle's input spec (``manifest.input``)."""
        channels = spec.channels or [f"ch{i}" for i in range(spec.shape[-1])]
        return cls(channels, spec.rate_hz, shape=tuple(spec.shape), layout=spec.layout)


@dataclass(frozen=True, kw_only=True)
class SourceOptions:
    """Keys every source accepts; each plug-in's ``Options`` extends this."""

    type: str = spec(doc="plug-in: camera, csv, iio, mpu6050, mqtt or synthetic")
    name: str = spec(doc="name for logs and the collect command (default <type><index>)",
                     pattern=r"[A-Za-z0-9_-]{1,32}")
    autostart: bool = spec(True, doc="collect from start-up without a collect request")
    label: str | None = spec(None, doc="label for every window from this source (overrides a label column)")
    hop: int = spec(0, doc="samples between window starts; 0 = the window length (no overlap)", min=0)


class Source(ABC):
    """A stream of :class:`Sample`.

    Lifecycle (driven by :class:`device_app.collector.Collector`, one thread per source): ``setup`` once
    before reading (open files or the bus, import hardware libraries), then ``samples`` until it returns or
    ``stop`` is set, then ``cleanup`` always, even after an error.
    """

    #: model input layouts the source can feed: samples for sensor windows (NLC), or frames (NHWC)
    layouts: ClassVar[tuple[str, ...]] = ("NLC",)
    #: whether samples carry their sampling time; without it they cannot be resampled to the model's rate
    timestamps: ClassVar[bool] = True

    def __init__(self, options: SourceOptions, context: SourceContext) -> None:
        self.options = options
        self.context = context

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Open what the source reads from. Runs in the source's thread."""

    @abstractmethod
    def samples(self, stop: threading.Event) -> Iterator[Sample]:
        """Yield samples until exhausted or ``stop`` is set; check ``stop`` at least every ~0.2 s."""

    def cleanup(self) -> None:  # noqa: B027 - optional hook
        """Close what ``setup`` opened."""


def ticks(stop: threading.Event, rate_hz: float) -> Iterator[float]:
    """Yield wall-clock times (s) at ``rate_hz`` until ``stop`` is set; a late tick does not cause a burst."""
    period = 1.0 / rate_hz
    deadline = time.monotonic()
    while not stop.is_set():
        delay = deadline - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return
        yield time.time()
        deadline = max(deadline + period, time.monotonic() - period)
