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


@pytest.fixture(scope="module")
def vowels() -> datasets.Dataset:
    return datasets.load("japanesevowels")


@pytest.fixture(scope="module")
def plaid() -> datasets.Dataset:
    return datasets.load("plaid")


def test_resample_keeps_the_ends_and_interpolates_linearly() -> None:
    series = np.array([[0.0, 10.0], [1.0, 20.0], [3.0, 40.0]])
    out = datasets.resample(series, 5)
    assert out.shape == (5, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], [0.0, 0.5, 1.0, 2.0, 3.0])
    np.testing.assert_allclose(out[:, 1], [10.0, 15.0, 20.0, 30.0, 40.0])
    np.testing.assert_allclose(datasets.resample(series[:1], 3), [[0.0, 10.0]] * 3)


def test_japanese_vowels_shape_classes_and_speakers(vowels: datasets.Dataset) -> None:
    assert vowels.x.shape == (640, 32, 12), vowels.x.shape
    assert vowels.x.dtype == np.float32 and np.isfinite(vowels.x).all()
    assert vowels.labels == [str(s) for s in range(1, 10)]
    assert vowels.channels == datasets.JAPANESE_VOWELS_CHANNELS and vowels.layout == "NLC"
    # sktime's 270 train (30 per speaker) + 370 test utterances
    assert np.bincount(vowels.y).tolist() == [61, 65, 118, 74, 59, 54, 70, 80, 59]
    # LPC cepstra: the first coefficient is the largest on average (0.80), the 12th near zero (0.09)
    means = vowels.x.mean(axis=(0, 1))
    assert means[0] == pytest.approx(0.80, abs=0.05) and abs(means[-1]) < 0.15
    assert len({x.tobytes() for x in vowels.x}) == 640


def test_plaid_shape_classes_and_compression(plaid: datasets.Dataset) -> None:
    assert plaid.x.shape == (1074, 256, 1), plaid.x.shape
    assert plaid.x.dtype == np.float32 and np.isfinite(plaid.x).all()
    assert plaid.labels == [str(c) for c in range(11)]
    assert np.bincount(plaid.y).tolist() == [66, 175, 115, 38, 156, 35, 114, 172, 139, 38, 26]
    peaks = datasets.log_expand(np.abs(plaid.x).max(axis=(1, 2)))  # back in amperes: 2e-4 .. 470 A
    assert 1e-4 < peaks.min() < 1e-3 and 100 < peaks.max() < 1000
    np.testing.assert_allclose(datasets.log_expand(datasets.log_compress(np.array([-3.0, 0.0, 2e-4, 470.0]))),
                               [-3.0, 0.0, 2e-4, 470.0], rtol=1e-5)


@pytest.mark.parametrize("name, sizes", [("japanesevowels", (320, 159, 161)), ("plaid", (539, 266, 269))])
def test_new_sets_split_stratified_and_the_new_user_is_shifted(request, name: str, sizes: tuple[int, ...]) -> None:
    from demo import scenario

    whole = request.getfixturevalue({"japanesevowels": "vowels", "plaid": "plaid"}[name])

    sc = scenario.prepare(name, factory=0.5, device_train=0.25, seed=1)
    parts = (sc.factory, sc.user_train, sc.user_holdout)
    assert tuple(len(p) for p in parts) == sizes
    counts = np.bincount(np.concatenate([p.y for p in parts]))
    for part in parts:  # every class in every part, in proportion (± 1 recording of rounding)
        share = np.bincount(part.y, minlength=len(counts)) / counts
        assert (share > 0).all() and np.allclose(share, len(part) / counts.sum(), atol=0.5 / counts.min() + 0.02)
    split = datasets.split_factory_user(whole, factory=0.5, device_train=0.25, seed=1)  # what prepare cut
    np.testing.assert_array_equal(split.holdout.x, sc.user_holdout_unshifted.x)
    rows = {x.tobytes() for part in (split.factory, split.device_train, split.holdout) for x in part.x}
    # PLAID holds 4 recordings twice (1,070 distinct): the parts together are the whole set, each once
    assert rows == {x.tobytes() for x in whole.x} and sum(sizes) == len(whole), "parts must not share a recording"
    np.testing.assert_allclose(sc.user_holdout.x, shift.SHIFTS[name](sc.user_holdout_unshifted.x), atol=1e-5)
    assert not np.allclose(sc.user_holdout.x, sc.user_holdout_unshifted.x, atol=0.1)


def test_microphone_tilt_adds_the_filter_cepstrum() -> None:
    out = shift.microphone_tilt(np.zeros((1, 2, 12), np.float32), a=0.5)
    np.testing.assert_allclose(out[0, 0, :3], [-0.5, -0.125, -0.125 / 3], rtol=1e-6)
    np.testing.assert_array_equal(out[0, 0], out[0, 1])


def test_clamp_gain_scales_amperes() -> None:
    amps = np.array([[-2.0, 5e-3, 300.0]])
    out = shift.clamp_gain(datasets.log_compress(amps), gain=0.1)
    np.testing.assert_allclose(datasets.log_expand(out), 0.1 * amps, rtol=1e-5)
