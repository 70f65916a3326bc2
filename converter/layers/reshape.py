"""Flatten/Reshape and the identities (Dropout at inference is the identity); ZeroPadding as pad/crop."""

from __future__ import annotations

import tensorflow as tf

from converter.layers.base import ForwardContext, Node

WEIGHTED = False


def forward(node: Node, params: dict, xs: list[tf.Tensor], ctx: ForwardContext):
    pads = node.config.get("pads")
    if pads is not None:
        return tf.pad(xs[0], [[0, 0], *pads, [0, 0]]), None
    if node.in_shapes[0] == node.out_shape:
        return xs[0], None
    return tf.reshape(xs[0], [-1, *node.out_shape]), None


def backward(node: Node, params: dict, saved, dy: tf.Tensor, need_dx: bool):
    if not need_dx:
        return [None], {}
    pads = node.config.get("pads")
    if pads is not None:
        crop = tuple(slice(before, before + size) for (before, _), size in zip(pads, node.in_shapes[0], strict=False))
        return [dy[(slice(None), *crop)]], {}
    return [tf.reshape(dy, [dy.shape[0], *node.in_shapes[0]])], {}


def saved_bytes(node: Node, batch: int) -> int:
    return 0
