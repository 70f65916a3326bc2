"""The "new user" scenario shared by the demo and the benchmarks: factory data, and a new user's shifted data.

:func:`prepare` loads a data set, cuts it with :func:`demo.datasets.split_factory_user`, applies the data set's
simulated shift (:data:`demo.shift.SHIFTS`) to both new-user parts, and computes the normalisation the factory
model is trained with (per-channel mean/std of the factory part for sensor windows; none for images, which are
already in ``[0, 1]``). The converter writes that normalisation into the bundle's input spec, so the device
applies it to raw sensor values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from demo import datasets, shift


@dataclass(frozen=True)
class Scenario:
    """The factory part (as recorded) and the new user's parts (with the simulated shift applied).

    Attributes:
        factory: pre-training data, raw units.
        user_train: the new user's recordings the device trains on, shifted, raw units.
        user_holdout: the new user's held-out recordings, shifted, raw units.
        user_holdout_unshifted: the same held-out recordings without the shift.
        mean, std: per-channel normalisation (last axis), float32.
    """

    factory: datasets.Dataset
    user_train: datasets.Dataset
    user_holdout: datasets.Dataset
    user_holdout_unshifted: datasets.Dataset
    mean: np.ndarray
    std: np.ndarray

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` with the factory statistics, float32."""
        return ((x - self.mean) / self.std).astype(np.float32)


def prepare(name: datasets.DatasetName, factory: float = 0.5, device_train: float = 0.25, seed: int = 0) -> Scenario:
    """Load, split and shift one data set.

    Args:
        name: ``basicmotions`` or ``digits``.
        factory: fraction of each class for pre-training.
        device_train: fraction of each class the device trains on; the rest is held out.
        seed: split seed.

    Returns:
        The scenario.
    """
    data = datasets.load(name)
    split = datasets.split_factory_user(data, factory, device_train, seed)
    move = shift.SHIFTS[name]
    axes = tuple(range(split.factory.x.ndim - 1))
    if split.factory.layout == "NLC":
        mean = split.factory.x.mean(axis=axes)
        std = split.factory.x.std(axis=axes) + 1e-6
    else:
        channels = split.factory.x.shape[-1]
        mean, std = np.zeros(channels), np.ones(channels)
    return Scenario(
        factory=split.factory,
        user_train=split.device_train.with_x(move(split.device_train.x)),
        user_holdout=split.holdout.with_x(move(split.holdout.x)),
        user_holdout_unshifted=split.holdout,
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
    )
