"""The paper-scale models of the benchmark, built only from layers the converter supports, with BatchNorm
statistics calibrated on structured inputs so the activations have realistic ranks.

Random-init networks whose BatchNorm layers still hold mean 0 / variance 1 produce features that collapse to
rank ≈ 1 deep in the network, which makes compression look unrealistically good. :func:`calibrate_batchnorm`
sets every BatchNorm's moving statistics to the batch statistics of real-looking inputs
(:func:`structured_images`: scikit-learn's handwritten digits, upscaled, coloured and noised), layer by layer in
one training-mode forward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool = True):
    from keras import layers

    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def resnet18_style(input_size: int = 224, classes: int = 10, name: str = "resnet18") -> keras.Model:
    """ResNet-18 (He et al., basic blocks 2-2-2-2, widths 64-128-256-512) from supported Keras layers.

    The weighted layers end ``… s4b2_a_conv, s4b2_b_conv, head``: ``train_last=3`` trains the last two
    convolutions and the classifier.

    Args:
        input_size: square input side ``S``.
        classes: output classes ``K``.
        name: model name.

    Returns:
        A model ``(B, S, S, 3) -> (B, K)`` probabilities.
    """
    import keras
    from keras import layers

    inputs = keras.Input((input_size, input_size, 3), name="x")
    x = _conv_bn(inputs, 64, 7, 2, "stem")
    # The original's 3×3/2 max-pool is a 2×2/2 one here: the converter's pooling runs pool == strides only
    # (a 3×3/2 pool fails even in the frozen prefix, where calibration runs every layer's forward rule).
    x = layers.MaxPooling2D(2, strides=2, name="stem_pool")(x)
    for stage, filters in enumerate((64, 128, 256, 512), start=1):
        for block in (1, 2):
            stride = 2 if (block == 1 and stage > 1) else 1
            prefix = f"s{stage}b{block}"
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = _conv_bn(x, filters, 1, stride, f"{prefix}_down", relu=False)
            y = _conv_bn(x, filters, 3, stride, f"{prefix}_a")
            y = _conv_bn(y, filters, 3, 1, f"{prefix}_b", relu=False)
            x = layers.Add(name=f"{prefix}_add")([shortcut, y])
            x = layers.ReLU(name=f"{prefix}_out")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def mobilenet_v2(input_size: int = 224, classes: int = 10, name: str = "mobilenetv2") -> keras.Model:
    """``keras.applications.MobileNetV2`` with ``weights=None`` and a softmax head of ``classes``."""
    import keras

    model = keras.applications.MobileNetV2(input_shape=(input_size, input_size, 3), weights=None,
                                           classes=classes, classifier_activation="softmax")
    return keras.Model(model.inputs, model.outputs, name=name)


ARCHITECTURES: dict[str, Callable[..., keras.Model]] = {"mobilenetv2": mobilenet_v2, "resnet18": resnet18_style}


def structured_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Real-looking RGB images: handwritten digits (scikit-learn) upscaled to ``size``, tinted and noised.

    Args:
        n: number of images.
        size: side ``S`` in pixels.
        seed: picks the digits, tints and noise.

    Returns:
        float32 ``(n, S, S, 3)`` roughly in ``[-1, 1]`` (MobileNetV2's input range).
    """
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8)
    picked = digits[rng.integers(0, len(digits), n)]
    rows = (np.arange(size) * 8 // size).astype(int)
    grey = picked[:, rows][:, :, rows]  # nearest-neighbour upscaling
    tint = rng.uniform(0.3, 1.0, (n, 1, 1, 3)).astype(np.float32)
    background = rng.uniform(-1.0, 0.0, (n, 1, 1, 3)).astype(np.float32)
    images = background + grey[..., None] * tint * 2.0 + rng.normal(0, 0.05, (n, size, size, 3))
    return np.clip(images, -1.0, 1.0).astype(np.float32)


def calibrate_batchnorm(model: keras.Model, x: np.ndarray) -> int:
    """Set every BatchNormalization layer's moving mean/variance to the batch statistics of ``x``.

    One training-mode forward pass with momentum 0: each layer normalises with (and stores) the statistics of
    its own input, so deeper layers see the already calibrated earlier ones.

    Args:
        model: the model (changed in place).
        x: a batch of representative inputs ``(N, ...)``.

    Returns:
        The number of BatchNormalization layers calibrated.
    """
    from keras import layers

    bns = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        model(x, training=True)
    finally:
        for bn, momentum in zip(bns, saved, strict=True):
            bn.momentum = momentum
    log.debug("calibrated %d BatchNorm layers of %s on %d samples", len(bns), model.name, len(x))
    return len(bns)


def build_calibrated(arch: str, input_size: int, seed: int = 0, calibration: int = 32) -> tuple[keras.Model,
                                                                                              np.ndarray]:
    """A seeded paper-scale model with calibrated BatchNorm, and the structured inputs it was calibrated on.

    Raises:
        ValueError: an unknown architecture (the message lists the known ones).
    """
    import keras

    try:
        builder = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {list(ARCHITECTURES)}") from None
    keras.utils.set_random_seed(seed)
    model = builder(input_size=input_size)
    x = structured_images(calibration, input_size, seed)
    calibrate_batchnorm(model, x)
    return model, x
