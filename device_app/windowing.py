"""Turn a source's stream into model inputs of the bundle's shape, and check that sources fit a bundle.

Sensor samples (``NLC`` models) are resampled to the model's rate (:mod:`device_app.resample`) and cut into
``(window_length, channels)`` windows; a frame source (a camera, ``NHWC`` models) yields whole inputs.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from device_app.resample import declared_rate, rate_problem, resampled
from device_app.sources import SourceOptions, source_class
from device_app.sources.base import Sample, Source
from hosvd_contract import BundleError, InputSpec


@dataclass(frozen=True)
class Window:
    """One model input: ``x`` (the bundle's input shape) float32, the majority label of its samples, start
    time (s; ``None`` for untimed samples), and the furthest resume mark of each input its samples came from
    (``{key: rows read}``, see ``Sample.mark``)."""

    x: np.ndarray
    label: str | None
    t: float | None
    marks: dict[str, int] = field(default_factory=dict)


def _marks(samples: Iterable[Sample]) -> dict[str, int]:
    marks: dict[str, int] = {}
    for s in samples:
        if s.mark is not None:
            marks[s.mark[0]] = max(marks.get(s.mark[0], 0), s.mark[1])
    return marks


class Windower:
    """Collects samples and emits a :class:`Window` every ``hop`` samples once ``length`` are buffered.

    Args:
        length: samples per window (``manifest.input.shape[0]`` for ``NLC`` models).
        channels: values per sample.
        hop: samples between window starts; ``0`` or ``length`` means no overlap.
    """

    def __init__(self, length: int, channels: int, hop: int = 0) -> None:
        if length < 1 or channels < 1:
            raise ValueError(f"window length and channels must be >= 1, got {length}, {channels}")
        self.length = length
        self.channels = channels
        self.hop = hop or length
        self.buffer: deque[Sample] = deque(maxlen=length)
        self.pending = length

    def push(self, sample: Sample) -> Window | None:
        """Add one sample; return a window when one is complete.

        Raises:
            ValueError: the sample does not have ``channels`` values.
        """
        if len(sample.values) != self.channels:
            raise ValueError(f"sample has {len(sample.values)} values, the model wants {self.channels}")
        self.buffer.append(sample)
        self.pending -= 1
        if self.pending > 0:
            return None
        self.pending = self.hop
        x = np.array([s.values for s in self.buffer], dtype=np.float32)
        labels = Counter(s.label for s in self.buffer if s.label is not None)
        label = labels.most_common(1)[0][0] if labels else None
        return Window(x, label, self.buffer[0].t, _marks(self.buffer))


def model_inputs(source: Source, stop: threading.Event, window_length: int) -> Iterator[Window]:
    """The model inputs a started source makes until it ends or ``stop`` is set.

    Args:
        source: a source after ``setup``; its context says the model's layout and rate.
        stop: ends the stream.
        window_length: samples per window (``NLC`` models).
    """
    ctx = source.context
    if ctx.layout != "NLC":  # frames: each sample is one input
        for sample in source.samples(stop):
            yield Window(np.asarray(sample.values, dtype=np.float32), sample.label, sample.t, _marks([sample]))
        return
    windower = Windower(window_length, len(ctx.channels), source.options.hop)
    for sample in resampled(source.samples(stop), ctx.rate_hz, declared_rate(source.options)):
        window = windower.push(sample)
        if window is not None:
            yield window


def check_sources_fit(sources: list[SourceOptions], spec: InputSpec, bundle: str) -> None:
    """Refuse a bundle that the configured sources cannot feed.

    A source must support the model's layout (sensor samples for ``NLC``, frames for ``NHWC``), and a source
    whose samples carry no timestamps must not declare a rate other than the model's.

    Args:
        sources: the validated ``[[sources]]``.
        spec: the bundle's ``manifest.input``.
        bundle: the bundle's name, for the message.

    Raises:
        BundleError: listing every source that does not fit.
    """
    problems = []
    for opts in sources:
        cls = source_class(opts.type)
        if spec.layout not in cls.layouts:
            problems.append(f"[[sources]] {opts.name} ({opts.type}) feeds {'/'.join(cls.layouts)} models; the "
                            f"bundle takes {spec.layout} input {list(spec.shape)}")
            continue
        problem = rate_problem(opts, cls.timestamps, spec.rate_hz)
        if problem:
            problems.append(problem)
    if problems:
        raise BundleError(f"bundle {bundle} does not fit the configured sources: " + "; ".join(problems))
