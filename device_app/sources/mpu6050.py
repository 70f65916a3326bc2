"""InvenSense MPU-6050 accelerometer + gyroscope over I2C with smbus2.

Reads the 14 data bytes from ``ACCEL_XOUT_H`` (0x3B) in one block: accel x/y/z, temperature, gyro x/y/z, each
a big-endian int16. Accel is converted to m/s² and gyro to °/s for the configured full-scale ranges. The bus
is any object with ``write_byte_data``, ``read_byte_data``, ``read_i2c_block_data`` and ``close``
(smbus2.SMBus on a device; a fake in tests); ``smbus2`` is imported only in :meth:`Source.setup`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from device_app.schema import spec
from device_app.sources.base import Sample, SourceContext, SourceOptions, ticks
from device_app.sources.base import Source as BaseSource

PWR_MGMT_1 = 0x6B
SMPLRT_DIV = 0x19
GYRO_CONFIG = 0x1B
ACCEL_CONFIG = 0x1C
ACCEL_XOUT_H = 0x3B
WHO_AM_I = 0x75
WHO_AM_I_VALUES = (0x68, 0x98, 0x72)  # MPU-6050, and common clones
STANDARD_GRAVITY = 9.80665
ACCEL_RANGES_G = {2: 0, 4: 1, 8: 2, 16: 3}
GYRO_RANGES_DPS = {250: 0, 500: 1, 1000: 2, 2000: 3}
AXES = ["ax", "ay", "az", "gx", "gy", "gz"]


@dataclass(frozen=True, kw_only=True)
class Options(SourceOptions):
    bus: int = spec(1, doc="I2C bus number (/dev/i2c-N)", min=0)
    address: int = spec(0x68, doc="I2C address (0x68, or 0x69 with AD0 high)", choices=[0x68, 0x69])
    rate_hz: float = spec(50.0, doc="polling rate", min=0.1, max=1000.0)
    accel_range_g: int = spec(2, doc="accelerometer full scale", choices=list(ACCEL_RANGES_G))
    gyro_range_dps: int = spec(250, doc="gyroscope full scale", choices=list(GYRO_RANGES_DPS))
    axes: list[str] = spec(["ax", "ay", "az"], doc=f"channels in model order, from {AXES}",  # noqa: RUF009
                           min_len=1)


class Mpu6050Error(OSError):
    """The chip did not answer as an MPU-6050."""


def _int16(high: int, low: int) -> int:
    value = (high << 8) | low
    return value - 0x10000 if value & 0x8000 else value


def decode(block: list[int], accel_range_g: int, gyro_range_dps: int) -> dict[str, float]:
    """Physical values from the 14-byte block read at ``ACCEL_XOUT_H``.

    Returns:
        ``{"ax", "ay", "az"}`` in m/s², ``{"gx", "gy", "gz"}`` in °/s, ``"temp"`` in °C.
    """
    raw = [_int16(block[i], block[i + 1]) for i in range(0, 14, 2)]
    accel_lsb = 32768.0 / accel_range_g
    gyro_lsb = 32768.0 / gyro_range_dps
    out = {name: raw[i] / accel_lsb * STANDARD_GRAVITY for i, name in enumerate(("ax", "ay", "az"))}
    out["temp"] = raw[3] / 340.0 + 36.53
    out.update({name: raw[4 + i] / gyro_lsb for i, name in enumerate(("gx", "gy", "gz"))})
    return out


def _smbus(bus: int) -> Any:
    import smbus2  # hardware library: imported at setup time only

    return smbus2.SMBus(bus)


class Source(BaseSource):
    """Wakes the chip, sets the ranges, then polls at ``rate_hz``."""

    options: Options

    def __init__(self, options: Options, context: SourceContext,
                 bus_factory: Callable[[int], Any] = _smbus) -> None:
        super().__init__(options, context)
        self.bus_factory = bus_factory
        self.bus: Any = None

    def setup(self) -> None:
        opts = self.options
        unknown = [a for a in opts.axes if a not in AXES]
        if unknown:
            raise Mpu6050Error(f"source {opts.name}: unknown axes {unknown}; allowed {AXES}")
        if len(opts.axes) != len(self.context.channels):
            raise Mpu6050Error(f"source {opts.name}: {len(opts.axes)} axes, the model wants "
                               f"{len(self.context.channels)} channels {self.context.channels}")
        self.bus = self.bus_factory(opts.bus)
        who = self.bus.read_byte_data(opts.address, WHO_AM_I)
        if who not in WHO_AM_I_VALUES:
            raise Mpu6050Error(f"device at {opts.address:#x} on bus {opts.bus} says WHO_AM_I={who:#x}, "
                               f"not an MPU-6050 ({[hex(v) for v in WHO_AM_I_VALUES]})")
        self.bus.write_byte_data(opts.address, PWR_MGMT_1, 0x00)  # wake up, internal oscillator
        self.bus.write_byte_data(opts.address, SMPLRT_DIV, 0x07)
        self.bus.write_byte_data(opts.address, ACCEL_CONFIG, ACCEL_RANGES_G[opts.accel_range_g] << 3)
        self.bus.write_byte_data(opts.address, GYRO_CONFIG, GYRO_RANGES_DPS[opts.gyro_range_dps] << 3)

    def samples(self, stop: threading.Event) -> Iterator[Sample]:
        opts = self.options
        for t in ticks(stop, opts.rate_hz):
            block = self.bus.read_i2c_block_data(opts.address, ACCEL_XOUT_H, 14)
            values = decode(block, opts.accel_range_g, opts.gyro_range_dps)
            yield Sample(t, tuple(values[a] for a in opts.axes), opts.label)

    def cleanup(self) -> None:
        if self.bus is not None:
            self.bus.close()
            self.bus = None
