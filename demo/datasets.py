"""Real data sets that install with packages (no download at run time), cut into "factory" and "new user".

Sources:

- BasicMotions (sktime): a smartwatch's 3-axis accelerometer and 3-axis gyroscope, 100 steps at 10 Hz, four
  activities (badminton, running, standing, walking), 80 recordings. Returned channels-last, ``(N, 100, 6)``.
- Digits (scikit-learn): 1,797 real 8×8 handwritten digits, ``(N, 8, 8, 1)`` scaled to ``[0, 1]``.
- JapaneseVowels (sktime): 640 utterances of /ae/ by 9 male speakers (the classes: speaker identification),
  12 LPC cepstrum coefficients per 6.4 ms frame, 7–29 frames. Resampled to :data:`JAPANESE_VOWELS_LENGTH`
  frames (:func:`resample`), ``(640, 32, 12)``.
- PLAID (sktime): 1,074 current traces of 11 appliance types, 100–1,344 samples. Resampled to
  :data:`PLAID_LENGTH` samples and log-compressed (:func:`log_compress`: the peaks span 2e-4 to 470 A),
  ``(1074, 256, 1)``.

Unequal lengths become one fixed length by :func:`resample`: each channel is linearly interpolated onto ``L``
equally spaced points from the first to the last sample of its recording (every recording keeps its whole
extent; a short one is stretched, a long one decimated). The models are fixed-shape TFLite graphs.

:func:`split_factory_user` cuts a data set, class-stratified and seeded, into the part the "factory" model is
pre-trained on and the "new user" part it never sees; the latter is cut again into the recordings the device
trains on (replayed from CSV by the device's source) and a held-out part for the before/after evaluation.
:func:`write_edge_impulse_csv` writes sensor windows in the Edge Impulse CSV layout the daemon's CSV replay
source reads: ``timestamp`` in milliseconds, one column per axis, ``label``.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

DatasetName = Literal["basicmotions", "digits", "japanesevowels", "plaid"]
DATASETS: tuple[DatasetName, ...] = ("basicmotions", "digits", "japanesevowels", "plaid")

BASICMOTIONS_CHANNELS = ["accX", "accY", "accZ", "gyrX", "gyrY", "gyrZ"]
BASICMOTIONS_RATE_HZ = 10.0
JAPANESE_VOWELS_LENGTH = 32  # frames after resampling (recordings have 7–29)
JAPANESE_VOWELS_CHANNELS = [f"lpcc{i}" for i in range(1, 13)]
PLAID_LENGTH = 256  # samples after resampling (recordings have 100–1,344, median 300)


@dataclass(frozen=True)
class Dataset:
    """Samples with integer labels.

    Attributes:
        x: float32 samples, ``(N, L, C)`` for sensor windows (layout ``NLC``) or ``(N, H, W, C)`` for images.
        y: int32 class indices, ``(N,)``.
        labels: class names, indexed by ``y``.
        channels: names of the last axis' channels (sensor axes), or ``None`` for images.
        layout: ``"NLC"`` or ``"NHWC"``.
        rate_hz: sampling rate of sensor windows, else ``None``.
    """

    x: np.ndarray
    y: np.ndarray
    labels: list[str]
    channels: list[str] | None
    layout: str
    rate_hz: float | None = None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> Dataset:
        """The samples at ``index`` (an int array), with the same metadata."""
        return Dataset(self.x[index], self.y[index], self.labels, self.channels, self.layout, self.rate_hz)

    def with_x(self, x: np.ndarray) -> Dataset:
        """The same labels and metadata with other samples of the same count (e.g. a transformed copy)."""
        if len(x) != len(self.y):
            raise ValueError(f"with_x needs {len(self.y)} samples, got {len(x)}")
        return Dataset(x.astype(np.float32), self.y, self.labels, self.channels, self.layout, self.rate_hz)


@dataclass(frozen=True)
class FactoryUserSplit:
    """The three disjoint parts of one data set.

    Attributes:
        factory: what the factory model is pre-trained on.
        device_train: the new user's recordings the device collects (CSV replay) and trains on.
        holdout: the new user's recordings kept for the before/after evaluation.
    """

    factory: Dataset
    device_train: Dataset
    holdout: Dataset


def load_basic_motions() -> Dataset:
    """All 80 BasicMotions recordings (sktime's train and test splits, in that order).

    Returns:
        ``x`` float32 ``(80, 100, 6)`` channels-last (accelerometer x, y, z then gyroscope x, y, z), labels
        sorted by name.
    """
    from sktime.datasets import load_basic_motions as _load  # heavy import, only when asked for

    x, names = _load(return_type="numpy3D")  # (N, C, L), object labels
    x = np.transpose(np.asarray(x, dtype=np.float32), (0, 2, 1))
    labels = sorted({str(n) for n in names})
    y = np.array([labels.index(str(n)) for n in names], dtype=np.int32)
    log.debug("BasicMotions: x %s, classes %s", x.shape, labels)
    return Dataset(x, y, labels, list(BASICMOTIONS_CHANNELS), "NLC", BASICMOTIONS_RATE_HZ)


def load_digits() -> Dataset:
    """scikit-learn's 1,797 handwritten digits.

    Returns:
        ``x`` float32 ``(1797, 8, 8, 1)`` in ``[0, 1]``, labels ``"0"``…``"9"``.
    """
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[..., None]
    y = np.asarray(bunch.target, dtype=np.int32)
    return Dataset(x, y, [str(d) for d in range(10)], None, "NHWC")


def resample(series: np.ndarray, length: int) -> np.ndarray:
    """One recording ``(T, C)`` linearly interpolated onto ``length`` points spanning its first to last sample.

    Returns:
        float32 ``(length, C)``; a single-sample recording is repeated.
    """
    series = np.asarray(series, dtype=np.float64)
    t = len(series)
    if t == 1:
        return np.repeat(series, length, axis=0).astype(np.float32)
    src, dst = np.arange(t, dtype=np.float64), np.linspace(0.0, t - 1, length)
    return np.stack([np.interp(dst, src, series[:, c]) for c in range(series.shape[1])], axis=1).astype(np.float32)


PLAID_FLOOR_A = 1e-4  # log_compress's unit: the smallest traces peak at 2e-4 A, the largest at 470 A


def log_compress(x: np.ndarray, floor: float = PLAID_FLOOR_A) -> np.ndarray:
    """``sign(x) · log1p(|x| / floor)``: peaks from 2e-4 to 470 A onto one scale (0.7 to 15), order and sign kept."""
    return (np.sign(x) * np.log1p(np.abs(x) / floor)).astype(np.float32)


def log_expand(v: np.ndarray, floor: float = PLAID_FLOOR_A) -> np.ndarray:
    """The inverse of :func:`log_compress`: amperes, float64."""
    v = np.asarray(v, dtype=np.float64)
    return np.sign(v) * np.expm1(np.abs(v)) * floor


def _sktime_unequal(load_fn, length: int) -> tuple[np.ndarray, list[str]]:
    """All recordings of an sktime loader with unequal lengths (its train then test split), resampled.

    Returns:
        ``(x (N, length, C) float32, label names per recording)``.
    """
    frames, names = load_fn(return_type="nested_univ")  # one pd.Series per cell: lengths may differ
    x = np.stack([resample(np.stack([frames.iat[i, c].to_numpy() for c in range(frames.shape[1])], axis=1), length)
                  for i in range(len(frames))])
    return x, [str(n) for n in names]


def _labelled(names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Integer labels for names, classes sorted numerically when every name is a number."""
    labels = sorted(set(names), key=lambda n: (int(n), n) if n.isdigit() else (0, n))
    return np.array([labels.index(n) for n in names], dtype=np.int32), labels


def load_japanese_vowels() -> Dataset:
    """All 640 JapaneseVowels utterances (sktime's 270 train then 370 test), resampled to 32 frames.

    Returns:
        ``x`` float32 ``(640, 32, 12)`` (LPC cepstrum coefficients 1–12), labels ``"1"``…``"9"`` (speakers).
        ``rate_hz`` is ``None``: resampling changes each utterance's frame rate (originally 156.25 Hz).
    """
    from sktime.datasets import load_japanese_vowels as _load

    x, names = _sktime_unequal(_load, JAPANESE_VOWELS_LENGTH)
    y, labels = _labelled(names)
    return Dataset(x, y, labels, list(JAPANESE_VOWELS_CHANNELS), "NLC")


def load_plaid() -> Dataset:
    """All 1,074 PLAID current traces (sktime's train then test split), resampled to 256 samples, log-compressed.

    Returns:
        ``x`` float32 ``(1074, 256, 1)``, labels ``"0"``…``"10"`` (appliance types, sktime's class codes).
    """
    from sktime.datasets import load_plaid as _load

    x, names = _sktime_unequal(_load, PLAID_LENGTH)
    y, labels = _labelled(names)
    return Dataset(log_compress(x), y, labels, ["current"], "NLC")


LOADERS = {"basicmotions": load_basic_motions, "digits": load_digits, "japanesevowels": load_japanese_vowels,
           "plaid": load_plaid}


def load(name: DatasetName) -> Dataset:
    """Load a data set by name.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    try:
        loader = LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(LOADERS)}") from None
    return loader()


def stratified_split(y: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Cut sample indices into parts with the given fractions of every class.

    Each class is shuffled with ``seed`` and cut at the rounded cumulative fractions, so every part gets its
    share of every class (at least one sample per class and part whenever the class has enough).

    Args:
        y: class indices ``(N,)``.
        fractions: part sizes as fractions of each class; they must sum to 1.
        seed: shuffling seed; the same seed gives the same parts.

    Returns:
        One sorted int index array per fraction.

    Raises:
        ValueError: fractions that are not positive or do not sum to 1.
    """
    if any(f <= 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    bounds = np.cumsum((0.0, *fractions))
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        cuts = np.rint(bounds * len(idx)).astype(int)
        for part, lo, hi in zip(parts, cuts[:-1], cuts[1:], strict=True):
            part.extend(idx[lo:hi].tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def split_factory_user(
    data: Dataset, factory: float = 0.5, device_train: float = 0.3, seed: int = 0
) -> FactoryUserSplit:
    """Cut a data set into the factory part and the new user's device-train and hold-out parts.

    Args:
        data: the whole data set.
        factory: fraction of each class for pre-training.
        device_train: fraction of each class the device trains on; the rest is held out.
        seed: split seed.

    Returns:
        The three disjoint, class-stratified parts.
    """
    holdout = 1.0 - factory - device_train
    f_idx, d_idx, h_idx = stratified_split(data.y, (factory, device_train, holdout), seed)
    return FactoryUserSplit(data.subset(f_idx), data.subset(d_idx), data.subset(h_idx))


def write_edge_impulse_csv(
    path: str | os.PathLike[str],
    windows: np.ndarray,
    labels: list[str] | None,
    channels: list[str],
    rate_hz: float,
    start_ms: int = 0,
) -> Path:
    """Write sensor windows back to back as one Edge-Impulse-style CSV recording.

    Windows follow each other without a gap, so a reader that cuts the stream into consecutive,
    non-overlapping windows of the same length from the first row gets the windows back exactly.

    Args:
        path: the CSV file to write (parent directories are created).
        windows: ``(N, L, C)`` samples.
        labels: one label name per window, or ``None`` to write no ``label`` column.
        channels: the ``C`` column names.
        rate_hz: sampling rate; timestamps step by ``1000 / rate_hz`` ms (rounded to whole ms).
        start_ms: timestamp of the first row.

    Returns:
        The path written.

    Raises:
        ValueError: shapes that do not match the channel names or the label count.
    """
    windows = np.asarray(windows)
    if windows.ndim != 3 or windows.shape[2] != len(channels):
        raise ValueError(f"windows must be (N, L, {len(channels)}) for channels {channels}, got {windows.shape}")
    if labels is not None and len(labels) != len(windows):
        raise ValueError(f"need one label per window: {len(windows)} windows, {len(labels)} labels")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n, length, _ = windows.shape
    period_ms = 1000.0 / rate_hz
    header = ["timestamp", *channels] + (["label"] if labels is not None else [])
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(n):
            for t in range(length):
                step = i * length + t
                row: list[str] = [str(start_ms + round(step * period_ms))]
                row.extend(repr(float(v)) for v in windows[i, t])
                if labels is not None:
                    row.append(labels[i])
                writer.writerow(row)
    log.info("Wrote %d windows of %d steps to %s", n, length, out)
    return out


def read_edge_impulse_csv(
    path: str | os.PathLike[str], window_length: int
) -> tuple[np.ndarray, list[str] | None, list[str], np.ndarray]:
    """Read a CSV written by :func:`write_edge_impulse_csv` back into consecutive windows.

    Args:
        path: the CSV file.
        window_length: steps per window; trailing rows that do not fill a window are dropped.

    Returns:
        ``(windows (N, L, C) float32, labels per window or None, channel names, timestamps_ms (N·L,))``; a
        window's label is its first row's.
    """
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    has_label = header[-1] == "label"
    channels = header[1:-1] if has_label else header[1:]
    n = len(rows) // window_length
    rows = rows[: n * window_length]
    stamps = np.array([int(r[0]) for r in rows], dtype=np.int64)
    values = np.array([[float(v) for v in r[1 : 1 + len(channels)]] for r in rows], dtype=np.float32)
    windows = values.reshape(n, window_length, len(channels))
    labels = [rows[i * window_length][-1] for i in range(n)] if has_label else None
    return windows, labels, channels, stamps
