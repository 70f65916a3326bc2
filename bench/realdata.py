"""Adapter from ``demo`` to the benchmark: the real data sets, split and shifted as the demo does, and the
"factory" model pre-trained on them with fixed seeds (cached on disk).

Reuses :func:`demo.run.prepare_data` (stratified factory/new-user split, the simulated new-user shift, the
factory normalisation) and :mod:`demo.models` (the small supported-layer models and their pre-training).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
CALIBRATION_SAMPLES = 64


@dataclass(frozen=True)
class RealData:
    """What an accuracy run needs: the pre-trained model and the new user's normalised data.

    Attributes:
        model: the pre-trained Keras model (a fresh copy per call of :func:`load`).
        x_train, y_train: the new user's (shifted) recordings the device fine-tunes on.
        x_test, y_test: the new user's held-out recordings (shifted), for accuracy before and after.
        calibration: factory samples for the converter's ε-ranks.
        labels: class names.
        input_spec: the bundle's input spec fields.
    """

    model: Any
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    calibration: np.ndarray
    labels: list[str]
    input_spec: dict[str, Any]


def load(dataset: str, seed: int, cache_dir: Path) -> RealData:
    """Split, shift and normalise ``dataset`` for ``seed`` and pre-train (or load) its factory model.

    Args:
        dataset: a data set with settings in ``demo.run.SETTINGS`` (``digits``, ``basicmotions``,
            ``japanesevowels``, ``plaid``).
        seed: split, pre-training and initialisation seed.
        cache_dir: where pre-trained models are kept between invocations.
    """
    import keras

    from demo import models
    from demo.run import SETTINGS, prepare_data

    settings = SETTINGS[dataset]
    data = prepare_data(dataset, settings, seed)
    model = models.build(dataset, classes=len(data.factory.labels), seed=seed)
    key = hashlib.sha256(json.dumps([dataset, seed, settings.pretrain_epochs, model.to_json(),
                                     len(data.factory)]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"pretrained-{dataset}-{seed}-{key}.keras"
    if path.is_file():
        model = keras.saving.load_model(path)
    else:
        models.pretrain(model, data.normalise(data.factory.x), data.factory.y, settings.pretrain_epochs, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.keras")  # two processes pre-training one seed: never a torn file
        model.save(tmp)
        tmp.replace(path)
        log.info("pre-trained %s (seed %d) saved to %s", dataset, seed, path)
    rng = np.random.default_rng(seed)
    calibration = data.normalise(data.factory.x[rng.permutation(len(data.factory))[:CALIBRATION_SAMPLES]])
    spec: dict[str, Any] = {"layout": data.factory.layout}
    if data.factory.layout == "NLC":
        spec |= {"channels": data.factory.channels, "rate_hz": data.factory.rate_hz}
    return RealData(model, data.normalise(data.user_train.x), data.user_train.y, data.normalise(data.user_holdout.x),
                    data.user_holdout.y, calibration, list(data.factory.labels), spec)
