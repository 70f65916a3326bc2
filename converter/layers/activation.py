"""ReLU and ReLU6 (as layers or as a layer's ``activation``): save a bit-packed mask, not the float input."""

from __future__ import annotations

import math

import tensorflow as tf

from converter.layers.base import ForwardContext, Node, pack_mask, packed_mask_bytes, unpack_mask

WEIGHTED = False


def forward(node: Node, params: dict, xs: list[tf.Tensor], ctx: ForwardContext):
    x = xs[0]
    if node.config["max_value"] is None:
        y = tf.nn.relu(x)
        mask = x > 0
    else:
        y = tf.nn.relu6(x)
        mask = tf.logical_and(x > 0, x < 6.0)
    return y, (pack_mask(mask) if ctx.training else None)


def backward(node: Node, params: dict, saved: tf.Tensor, dy: tf.Tensor, need_dx: bool):
    if not need_dx:
        return [None], {}
    return [tf.where(unpack_mask(saved, dy), dy, tf.zeros_like(dy))], {}


def saved_bytes(node: Node, batch: int) -> int:
    """One bit per element for the mask."""
    return packed_mask_bytes(batch * math.prod(node.in_shapes[0]))
