"""Samples published over MQTT to ``<base>/<device_id>/samples/<source name>``.

Payload: ``{"values": [[v0, v1, ...], ...], "label": "walk"}`` — one row per sample, one value per model
channel, ``label`` optional. Malformed payloads are logged with the reason and dropped; the daemon wires
:meth:`Source.feed` to the topic. The rows carry no timestamps, so they cannot be resampled: they must come at
the model's rate, and a ``rate_hz`` that says otherwise is refused when the bundle loads.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from device_app.schema import spec
from device_app.sources.base import Sample, SourceContext, SourceOptions
from device_app.sources.base import Source as BaseSource

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Options(SourceOptions):
    max_queue: int = spec(10000, doc="samples buffered before new ones are dropped", min=1)
    rate_hz: float | None = spec(None, doc="rate the publisher samples at; must be the model's (no timestamps "
                                           "to resample on); unset = assumed to be", min=0.1)


def parse_samples(payload: bytes, n_channels: int) -> tuple[list[tuple[float, ...]], str | None]:
    """Rows and label of one message.

    Raises:
        ValueError: naming what is wrong (not JSON, no ``values``, wrong row length, not finite numbers).
    """
    try:
        data = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"not JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("values"), list):
        raise ValueError('expected {"values": [[...], ...], "label": optional string}')
    label = data.get("label")
    if label is not None and not isinstance(label, str):
        raise ValueError(f"label must be a string, got {label!r}")
    rows = []
    for i, row in enumerate(data["values"]):
        if (not isinstance(row, list) or len(row) != n_channels
                or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                           for v in row)):
            raise ValueError(f"values[{i}] must be a list of {n_channels} finite numbers, got {row!r}"[:200])
        rows.append(tuple(float(v) for v in row))
    return rows, label


class Source(BaseSource):
    """Yields what :meth:`feed` received, in order."""

    options: Options
    timestamps: ClassVar[bool] = False

    def __init__(self, options: Options, context: SourceContext) -> None:
        super().__init__(options, context)
        self.queue: queue.Queue[Sample] = queue.Queue(options.max_queue)

    def feed(self, payload: bytes) -> int:
        """Queue the samples of one MQTT message; return how many were queued (0 for a bad message)."""
        try:
            rows, label = parse_samples(payload, len(self.context.channels))
        except ValueError as err:
            log.warning("source %s: dropped a message on %s: %s", self.options.name, self.context.topic, err)
            return 0
        for n, row in enumerate(rows):
            try:
                self.queue.put_nowait(Sample(None, row, self.options.label or label))
            except queue.Full:
                log.warning("source %s: queue full, dropped %d samples", self.options.name, len(rows) - n)
                return n
        return len(rows)

    def samples(self, stop: threading.Event) -> Iterator[Sample]:
        while not stop.is_set():
            try:
                yield self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
