"""GlobalAveragePooling (1-D and 2-D): mean over the spatial axes; the gradient is spread evenly."""

from __future__ import annotations

import math

import tensorflow as tf

from converter.layers.base import ForwardContext, Node

WEIGHTED = False


def _axes(node: Node) -> list[int]:
    return list(range(1, len(node.in_shapes[0])))


def forward(node: Node, params: dict, xs: list[tf.Tensor], ctx: ForwardContext):
    y = tf.reduce_mean(xs[0], axis=_axes(node))
    return tf.reshape(y, [-1, *node.out_shape]), None


def backward(node: Node, params: dict, saved, dy: tf.Tensor, need_dx: bool):
    if not need_dx:
        return [None], {}
    in_shape = node.in_shapes[0]
    positions = math.prod(in_shape[:-1])
    dy = tf.reshape(dy, [dy.shape[0]] + [1] * (len(in_shape) - 1) + [in_shape[-1]])
    return [tf.broadcast_to(dy / float(positions), [dy.shape[0], *in_shape])], {}


def saved_bytes(node: Node, batch: int) -> int:
    return 0
