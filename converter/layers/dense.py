"""Dense on 2-D (B, F) or N-D (B, ..., F) inputs: forward, backward and saved-activation size.

Saves its input whole: the paper compresses convolution activations, and a Dense input is already a matrix.
A trained layer's products are BATCH_MATMULs (:func:`converter.ops.matmul`): the input gradient's ``dy @ Wᵀ``
would otherwise become a FULLY_CONNECTED with a variable weight, which XNNPACK does not run.
"""

from __future__ import annotations

import math

import tensorflow as tf

from converter import ops
from converter.layers.base import ForwardContext, Node

WEIGHTED = True


def parse(layer, node: Node) -> None:
    node.weights = {"kernel": layer.kernel.numpy()}
    if layer.use_bias:
        node.weights["bias"] = layer.bias.numpy()


def forward(node: Node, params: dict, xs: list[tf.Tensor], ctx: ForwardContext):
    x = xs[0]
    matmul = ops.matmul if node.trainable else tf.matmul  # a frozen head: FULLY_CONNECTED, constant weights
    y = matmul(ops.flatten_rows(x), params["kernel"])
    if "bias" in params:
        y = y + params["bias"]
    if len(node.in_shapes[0]) > 1:
        y = tf.reshape(y, [-1, *node.out_shape])
    return y, (x if ctx.training else None)


def backward(node: Node, params: dict, saved: tf.Tensor, dy: tf.Tensor, need_dx: bool):
    x2, dy2 = ops.flatten_rows(saved), ops.flatten_rows(dy)
    grads = {"kernel": ops.matmul_tn(x2, dy2)}
    if "bias" in params:
        grads["bias"] = tf.reduce_sum(dy2, axis=0)
    dx = None
    if need_dx:
        dx = tf.reshape(ops.matmul(dy2, params["kernel"], transpose_b=True), saved.shape)
    return [dx], grads


def saved_bytes(node: Node, batch: int) -> int:
    return 4 * batch * math.prod(node.in_shapes[0])
