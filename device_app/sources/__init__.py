"""Sensor sources as plug-ins: one module per ``type``, each declaring ``Options`` and ``Source``.

A plug-in module declares at import time and acts at setup time: ``Options`` (a dataclass that is the
``[[sources]]`` schema, see :mod:`device_app.schema`) and ``Source`` (a
:class:`device_app.sources.base.Source`). Hardware libraries (``smbus2``) are imported only inside
``Source.setup``, so validation and tests run anywhere. The registry maps each ``type`` to a fixed module
name: nothing is imported from a name found in a file or payload.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from device_app.sources.base import Sample, SourceOptions

if TYPE_CHECKING:
    from device_app.sources.base import Source, SourceContext

SOURCE_TYPES: dict[str, str] = {
    "camera": "device_app.sources.camera",
    "csv": "device_app.sources.csv_replay",
    "iio": "device_app.sources.iio",
    "mpu6050": "device_app.sources.mpu6050",
    "mqtt": "device_app.sources.mqtt_samples",
    "synthetic": "device_app.sources.synthetic",
}


def options_class(kind: str) -> type[SourceOptions]:
    """The ``Options`` dataclass of source type ``kind`` (one of :data:`SOURCE_TYPES`)."""
    if kind not in SOURCE_TYPES:
        raise ValueError(f"unknown source type {kind!r}; allowed: {sorted(SOURCE_TYPES)}")
    return importlib.import_module(SOURCE_TYPES[kind]).Options


def source_class(kind: str) -> type[Source]:
    """The ``Source`` class of source type ``kind`` (one of :data:`SOURCE_TYPES`)."""
    return importlib.import_module(SOURCE_TYPES[kind]).Source


def make_source(options: SourceOptions, context: SourceContext) -> Source:
    """Instantiate the plug-in for validated ``options`` (nothing is opened until ``setup``)."""
    return source_class(options.type)(options, context)


__all__ = ["SOURCE_TYPES", "Sample", "SourceOptions", "make_source", "options_class", "source_class"]
