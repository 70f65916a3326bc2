"""``hosvd-convert fit``: the deepest depth whose measured need fits the ceiling, checked on both sides, and the
clear error (non-zero exit) when even the smallest candidate does not fit."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers

from converter.fit import MIB, Candidate, FitResult, deepest_fitting, fit, search_steps
from hosvd_contract import load_manifest

ROOT = Path(__file__).resolve().parents[2]
BATCH = 64
# Every one of these 1x1 convolutions saves a 64 x 32 x 32 x 32 float32 input (8 MiB) and a ReLU mask for its
# weight gradient without compression: one layer deeper costs ~10 MiB of measured peak, far above the
# run-to-run noise of the measurement (< 1 MiB).
POINTWISE = 5


def pointwise_stack(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((32, 32, 1))
    h = layers.Conv2D(32, 3, padding="same", activation="relu", name="stem")(inp)
    for i in range(POINTWISE):
        h = layers.Conv2D(32, 1, activation="relu", name=f"pw{i}")(h)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    out = layers.Dense(4, activation="softmax", name="head")(h)
    return keras.Model(inp, out, name="pointwise_stack")


def calibration() -> np.ndarray:
    return np.random.default_rng(0).random((BATCH, 32, 32, 1), dtype=np.float32)


@dataclass
class Search:
    result: FitResult
    known: dict[tuple[str, int], Candidate]  # what it measured, for the next ceiling's search
    candidates_dir: Path


@pytest.fixture(scope="module")
def unbounded(tmp_path_factory: pytest.TempPathFactory) -> Search:
    """An unbounded ceiling: the search doubles the depth up to the deepest candidate and keeps it."""
    root = tmp_path_factory.mktemp("fit")
    known: dict[tuple[str, int], Candidate] = {}
    result = fit(pointwise_stack(), root / "all", ram_ceiling_mb=1e6, batch_size=BATCH,
                 calibration_data=calibration(), method="none", device_base_mb=0, margin_mb=0,
                 candidates_dir=root / "candidates", known=known)
    return Search(result, known, root / "candidates")


@pytest.fixture(scope="module")
def extremes(unbounded: Search) -> FitResult:
    return unbounded.result


def test_unbounded_ceiling_trains_every_layer(extremes) -> None:
    depth = POINTWISE + 2
    assert extremes.max_train_last == depth
    assert extremes.chosen.train_last == depth
    assert sorted(c.train_last for c in extremes.candidates) == [1, 2, 4, depth]  # doubling, capped at the depth
    shallow, *_, deep = sorted(extremes.candidates, key=lambda c: c.train_last)
    # the deepest saves every pointwise input (8 MiB each) plus the stem's input; the shallowest only the head's
    assert deep.saved_bytes_allocated > POINTWISE * 8 * MIB > 100 * shallow.saved_bytes_allocated
    assert deep.peak_rss_bytes - shallow.peak_rss_bytes > POINTWISE * 8 * MIB


def test_fit_picks_the_deepest_depth_under_the_ceiling_checked_on_both_sides(unbounded: Search,
                                                                            tmp_path: Path) -> None:
    """A second ceiling searched with the first search's candidates (as ``bench.fit`` does): the depths measured
    before are judged again against this ceiling and its base and margin, only the new depths are converted."""
    extremes = unbounded.result
    shallow, *_, deep = sorted(extremes.candidates, key=lambda c: c.train_last)
    base_mb, margin_mb = 20.0, 8.0
    ceiling_mb = (shallow.peak_mib + deep.peak_mib) / 2 + base_mb + margin_mb
    measured_before = {key: c.peak_rss_bytes for key, c in unbounded.known.items()}
    result = fit(pointwise_stack(), tmp_path / "bundle", ram_ceiling_mb=ceiling_mb, batch_size=BATCH,
                 calibration_data=calibration(), method="none", device_base_mb=base_mb, margin_mb=margin_mb,
                 candidates_dir=unbounded.candidates_dir, known=unbounded.known)
    judged = {("none", c.train_last): c for c in result.candidates}
    reused = set(judged) & set(measured_before)
    assert len(reused) >= 2, (judged, measured_before)  # depth 1 and the first doubling at least
    assert set(unbounded.known) == set(measured_before) | set(judged)  # new depths were added for the next
    for key in reused:
        peak = measured_before[key]
        assert judged[key].peak_rss_bytes == peak  # reused, not measured again
        assert judged[key].fits == (peak + (base_mb + margin_mb) * MIB <= ceiling_mb * MIB)
    assert extremes.candidates[-1].fits  # the first search's own judgement is untouched
    chosen = result.chosen
    by_depth = {c.train_last: c for c in result.candidates}
    assert 1 <= chosen.train_last < result.max_train_last
    assert chosen.need_bytes == chosen.peak_rss_bytes + int((base_mb + margin_mb) * MIB)
    assert chosen.need_bytes <= ceiling_mb * MIB, result.candidates
    deeper = by_depth[chosen.train_last + 1]  # the search ends with the next-deeper candidate measured
    assert deeper.need_bytes > ceiling_mb * MIB, result.candidates
    assert [c.fits for c in result.candidates] == [c.need_bytes <= ceiling_mb * MIB for c in result.candidates]
    # a search, not a sweep
    assert len(result.candidates) <= search_steps(result.max_train_last)
    assert len(result.candidates) < result.max_train_last

    manifest = load_manifest(tmp_path / "bundle")
    assert manifest.train_last == chosen.train_last
    assert manifest.compression["method"] == "none"
    lowest = min(e.measured_peak_rss_bytes for e in manifest.memory_plan)
    assert lowest == chosen.peak_rss_bytes
    assert manifest.fit["train_last"] == chosen.train_last
    assert manifest.fit["ram_ceiling_mb"] == ceiling_mb
    recorded = {c["train_last"]: c for c in manifest.fit["candidates"]}
    assert recorded[chosen.train_last + 1]["fits"] is False
    assert recorded[chosen.train_last + 1]["need_bytes"] == deeper.need_bytes


def counted(needs: list[float]) -> tuple[list[int], object]:
    """``need`` over ``needs`` (depth 1 first) that records every depth asked for."""
    asked: list[int] = []

    def need(depth: int) -> float:
        asked.append(depth)
        return needs[depth - 1]

    return asked, need


def test_search_finds_what_an_exhaustive_sweep_finds_within_its_step_bound() -> None:
    """On 20,000 random growing needs (flat runs and jumps among them) and ceilings: the deepest fitting depth, each
    depth asked for once, never more than ``search_steps`` of them."""
    rng = np.random.default_rng(0)
    for _ in range(20_000):
        depths = int(rng.integers(1, 61))
        steps = rng.exponential(1.0, depths) * rng.choice([0.0, 0.01, 1.0, 10.0], depths, p=[0.15, 0.15, 0.5, 0.2])
        needs = np.cumsum(steps).tolist()
        ceiling = float(rng.uniform(needs[0] - 1, needs[-1] + 1))
        asked, need = counted(needs)
        found = deepest_fitting(need, ceiling, depths)
        assert found == max((d for d in range(1, depths + 1) if needs[d - 1] <= ceiling), default=0)
        assert len(asked) == len(set(asked)) <= search_steps(depths), (needs, ceiling, asked)


def search_mobilenet(measured: dict[int, float]) -> tuple[int, list[int]]:
    """The search under 256 MiB over MobileNetV2's 53 weighted layers on needs measured at some depths (MiB), the
    others interpolated: what it finds and the depths it asked for."""
    known = sorted(measured)
    asked, need = counted(np.interp(np.arange(1, 54), known, [measured[d] for d in known]).tolist())
    return deepest_fitting(need, 256.0, 53), asked


def test_search_stops_doubling_where_the_fitting_slope_crosses_the_ceiling() -> None:
    """MobileNetV2 224² hosvd under 256 MiB, the needs measured by ``bench.fit`` (MiB; depths it did not measure
    interpolated): plain doubling asked for 1, 2, 4, 8, 16, 32, 24, 20, 18, 17 (833 s of conversions); the line
    through 8 and 16 crosses 256 MiB at 16.6, so the search asks for 17, which fits, then 18 (the line through 16
    and 17), and never converts 32 or 24."""
    found, asked = search_mobilenet({1: 174.1, 2: 179.4, 4: 191.7, 8: 189.1, 16: 251.3, 17: 255.0, 18: 260.5,
                                     20: 271.0, 24: 293.2, 32: 335.7, 53: 460.0})
    assert found == 17
    assert asked == [1, 2, 4, 8, 16, 17, 18]


def test_search_after_a_close_capped_step_asks_for_the_next_prediction_not_the_whole_model() -> None:
    """The same search on 2026-12-04's code (``bench/results/fit-20261204-183206``): 30 fitted 5.4 MiB under the
    ceiling, and doubling the step after it asked for all 53 layers (632 s of a 1,566 s search), then 41, 35, 32,
    33. Now a second short step in a row is needed before steps must double: 32, then 36 (twice the step 30 → 32),
    34, 33."""
    found, asked = search_mobilenet({1: 156.9, 2: 159.8, 4: 176.9, 8: 175.0, 16: 204.9, 30: 250.6, 32: 255.6,
                                     33: 264.0, 35: 275.3, 41: 316.7, 53: 743.4})
    assert found == 32
    assert asked == [1, 2, 4, 8, 16, 30, 32, 36, 34, 33]
    assert max(asked) < 41


def test_ceiling_below_the_smallest_candidate_is_a_clear_error(extremes, tmp_path: Path) -> None:
    """The CLI with ``--method auto``: every method's shallowest candidate is measured, none fits, exit 2 with
    the smallest need (within the measurement's run-to-run noise of the one measured above)."""
    model_path = tmp_path / "model.keras"
    pointwise_stack().save(model_path)
    np.savez(tmp_path / "cal.npz", x=calibration())
    shallow = min(extremes.candidates, key=lambda c: c.train_last)
    proc = subprocess.run(
        [sys.executable, "-m", "converter.cli", "fit", str(model_path), "--ram-ceiling-mb", "40",
         "--batch-size", str(BATCH), "--calibration-data", str(tmp_path / "cal.npz"), "--method", "auto",
         "--device-base-mb", "0", "--margin-mb", "0", "--out", str(tmp_path / "bundle")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    match = re.search(r"nothing fits ram_ceiling_mb = 40: the smallest candidate \((\w+), train_last 1, batch 64\) "
                      r"needs ([\d.]+) MiB", proc.stderr)
    assert match, proc.stderr[-3000:]
    need = float(match.group(2))
    assert need > 40
    assert abs(need - shallow.need_mib) < 3, (need, shallow.need_mib)
    assert not (tmp_path / "bundle" / "model.tflite").exists()
    assert not (tmp_path / ".bundle.fit").exists(), "the candidates' work directory is removed"
