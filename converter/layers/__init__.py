"""Layer registry: Keras class name -> the module holding its forward, backward and memory formula.

Each module exposes ``WEIGHTED``, ``forward(node, params, xs, ctx) -> (y, saved)``,
``backward(node, params, saved, dy, need_dx) -> (dxs, grads)`` and ``saved_bytes(node, batch)``; modules whose
layers carry attributes also have ``parse(layer, node)``, and those with restrictions in the trainable part
``check_trainable(node)``.
"""

from __future__ import annotations

from types import ModuleType

from converter.layers import (
    activation,
    add,
    batchnorm,
    conv1d,
    conv2d,
    dense,
    depthwise,
    global_pooling,
    pooling,
    reshape,
)

MODULES: dict[str, ModuleType] = {
    "Conv2D": conv2d,
    "Conv1D": conv1d,
    "DepthwiseConv2D": depthwise,
    "Dense": dense,
    "BatchNormalization": batchnorm,
    "ReLU": activation,
    "Activation": activation,
    "Add": add,
    "MaxPooling2D": pooling,
    "AveragePooling2D": pooling,
    "MaxPooling1D": pooling,
    "AveragePooling1D": pooling,
    "GlobalAveragePooling2D": global_pooling,
    "GlobalAveragePooling1D": global_pooling,
    "Flatten": reshape,
    "Reshape": reshape,
    "Dropout": reshape,
    "SpatialDropout1D": reshape,
    "SpatialDropout2D": reshape,
    "GaussianNoise": reshape,
    "ZeroPadding2D": reshape,
    "ZeroPadding1D": reshape,
}

WEIGHTED_TYPES = tuple(name for name, module in MODULES.items() if module.WEIGHTED)


def module_for(kind: str) -> ModuleType:
    """The module of a node kind (the Keras class name of a supported layer)."""
    return MODULES[kind]
