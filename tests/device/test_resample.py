"""Resampling to the model's rate: CSV recordings and polled sources at another rate, irregular timestamps,
and the sources that cannot be resampled (no timestamps) refused when the bundle loads."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from device_app.collector import Collector
from device_app.resample import Resampler
from device_app.sources import options_class
from device_app.sources.base import Sample, SourceContext
from device_app.store import Store
from device_app.windowing import check_sources_fit
from hosvd_contract import BundleError, InputSpec

CHANNELS = ["ax", "ay", "az"]
LENGTH = 32


def _options(kind: str, **kw: object):
    return options_class(kind)(**{"type": kind, "name": f"{kind}1", **kw})


def _write_csv(path: Path, t_ms: np.ndarray, values: np.ndarray, label: str = "walk") -> Path:
    rows = ["timestamp,ax,ay,az,label"]
    rows += [f"{t:.3f}," + ",".join(f"{v:.6f}" for v in row) + f",{label}" for t, row in zip(t_ms, values,
                                                                                           strict=True)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _read_back(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The timestamps (s) and values exactly as the CSV holds them (what the source parses)."""
    data = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1, 2, 3))
    return data[:, 0] / 1000.0, data[:, 1:]


def _collect(tmp_path: Path, sources: list, rate_hz: float) -> np.ndarray:
    """Run the sources through the real collector into a real store; the stored windows, oldest first."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = Store(tmp_path / "store.sqlite", max_samples=10_000, val_fraction=0.0)
    collector = Collector(sources, SourceContext(CHANNELS, rate_hz), LENGTH, store)
    collector.start()
    deadline = time.monotonic() + 30
    while collector.active() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not collector.active(), "the source did not end"
    x = store.windows(store.split_index("train", ["walk"]).ids)
    store.close()
    return x


def _numpy_windows(t: np.ndarray, values: np.ndarray, rate_hz: float) -> np.ndarray:
    """The reference: np.interp per channel on the grid t0 + k / rate_hz, cut into non-overlapping windows."""
    grid = t[0] + np.arange(int(np.floor((t[-1] - t[0]) * rate_hz + 1e-6)) + 1) / rate_hz
    resampled = np.stack([np.interp(grid, t, values[:, c]) for c in range(values.shape[1])], axis=1)
    n = len(grid) // LENGTH
    return resampled[:n * LENGTH].reshape(n, LENGTH, values.shape[1]).astype(np.float32)


def test_csv_at_50_hz_into_a_20_hz_model_gives_numpys_interpolation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 50 * 10  # 10 s at 50 Hz: 200 samples at 20 Hz, 6 windows of 32
    t_ms = np.arange(n) * 20.0
    values = np.cumsum(rng.normal(0, 1, (n, 3)), axis=0)  # a random walk: interpolation matters everywhere
    path = _write_csv(tmp_path / "walk.csv", t_ms, values)
    stored = _collect(tmp_path, [_options("csv", path=str(path), pacing="fast")], rate_hz=20.0)
    expected = _numpy_windows(*_read_back(path), rate_hz=20.0)
    assert stored.shape == expected.shape == (6, LENGTH, 3)
    np.testing.assert_allclose(stored, expected, rtol=0, atol=2e-5)
    # not the naive "every 2.5th sample": the 20 Hz grid falls between 50 Hz samples half of the time
    naive = _read_back(path)[1][::2][:6 * LENGTH].reshape(6, LENGTH, 3)
    assert np.abs(stored - naive).max() > 0.1


def test_irregular_timestamps_are_interpolated_onto_the_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n = 400
    t_ms = np.cumsum(rng.uniform(5.0, 35.0, n))  # ~50 Hz on average, each gap between 5 and 35 ms
    values = np.cumsum(rng.normal(0, 1, (n, 3)), axis=0)
    path = _write_csv(tmp_path / "walk.csv", t_ms, values)
    stored = _collect(tmp_path, [_options("csv", path=str(path), pacing="fast")], rate_hz=50.0)
    expected = _numpy_windows(*_read_back(path), rate_hz=50.0)
    assert len(stored) == len(expected) >= 7
    np.testing.assert_allclose(stored, expected, rtol=0, atol=2e-5)


def test_a_csv_already_at_the_models_rate_passes_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(0, 1, (LENGTH * 4, 3))
    path = _write_csv(tmp_path / "walk.csv", np.arange(LENGTH * 4) * 20.0, values)
    stored = _collect(tmp_path, [_options("csv", path=str(path), pacing="fast")], rate_hz=50.0)
    exact = _read_back(path)[1].astype(np.float32).reshape(4, LENGTH, 3)
    np.testing.assert_array_equal(stored, exact)


def test_a_source_polled_at_another_rate_is_resampled(tmp_path: Path) -> None:
    # synthetic at 100 Hz (timestamps i / 100) into a 25 Hz model: every 4th sample, exactly on the grid
    fast = _options("synthetic", fast=True, rate_hz=100.0, classes=["walk"], noise=0.0,
                    max_samples=LENGTH * 4 * 3)
    slow = _options("synthetic", fast=True, rate_hz=25.0, classes=["walk"], noise=0.0, max_samples=LENGTH * 3)
    from_fast = _collect(tmp_path / "a", [fast], rate_hz=25.0)
    from_slow = _collect(tmp_path / "b", [slow], rate_hz=25.0)
    assert from_fast.shape == from_slow.shape == (3, LENGTH, 3)
    np.testing.assert_allclose(from_fast, from_slow, rtol=0, atol=1e-6)


def test_resampler_restarts_at_a_gap_or_when_time_goes_back() -> None:
    r = Resampler(10.0)  # grid every 0.1 s; max gap 1 s
    out = [s for t, v in [(0.0, 0.0), (0.25, 2.5), (0.4, 4.0)] for s in r.push(Sample(t, (v,), "a"))]
    assert [round(s.t, 6) for s in out] == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert [s.values[0] for s in out] == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])
    after_gap = r.push(Sample(3.0, (100.0,), "b"))  # 2.6 s later: no straight line across the pause
    assert [(s.t, s.values) for s in after_gap] == [(3.0, (100.0,))]
    assert [s.t for s in r.push(Sample(3.1, (101.0,)))] == pytest.approx([3.1])
    back = r.push(Sample(0.05, (7.0,), "c"))  # the next file of a replay starts again at its own zero
    assert [(s.t, s.values, s.label) for s in back] == [(0.05, (7.0,), "c")]
    assert r.push(Sample(None, (8.0,))) == [Sample(None, (8.0,))]  # untimed samples pass as they are


def test_label_comes_from_the_nearer_sample() -> None:
    r = Resampler(10.0)
    r.push(Sample(0.0, (0.0,), "a"))
    out = r.push(Sample(0.3, (3.0,), "b"))
    assert [(round(s.t, 6), s.label) for s in out] == [(0.1, "a"), (0.2, "b"), (0.3, "b")]


def test_untimed_source_declaring_another_rate_is_a_config_error() -> None:
    spec = InputSpec(shape=[LENGTH, 3], layout="NLC", channels=CHANNELS, rate_hz=20.0)
    check_sources_fit([_options("mqtt", rate_hz=20.0), _options("mqtt", name="any")], spec, "imu")
    check_sources_fit([_options("synthetic", rate_hz=100.0)], spec, "imu")  # timestamped: resampled
    with pytest.raises(BundleError, match=r"\[\[sources\]\] phone \(mqtt\): rate_hz = 50, but the bundle's model "
                                          r"takes 20 Hz and these samples carry no timestamps"):
        check_sources_fit([_options("mqtt", name="phone", rate_hz=50.0)], spec, "imu")


def test_untimed_csv_rows_are_taken_at_the_models_rate(tmp_path: Path) -> None:
    path = tmp_path / "walk.csv"
    rows = ["ax,ay,az,label"] + [f"{i},{i},{i},walk" for i in range(LENGTH * 2)]
    path.write_text("\n".join(rows) + "\n")
    stored = _collect(tmp_path, [_options("csv", path=str(path), pacing="fast")], rate_hz=20.0)
    np.testing.assert_array_equal(stored[:, :, 0].ravel(), np.arange(LENGTH * 2, dtype=np.float32))
