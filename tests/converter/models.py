"""Keras models whose trainable part holds every supported layer type (seeded, small)."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers


def _randomise_batchnorm(model: keras.Model, seed: int) -> None:
    """Non-trivial frozen statistics, so folding mean/variance/gamma/beta is actually exercised."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.beta.assign(rng.uniform(-0.2, 0.2, c).astype("float32"))
            layer.moving_mean.assign(rng.uniform(-0.1, 0.1, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))


def every_layer_2d(seed: int = 0) -> keras.Model:
    """Conv2D ('same', stride-2 'valid', 1×1, dilated), MaxPool with a dropped remainder, frozen BN, ReLU,
    ReLU6, DepthwiseConv2D (multiplier 2), residual Add, AvgPool, Reshape, N-D Dense, GAP, Dropout, softmax."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((21, 21, 3))
    h = layers.Conv2D(6, 3, padding="same", activation="relu", name="conv_same")(inp)
    h = layers.MaxPooling2D(2, name="maxpool")(h)  # 21 -> 10, last row/column dropped
    h = layers.Conv2D(8, 3, strides=2, padding="valid", name="conv_stride2_valid")(h)  # 10 -> 4
    h = layers.BatchNormalization(name="bn")(h)
    skip = layers.ReLU(6.0, name="relu6")(h)
    h = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="depthwise")(skip)
    h = layers.ReLU(name="relu")(h)
    h = layers.Conv2D(8, 1, name="conv_1x1")(h)
    h = layers.Add(name="residual")([h, skip])
    h = layers.Conv2D(8, 3, dilation_rate=2, padding="same", name="conv_dilated")(h)
    h = layers.AveragePooling2D(2, name="avgpool")(h)  # 4 -> 2
    h = layers.Reshape((4, 8), name="reshape")(h)
    h = layers.Dense(6, activation="relu", name="dense_nd")(h)
    h = layers.GlobalAveragePooling1D(name="gap")(h)
    h = layers.Dropout(0.2, name="dropout")(h)
    out = layers.Dense(4, activation="softmax", name="head")(h)
    model = keras.Model(inp, out, name="every_layer_2d")
    _randomise_batchnorm(model, seed)
    return model


def zero_padded_2d(seed: int = 0) -> keras.Model:
    """ZeroPadding2D before a stride-2 depthwise layer (MobileNetV2's downsampling blocks) and before a 'same' 3×3
    conv (both folded into the convolution's padding), and one read by a conv and a residual Add (kept)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 3))
    h = layers.Conv2D(8, 1, activation="relu6", name="expand")(inp)
    h = layers.ZeroPadding2D(((0, 1), (0, 1)), name="pad_s2")(h)
    h = layers.DepthwiseConv2D(3, strides=2, padding="valid", name="depthwise_s2")(h)  # 13 -> 6
    h = layers.ZeroPadding2D(((2, 1), (1, 2)), name="pad_same")(h)
    h = layers.Conv2D(6, 3, padding="same", name="conv_padded_same")(h)  # 9 -> 9
    shared = layers.ZeroPadding2D(1, name="pad_shared")(h)
    h = layers.Conv2D(6, 3, padding="same", name="conv_after_shared")(shared)
    h = layers.Add(name="residual")([h, shared])
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    out = layers.Dense(4, activation="softmax", name="head")(h)
    return keras.Model(inp, out, name="zero_padded_2d")


def every_layer_1d(seed: int = 0) -> keras.Model:
    """Conv1D (causal dilated, stride-2 'valid'), AvgPool1D, MaxPool1D, Flatten, Dense: a sensor-window model."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((24, 3))
    h = layers.Conv1D(6, 3, padding="causal", dilation_rate=2, activation="relu", name="conv_causal")(inp)
    h = layers.AveragePooling1D(2, name="avgpool1d")(h)  # 24 -> 12
    h = layers.Conv1D(8, 3, strides=2, padding="valid", name="conv_stride2")(h)  # 12 -> 5
    h = layers.ReLU(name="relu")(h)
    h = layers.MaxPooling1D(2, name="maxpool1d")(h)  # 5 -> 2
    h = layers.Flatten(name="flatten")(h)
    out = layers.Dense(3, activation="softmax", name="head")(h)
    return keras.Model(inp, out, name="every_layer_1d")


def weighted_count(model: keras.Model) -> int:
    return sum(type(layer).__name__ in ("Conv1D", "Conv2D", "DepthwiseConv2D", "Dense") for layer in model.layers)
