"""Linux Industrial I/O accelerometer (or gyroscope) read through sysfs by polling ``in_<type>_<axis>_raw``.

Value per axis = ``(raw + offset) * scale`` with ``in_<type>_<axis>_scale`` or the shared ``in_<type>_scale``
(``offset`` likewise, 0 when absent): m/s² for ``accel``, rad/s for ``anglvel``, as the kernel reports them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from device_app.schema import spec
from device_app.sources.base import Sample, SourceOptions, ticks
from device_app.sources.base import Source as BaseSource


@dataclass(frozen=True, kw_only=True)
class Options(SourceOptions):
    device: str | None = spec(None, doc="sysfs device directory name, e.g. iio:device0")
    device_name: str | None = spec(None, doc="or: the device whose `name` file holds this (e.g. adxl345)")
    sysfs_path: str = spec("/sys/bus/iio/devices", doc="where IIO devices are listed")
    channel_type: str = spec("accel", doc="IIO channel type", choices=["accel", "anglvel", "magn"])
    axes: list[str] = spec(["x", "y", "z"], doc="axes in model channel order", min_len=1)  # noqa: RUF009
    rate_hz: float = spec(50.0, doc="polling rate", min=0.1, max=2000.0)


class IioError(OSError):
    """The IIO device or one of its channel files is missing or unreadable."""


def find_device(root: Path, device: str | None, device_name: str | None) -> Path:
    """The device directory under ``root`` named ``device`` or whose ``name`` file is ``device_name``."""
    if device:
        path = root / device
        if not path.is_dir():
            raise IioError(f"no IIO device {path}")
        return path
    for path in sorted(root.glob("iio:device*")):
        name_file = path / "name"
        if name_file.is_file() and name_file.read_text().strip() == device_name:
            return path
    raise IioError(f"no IIO device named {device_name!r} under {root}")


def _number(path: Path, default: float | None = None) -> float:
    try:
        return float(path.read_text().strip())
    except FileNotFoundError:
        if default is None:
            raise IioError(f"missing IIO channel file {path}") from None
        return default
    except ValueError as err:
        raise IioError(f"{path}: not a number") from err


def _per_axis_or_shared(dev: Path, kind: str, axis: str, what: str, default: float) -> float:
    own = dev / f"in_{kind}_{axis}_{what}"
    return _number(own) if own.exists() else _number(dev / f"in_{kind}_{what}", default)


class Source(BaseSource):
    """Polls the raw channel files at ``rate_hz``."""

    options: Options

    def setup(self) -> None:
        opts = self.options
        if not (opts.device or opts.device_name):
            raise IioError(f"source {opts.name}: set device or device_name")
        if len(opts.axes) != len(self.context.channels):
            raise IioError(f"source {opts.name}: {len(opts.axes)} axes, the model wants "
                           f"{len(self.context.channels)} channels {self.context.channels}")
        self.dev = find_device(Path(opts.sysfs_path), opts.device, opts.device_name)
        kind = opts.channel_type
        self.scales = [_per_axis_or_shared(self.dev, kind, a, "scale", 1.0) for a in opts.axes]
        self.offsets = [_per_axis_or_shared(self.dev, kind, a, "offset", 0.0) for a in opts.axes]
        self.raw_files = [self.dev / f"in_{kind}_{a}_raw" for a in opts.axes]
        for f in self.raw_files:
            _number(f)

    def samples(self, stop: threading.Event) -> Iterator[Sample]:
        for t in ticks(stop, self.options.rate_hz):
            values = tuple((_number(f) + off) * sc for f, off, sc in
                           zip(self.raw_files, self.offsets, self.scales, strict=True))
            yield Sample(t, values, self.options.label)
