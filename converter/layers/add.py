"""Add (residual): the gradient flows unchanged to every input; nothing saved."""

from __future__ import annotations

import tensorflow as tf

from converter.layers.base import ForwardContext, Node

WEIGHTED = False


def forward(node: Node, params: dict, xs: list[tf.Tensor], ctx: ForwardContext):
    return tf.add_n(xs) if len(xs) > 2 else xs[0] + xs[1], None


def backward(node: Node, params: dict, saved, dy: tf.Tensor, need_dx: bool):
    return [dy if need_dx else None for _ in node.inputs], {}


def saved_bytes(node: Node, batch: int) -> int:
    return 0
