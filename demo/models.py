"""Small Keras models for the demo and the benchmarks, built only from layers the converter supports.

Supported by ``converter`` (and used here): Conv1D, Conv2D, Dense, BatchNormalization, ReLU, MaxPooling with
``pool_size == strides``, GlobalAveragePooling, Dropout, and a final Dense with softmax. The last layers are
the ones a bundle trains on the device, so each model ends in a convolution block and a classifier that are
worth fine-tuning.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


def imu_cnn(window: int = 100, channels: int = 6, classes: int = 4, name: str = "imu_cnn",
            pool: int = 2) -> keras.Model:
    """A 1-D CNN for sensor windows.

    Args:
        window: steps per window ``L``.
        channels: sensor axes ``C``.
        classes: output classes ``K``.
        name: Keras model name (it names the bundle).
        pool: size and stride of both max-poolings (the window shrinks by ``pool²`` before ``conv3``).

    Returns:
        A model ``(B, L, C) -> (B, K)`` probabilities.
    """
    import keras
    from keras import layers

    inputs = keras.Input((window, channels), name="x")
    x = layers.Conv1D(16, 5, padding="same", use_bias=False, name="conv1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.MaxPooling1D(pool, strides=pool, name="pool1")(x)
    x = layers.Conv1D(32, 5, padding="same", use_bias=False, name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.MaxPooling1D(pool, strides=pool, name="pool2")(x)
    x = layers.Conv1D(32, 3, padding="same", name="conv3")(x)
    x = layers.ReLU(name="relu3")(x)
    x = layers.GlobalAveragePooling1D(name="gap")(x)
    x = layers.Dropout(0.2, name="drop")(x)
    outputs = layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def digits_cnn(classes: int = 10, name: str = "digits_cnn") -> keras.Model:
    """A small 2-D CNN for 8×8 grey images.

    Args:
        classes: output classes ``K``.
        name: Keras model name.

    Returns:
        A model ``(B, 8, 8, 1) -> (B, K)`` probabilities.
    """
    import keras
    from keras import layers

    inputs = keras.Input((8, 8, 1), name="x")
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.MaxPooling2D(2, strides=2, name="pool2")(x)
    x = layers.Conv2D(32, 3, padding="same", name="conv3")(x)
    x = layers.ReLU(name="relu3")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def digits_wide(classes: int = 10, name: str = "digits_wide") -> keras.Model:
    """The 8×8 digits seen at 32×32 (bilinear upsampling inside the model) through wide early activations.

    Every 1×1 convolution at 32×32 saves a ``B × 32 × 32 × 32`` input for its weight gradient (8 MiB at batch
    64): the deeper the fine-tuning, the more memory a training step takes, so a RAM ceiling decides how many
    layers a device can train (what the demo's ``fit`` stage shows).

    Args:
        classes: output classes ``K``.
        name: Keras model name.

    Returns:
        A model ``(B, 8, 8, 1) -> (B, K)`` probabilities.
    """
    import keras
    from keras import layers

    inputs = keras.Input((8, 8, 1), name="x")
    x = layers.UpSampling2D(4, interpolation="bilinear", name="upsample")(inputs)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(x)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.Conv2D(32, 1, activation="relu", name="pw1")(x)
    x = layers.Conv2D(32, 1, activation="relu", name="pw2")(x)
    x = layers.MaxPooling2D(2, strides=2, name="pool1")(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv16")(x)
    x = layers.MaxPooling2D(2, strides=2, name="pool2")(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv8")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name=name)


MODELS = {
    "basicmotions": imu_cnn,
    "digits": digits_cnn,
    "digits-wide": digits_wide,
    # 32 frames × 12 cepstra: conv3 sees 8 frames
    "japanesevowels": functools.partial(imu_cnn, window=32, channels=12, name="vowels_cnn"),
    # 256 samples × 1 current: pooling by 4 twice, conv3 sees 16 samples
    "plaid": functools.partial(imu_cnn, window=256, channels=1, pool=4, name="plaid_cnn"),
}


def build(dataset: str, classes: int, seed: int = 0) -> keras.Model:
    """The demo's model for ``dataset``, with weights initialised from ``seed``.

    Args:
        dataset: a key of :data:`MODELS`.
        classes: output classes.
        seed: seeds the weight initialisers (``keras.utils.set_random_seed``) before the layers are built.

    Raises:
        ValueError: an unknown dataset (the message lists the known ones).
    """
    import keras

    try:
        builder = MODELS[dataset]
    except KeyError:
        raise ValueError(f"no demo model for dataset {dataset!r}; choose one of {list(MODELS)}") from None
    keras.utils.set_random_seed(seed)
    return builder(classes=classes)


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`pretrain` did: final training loss and accuracy, epochs run."""

    loss: float
    accuracy: float
    epochs: int


def pretrain(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    seed: int = 0,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
) -> PretrainResult:
    """Train a model from scratch with fixed seeds (the "factory" training).

    Args:
        model: an uncompiled or compiled Keras model ending in softmax.
        x: inputs ``(N, ...)``, already normalised.
        y: int class indices ``(N,)``.
        epochs: passes over ``x``.
        seed: seeds Python, numpy and the backend (``keras.utils.set_random_seed``) and the shuffling.
        batch_size: mini-batch size.
        learning_rate: Adam's step size.

    Returns:
        The last epoch's training loss and accuracy.
    """
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)
    loss = float(history.history["loss"][-1])
    acc = float(history.history["accuracy"][-1])
    log.info("Pre-trained %s for %d epochs: loss %.3f, accuracy %.3f", model.name, epochs, loss, acc)
    return PretrainResult(loss, acc, epochs)


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a Keras classifier on ``(x, y)``."""
    probs = model.predict(x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(probs, axis=-1) == y))
