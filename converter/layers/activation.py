"""ReLU and ReLU6 (as layers or as a layer's ``activation``): save a bit-packed mask, not the float input."""

from __future__ import annotations

import math

import tensorflow as tf

from converter.layers.base import ForwardContext, Node, pack_mask_by_rows, packed_mask_bytes, unpack_mask

WEIGHTED = False


def forward(node: Node, params: dict, xs: list[tf.Tensor], ctx: ForwardContext):
    x = xs[0]
    relu6 = node.config["max_value"] is not None
    y = tf.nn.relu6(x) if relu6 else tf.nn.relu(x)
    if not ctx.training:
        return y, None

    def passes(part: tf.Tensor) -> tf.Tensor:
        return tf.logical_and(part > 0, part < 6.0) if relu6 else part > 0

    return y, pack_mask_by_rows([x], passes, math.prod(x.shape[1:]))


def backward(node: Node, params: dict, saved: tf.Tensor, dy: tf.Tensor, need_dx: bool):
    if not need_dx:
        return [None], {}
    return [tf.where(unpack_mask(saved, dy), dy, tf.zeros_like(dy))], {}


def saved_bytes(node: Node, batch: int) -> int:
    """One bit per element for the mask."""
    return packed_mask_bytes(batch * math.prod(node.in_shapes[0]))
