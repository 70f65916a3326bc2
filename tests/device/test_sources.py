"""Sensor plug-ins and windowing: CSV replay (Edge Impulse layout, pacing), IIO sysfs, MPU6050 over a fake
I2C bus with the smbus2 interface, MQTT sample payloads, synthetic signals."""

from __future__ import annotations

import re
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_until

from device_app.collector import Collector
from device_app.sources import make_source, options_class
from device_app.sources.base import Sample, SourceContext
from device_app.sources.csv_replay import CsvError
from device_app.sources.mpu6050 import ACCEL_XOUT_H, PWR_MGMT_1, WHO_AM_I, Mpu6050Error, decode
from device_app.sources.mqtt_samples import parse_samples
from device_app.store import Store
from device_app.windowing import Windower

CTX = SourceContext(["ax", "ay", "az"], 50.0)


def _options(kind: str, **kw: object):
    return options_class(kind)(type=kind, name=f"{kind}1", **kw)


def _all(source, limit: int = 10_000) -> list[Sample]:
    stop = threading.Event()
    source.setup()
    out = []
    for s in source.samples(stop):
        out.append(s)
        if len(out) >= limit:
            stop.set()
    source.cleanup()
    return out


def _csv(path: Path, rows: int, label: str | None = "walk", header: str = "timestamp,ax,ay,az") -> Path:
    lines = [header + (",label" if label else "")]
    for i in range(rows):
        lines.append(f"{i * 20},{i},{i * 2},{i * 3}" + (f",{label}" if label else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_windower_hop_and_majority_label() -> None:
    w = Windower(4, 1, hop=2)
    labels = ["a", "a", "b", "b", "b", "b"]
    out = [w.push(Sample(i, (float(i),), labels[i])) for i in range(6)]
    windows = [o for o in out if o is not None]
    assert [o.x[:, 0].tolist() for o in windows] == [[0, 1, 2, 3], [2, 3, 4, 5]]
    assert windows[1].label == "b"
    with pytest.raises(ValueError, match="sample has 2 values, the model wants 1"):
        w.push(Sample(0, (1.0, 2.0)))


def test_csv_replay_label_column_and_fast_pacing(tmp_path: Path) -> None:
    src = make_source(_options("csv", path=str(_csv(tmp_path / "w.csv", 10)), pacing="fast"), CTX)
    samples = _all(src)
    assert len(samples) == 10 and samples[3].values == (3.0, 6.0, 9.0) and samples[3].label == "walk"
    assert samples[3].t == pytest.approx(0.06)


class FakeClock:
    """``time.monotonic`` for csv_replay, and a stop event whose ``wait`` moves the clock instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def is_set(self) -> bool:
        return False

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        self.now += timeout
        return False


def test_csv_realtime_pacing_follows_timestamps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from device_app.sources import csv_replay

    clock = FakeClock()
    monkeypatch.setattr(csv_replay, "time", clock)
    src = make_source(_options("csv", path=str(_csv(tmp_path / "w.csv", 11)), pacing="realtime", speed=2.0),
                      CTX)
    src.setup()
    arrivals = [(sample.t, clock.now) for sample in src.samples(clock)]
    assert len(arrivals) == 11
    t0, start = arrivals[0]
    for t, at in arrivals:  # rows 20 ms apart at 2x speed: each one 10 ms after the one before
        assert at - start == pytest.approx((t - t0) / 2.0), arrivals
    assert clock.waits == pytest.approx([0.01] * 10)


def test_csv_directory_label_from_filename_and_column_mapping(tmp_path: Path) -> None:
    _csv(tmp_path / "idle.1.csv", 3, label=None, header="timestamp,az,ay,ax")
    src = make_source(_options("csv", path=str(tmp_path), pacing="fast", label_from_filename=True), CTX)
    samples = _all(src)
    assert [s.label for s in samples] == ["idle"] * 3
    assert samples[1].values == (3.0, 2.0, 1.0)  # columns taken by model channel name, not position


def test_csv_that_does_not_fit_the_model_is_an_error(tmp_path: Path) -> None:
    _csv(tmp_path / "x.csv", 3, header="timestamp,a,b")
    with pytest.raises(CsvError, match=r"2 value columns \['a', 'b'\], the model wants 3"):
        _all(make_source(_options("csv", path=str(tmp_path / "x.csv"), pacing="fast"), CTX))


def _fake_iio(root: Path) -> Path:
    dev = root / "iio:device0"
    dev.mkdir(parents=True)
    (dev / "name").write_text("adxl345\n")
    (dev / "in_accel_scale").write_text("0.038\n")
    (dev / "in_accel_z_offset").write_text("10\n")
    for axis, raw in zip("xyz", (100, -50, 250), strict=True):
        (dev / f"in_accel_{axis}_raw").write_text(f"{raw}\n")
    return dev


def test_iio_reads_scaled_sysfs_values(tmp_path: Path) -> None:
    _fake_iio(tmp_path)
    src = make_source(_options("iio", device_name="adxl345", sysfs_path=str(tmp_path), rate_hz=200.0), CTX)
    samples = _all(src, limit=3)
    assert len(samples) == 3
    assert samples[0].values == pytest.approx((100 * 0.038, -50 * 0.038, 260 * 0.038))


def test_iio_missing_device_is_named(tmp_path: Path) -> None:
    src = make_source(_options("iio", device_name="bmi160", sysfs_path=str(tmp_path)), CTX)
    with pytest.raises(OSError, match="no IIO device named 'bmi160'"):
        src.setup()


class FakeBus:
    """An MPU-6050 behind the smbus2.SMBus methods the source uses."""

    def __init__(self, who_am_i: int = 0x68) -> None:
        self.who_am_i = who_am_i
        self.writes: list[tuple[int, int, int]] = []
        self.closed = False
        # accel x = +1 g at ±2 g (16384 LSB/g), y = -0.5 g, z = 0; temp raw 0; gyro x = 131 LSB = 1 °/s
        self.block = list(struct.pack(">7h", 16384, -8192, 0, 0, 131, 0, -262))

    def read_byte_data(self, addr: int, reg: int) -> int:
        assert reg == WHO_AM_I
        return self.who_am_i

    def write_byte_data(self, addr: int, reg: int, value: int) -> None:
        self.writes.append((addr, reg, value))

    def read_i2c_block_data(self, addr: int, reg: int, length: int) -> list[int]:
        assert (reg, length) == (ACCEL_XOUT_H, 14)
        return self.block

    def close(self) -> None:
        self.closed = True


def test_mpu6050_over_a_fake_bus() -> None:
    from device_app.sources.mpu6050 import Source

    bus = FakeBus()
    opts = _options("mpu6050", axes=["ax", "ay", "gz"], rate_hz=500.0)
    src = Source(opts, CTX, bus_factory=lambda n: bus)
    samples = _all(src, limit=2)
    assert bus.writes[0] == (0x68, PWR_MGMT_1, 0)
    # 131.072 LSB per °/s at ±250 °/s: -262 LSB is -1.9989 °/s
    assert samples[0].values == pytest.approx((9.80665, -4.903325, -262 / 131.072))
    assert bus.closed
    values = decode(bus.block, 2, 250)
    assert values["gx"] == pytest.approx(131 / 131.072) and values["temp"] == pytest.approx(36.53)


def test_mpu6050_wrong_chip_is_refused() -> None:
    from device_app.sources.mpu6050 import Source

    src = Source(_options("mpu6050"), CTX, bus_factory=lambda n: FakeBus(who_am_i=0x12))
    with pytest.raises(Mpu6050Error, match="WHO_AM_I=0x12, not an MPU-6050"):
        src.setup()


def test_mqtt_sample_payloads() -> None:
    rows, label = parse_samples(b'{"values": [[1, 2, 3], [4, 5, 6]], "label": "walk"}', 3)
    assert rows == [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0)] and label == "walk"
    for bad, why in [(b"nope", "not JSON"), (b'{"values": [[1, 2]]}', "values[0] must be a list of 3"),
                     (b'{"values": [[1, 2, true]]}', "finite numbers"), (b'{"v": 1}', "expected"),
                     (b'{"values": [], "label": 3}', "label must be a string")]:
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_samples(bad, 3)


def test_collector_stores_labelled_windows_and_stops_after_n(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", val_fraction=0.0)
    opts = _options("synthetic", fast=True, classes=["idle", "walk"], seconds_per_class=0.5)
    collector = Collector([opts], CTX, 5, store)
    collector.start(windows=12)
    wait_until(lambda: not collector.active(), 10, "the collector stopping after 12 windows")
    counts = store.counts()
    assert counts["total"] == 12
    assert set(counts["by_label"]) == {"idle", "walk"}
    x = store.windows(store.split_index("train", ["idle", "walk"]).ids)
    assert x.shape == (12, 5, 3) and np.isfinite(x).all()
    collector.start(label="walk", windows=3)
    wait_until(lambda: not collector.active(), 10, "the collector stopping after 3 windows")
    assert store.counts()["by_label"]["walk"]["train"] == counts["by_label"]["walk"]["train"] + 3
