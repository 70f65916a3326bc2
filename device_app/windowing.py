"""Turn a stream of samples into model inputs of the bundle's shape ``(window_length, channels)``."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from device_app.sources.base import Sample


@dataclass(frozen=True)
class Window:
    """One model input: ``x`` ``(L, C)`` float32, the majority label of its samples, start time (s), and the
    furthest resume mark of each input its samples came from (``{key: rows read}``, see ``Sample.mark``)."""

    x: np.ndarray
    label: str | None
    t: float
    marks: dict[str, int] = field(default_factory=dict)


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
        marks: dict[str, int] = {}
        for s in self.buffer:
            if s.mark is not None:
                marks[s.mark[0]] = max(marks.get(s.mark[0], 0), s.mark[1])
        return Window(x, label, self.buffer[0].t, marks)
