"""Synthetic labelled signals: each class is a sine of its own frequency plus noise, cycling through classes.

Useful to try a device with no sensor attached and in tests; the data is learnable, so a training run on it
lowers the loss.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from device_app.schema import spec
from device_app.sources.base import Sample, SourceOptions, ticks
from device_app.sources.base import Source as BaseSource


@dataclass(frozen=True, kw_only=True)
class Options(SourceOptions):
    rate_hz: float = spec(50.0, doc="samples per second (realtime pacing)", min=0.1)
    fast: bool = spec(False, doc="generate as fast as possible instead of at rate_hz")
    classes: list[str] = spec(["idle", "walk", "run"], doc="labels to cycle through", min_len=1)  # noqa: RUF009
    seconds_per_class: float = spec(4.0, doc="how long each class lasts before the next", min=0.01)
    noise: float = spec(0.1, doc="standard deviation of added Gaussian noise", min=0.0)
    seed: int = spec(0, doc="random seed")
    max_samples: int = spec(0, doc="stop after this many samples; 0 = never", min=0)


def synthetic_value(k: int, t: float, channel: int) -> float:
    """Noise-free value of class ``k`` at ``t`` seconds on ``channel``: a (k+1) Hz sine."""
    return math.sin(2 * math.pi * (k + 1) * t + channel) * (1.0 + 0.5 * k)


class Source(BaseSource):
    """Generates samples at ``rate_hz`` (or as fast as possible with ``fast``)."""

    options: Options

    def samples(self, stop: threading.Event) -> Iterator[Sample]:
        opts = self.options
        rng = np.random.default_rng(opts.seed)
        n_ch = len(self.context.channels)
        per_class = max(1, round(opts.seconds_per_class * opts.rate_hz))
        clock = iter(int, 1) if opts.fast else ticks(stop, opts.rate_hz)
        for i, _ in enumerate(clock):
            if stop.is_set() or (opts.max_samples and i >= opts.max_samples):
                return
            k = (i // per_class) % len(opts.classes)
            t = i / opts.rate_hz
            noise = rng.normal(0.0, opts.noise, n_ch) if opts.noise else np.zeros(n_ch)
            values = tuple(synthetic_value(k, t, c) + float(noise[c]) for c in range(n_ch))
            yield Sample(t, values, opts.label or opts.classes[k])
