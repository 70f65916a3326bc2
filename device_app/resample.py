"""Resampling a sensor stream onto the model's rate: linear interpolation on the samples' timestamps.

A model is trained on windows at ``manifest.input.rate_hz``; a sensor polled at another rate, or a recording
made at another rate or with jittery timestamps, must be brought onto that grid first or every window has the
wrong time scale. The grid starts at the first sample (``t0 + k / rate_hz``); each grid point takes the
linear interpolation of the two samples around it (``numpy.interp`` per channel, computed the same way) and
the label of the nearer one. Samples that already lie on the grid pass through unchanged, so a 50 Hz CSV
feeding a 50 Hz model is not altered at all.

The grid restarts at a sample whose timestamp goes backwards (the next file of a CSV replay) or that follows
a gap longer than ``max_gap_s`` (nothing is invented across a pause). Samples without a timestamp
(``Sample.t is None``: a CSV without a ``timestamp`` column, MQTT samples) cannot be resampled: they are
taken to be at the model's rate, and :func:`rate_problem` makes a source that declares another rate a
configuration error.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from device_app.sources.base import Sample, SourceOptions

ON_GRID_S = 1e-6  # a sample this close to a grid point is that grid point (CSV timestamps are whole ms)
RATE_TOLERANCE = 1e-6  # relative: rates closer than this are the same rate


def same_rate(a: float, b: float) -> bool:
    """True when two rates (Hz) are equal up to :data:`RATE_TOLERANCE`."""
    return math.isclose(a, b, rel_tol=RATE_TOLERANCE)


class Resampler:
    """Turns timestamped samples into samples on the grid ``t0 + k / rate_hz``.

    Args:
        rate_hz: the model's rate.
        max_gap_s: a longer gap between two samples restarts the grid instead of interpolating across it;
            default the longer of 1 s and 10 model periods.
    """

    def __init__(self, rate_hz: float, max_gap_s: float | None = None) -> None:
        if not rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        self.period = 1.0 / rate_hz
        self.max_gap_s = max_gap_s if max_gap_s is not None else max(1.0, 10 * self.period)
        self.prev: Sample | None = None
        self.t0 = 0.0
        self.k = 0  # index of the next grid point to emit

    def _restart(self, sample: Sample) -> list[Sample]:
        self.prev, self.t0, self.k = sample, float(sample.t), 1  # type: ignore[arg-type]
        return [sample]

    def push(self, sample: Sample) -> list[Sample]:
        """Add one sample; return the grid samples it completes (possibly none, possibly several).

        Raises:
            ValueError: the sample has a different number of values than the ones before it.
        """
        if sample.t is None:  # untimed: nothing to interpolate on
            self.prev = None
            return [sample]
        prev = self.prev
        if prev is None or sample.t < prev.t or sample.t - prev.t > self.max_gap_s:
            return self._restart(sample)
        if len(sample.values) != len(prev.values):
            raise ValueError(f"sample has {len(sample.values)} values, the one before had {len(prev.values)}")
        out = []
        dt = sample.t - prev.t
        while True:
            g = self.t0 + self.k * self.period
            if g > sample.t + ON_GRID_S:
                break
            if abs(g - sample.t) <= ON_GRID_S:
                out.append(Sample(g, sample.values, sample.label, sample.mark))
            else:  # prev.t < g < sample.t: the points up to prev.t went out with prev
                # numpy.interp's formula: fp[j] + slope * (x - xp[j])
                w = g - prev.t
                values = tuple(p + (s - p) / dt * w for p, s in zip(prev.values, sample.values, strict=True))
                # the resume mark of the sample before: a replay resumed after it never repeats this point
                out.append(Sample(g, values, prev.label if w < dt / 2 else sample.label, prev.mark))
            self.k += 1
        self.prev = sample
        return out


def resampled(samples: Iterator[Sample], rate_hz: float | None, declared_rate_hz: float | None) -> Iterator[Sample]:
    """``samples`` on the model's grid, or as they are when no resampling is needed.

    Args:
        samples: one source's stream.
        rate_hz: the model's rate (``manifest.input.rate_hz``); ``None`` means unknown: nothing is resampled.
        declared_rate_hz: the rate the source is configured to poll at, if it has one. Equal to the model's,
            its samples are the grid already (their timestamps are the poll times, with the poll's jitter).
    """
    if rate_hz is None or (declared_rate_hz is not None and same_rate(declared_rate_hz, rate_hz)):
        yield from samples
        return
    resampler = Resampler(rate_hz)
    for sample in samples:
        yield from resampler.push(sample)


def declared_rate(options: SourceOptions) -> float | None:
    """The ``rate_hz`` key of a source that has one (polled sensors, synthetic, mqtt), else ``None``."""
    return getattr(options, "rate_hz", None)


def rate_problem(options: SourceOptions, timestamps: bool, rate_hz: float | None) -> str | None:
    """Why a source cannot feed a model of ``rate_hz``, or ``None``.

    Args:
        options: the source's validated options.
        timestamps: whether the source's samples carry timestamps (``Source.timestamps``).
        rate_hz: the model's rate, ``None`` when the bundle does not say.
    """
    declared = declared_rate(options)
    if timestamps or rate_hz is None or declared is None or same_rate(declared, rate_hz):
        return None
    return (f"[[sources]] {options.name} ({options.type}): rate_hz = {declared:g}, but the bundle's model "
            f"takes {rate_hz:g} Hz and these samples carry no timestamps to resample on; send them at "
            f"{rate_hz:g} Hz and set rate_hz = {rate_hz:g} (or leave it unset)")
