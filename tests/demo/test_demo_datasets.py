"""The demo's data: shapes, stratified deterministic splits, the new-user shift and the CSV round trip."""

from __future__ import annotations

import numpy as np
import pytest

from demo import datasets, shift


@pytest.fixture(scope="module")
def motions() -> datasets.Dataset:
    return datasets.load("basicmotions")


def test_basic_motions_shape_and_labels(motions: datasets.Dataset) -> None:
    assert motions.x.shape == (80, 100, 6), motions.x.shape
    assert motions.x.dtype == np.float32
    assert motions.labels == ["badminton", "running", "standing", "walking"]
    assert motions.channels == datasets.BASICMOTIONS_CHANNELS
    assert motions.layout == "NLC" and motions.rate_hz == 10.0
    assert np.bincount(motions.y).tolist() == [20, 20, 20, 20]


def test_digits_shape_and_range() -> None:
    digits = datasets.load("digits")
    assert digits.x.shape == (1797, 8, 8, 1), digits.x.shape
    assert digits.x.dtype == np.float32
    assert digits.x.min() >= 0.0 and digits.x.max() <= 1.0
    assert digits.labels == [str(d) for d in range(10)]
    assert sorted(set(digits.y.tolist())) == list(range(10))


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="basicmotions"):
        datasets.load("mnist")  # type: ignore[arg-type]


def test_split_is_stratified_disjoint_and_deterministic(motions: datasets.Dataset) -> None:
    a = datasets.split_factory_user(motions, factory=0.5, device_train=0.25, seed=3)
    b = datasets.split_factory_user(motions, factory=0.5, device_train=0.25, seed=3)
    c = datasets.split_factory_user(motions, factory=0.5, device_train=0.25, seed=4)
    assert [len(a.factory), len(a.device_train), len(a.holdout)] == [40, 20, 20]
    for part in (a.factory, a.device_train, a.holdout):
        assert np.bincount(part.y, minlength=4).tolist() == [len(part) // 4] * 4
    np.testing.assert_array_equal(a.holdout.x, b.holdout.x)
    assert not np.array_equal(a.holdout.x, c.holdout.x)
    rows = {x.tobytes() for part in (a.factory, a.device_train, a.holdout) for x in part.x}
    assert len(rows) == 80, "the three parts must not share a recording"


def test_stratified_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        datasets.stratified_split(np.zeros(10, np.int32), (0.5, 0.2), seed=0)


def test_rotate_triads_is_a_rotation_of_each_sensor() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 10, 6)).astype(np.float32)
    r = shift.rotate_triads(x, 90.0)
    np.testing.assert_allclose(r[..., 0], -x[..., 1], atol=1e-6)
    np.testing.assert_allclose(r[..., 1], x[..., 0], atol=1e-6)
    np.testing.assert_allclose(r[..., 5], x[..., 5], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(r[..., 3:], axis=-1), np.linalg.norm(x[..., 3:], axis=-1), rtol=1e-5)
    np.testing.assert_allclose(shift.rotate_triads(r, -90.0), x, atol=1e-5)


def test_shift_and_darken_stays_in_range() -> None:
    x = np.zeros((1, 8, 8, 1), np.float32)
    x[0, 0, 0, 0] = 0.25
    out = shift.shift_and_darken(x)
    assert out[0, 1, 1, 0] == pytest.approx(0.5)
    assert out[0, 0, 0, 0] == 0.0 and out.max() <= 1.0


def test_edge_impulse_csv_round_trip(tmp_path, motions: datasets.Dataset) -> None:
    part = motions.subset(np.array([0, 25, 50, 75]))
    names = [part.labels[i] for i in part.y]
    path = datasets.write_edge_impulse_csv(tmp_path / "sub" / "user.csv", part.x, names, part.channels, part.rate_hz)
    header = path.read_text().splitlines()[0]
    assert header == "timestamp,accX,accY,accZ,gyrX,gyrY,gyrZ,label"
    windows, labels, channels, stamps = datasets.read_edge_impulse_csv(path, window_length=100)
    np.testing.assert_array_equal(windows, part.x)
    assert labels == names
    assert channels == part.channels
    assert stamps[:3].tolist() == [0, 100, 200] and len(stamps) == 400


def test_edge_impulse_csv_checks_shapes(tmp_path) -> None:
    with pytest.raises(ValueError, match="channels"):
        datasets.write_edge_impulse_csv(tmp_path / "x.csv", np.zeros((2, 5, 3)), None, ["a", "b"], 10.0)
    with pytest.raises(ValueError, match="one label per window"):
        datasets.write_edge_impulse_csv(tmp_path / "x.csv", np.zeros((2, 5, 2)), ["a"], ["a", "b"], 10.0)


def test_scenario_shifts_only_the_new_user() -> None:
    from demo import scenario

    sc = scenario.prepare("basicmotions", factory=0.5, device_train=0.25, seed=0)
    assert [len(sc.factory), len(sc.user_train), len(sc.user_holdout)] == [40, 20, 20]
    np.testing.assert_allclose(sc.user_holdout.x, shift.rotate_triads(sc.user_holdout_unshifted.x), atol=1e-5)
    np.testing.assert_array_equal(sc.user_holdout.y, sc.user_holdout_unshifted.y)
    z = sc.normalise(sc.factory.x)
    np.testing.assert_allclose(z.mean(axis=(0, 1)), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 1)), 1.0, atol=1e-3)
