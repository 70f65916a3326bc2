"""Frozen BatchNormalization: an affine map with its statistics folded in; no weights trained, nothing saved."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from converter.errors import ConversionError
from converter.layers.base import ForwardContext, Node

WEIGHTED = False


def parse(layer, node: Node) -> None:
    axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
    if axis not in (-1, len(node.in_shapes[0])):
        raise ConversionError(f"layer {layer.name!r} (BatchNormalization): only the last (channel) axis is "
                              f"supported, got axis={layer.axis}")
    channels = node.in_shapes[0][-1]
    gamma = layer.gamma.numpy() if layer.scale else np.ones(channels, np.float32)
    beta = layer.beta.numpy() if layer.center else np.zeros(channels, np.float32)
    scale = gamma / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
    node.weights = {"scale": scale.astype(np.float32),
                    "shift": (beta - layer.moving_mean.numpy() * scale).astype(np.float32)}


def forward(node: Node, params: dict, xs: list[tf.Tensor], ctx: ForwardContext):
    return xs[0] * params["scale"] + params["shift"], None


def backward(node: Node, params: dict, saved, dy: tf.Tensor, need_dx: bool):
    return [dy * params["scale"] if need_dx else None], {}


def saved_bytes(node: Node, batch: int) -> int:
    return 0
