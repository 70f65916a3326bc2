"""Conv1D, lowered to Conv2D on a unit height axis: (B, L, C) <-> (B, 1, L, C), kernel (K, Ci, Co) <-> (1, K, Ci, Co).

The saved input is the 4-D (B, 1, L, C) view, so the compression methods see a unit height mode and keep it
whole; 'causal' padding pads the width on the left only.
"""

from __future__ import annotations

import tensorflow as tf

from converter.errors import ConversionError
from converter.layers import conv2d
from converter.layers.base import ForwardContext, Node, after_saved

WEIGHTED = True


def parse(layer, node: Node) -> None:
    if getattr(layer, "groups", 1) != 1:
        raise ConversionError(f"layer {layer.name!r} (Conv1D): grouped convolution is not supported")
    kernel = layer.kernel.numpy()
    length = node.in_shapes[0][0]
    node.config = conv2d.spatial_config(layer.name, (1, length), (1, kernel.shape[0]), (1, layer.strides[0]),
                                        (1, layer.dilation_rate[0]), layer.padding)
    node.weights = {"kernel": kernel}
    if layer.use_bias:
        node.weights["bias"] = layer.bias.numpy()


def _as_2d(x: tf.Tensor) -> tf.Tensor:
    """(B, L, C) -> (B, 1, L, C)."""
    return tf.expand_dims(x, 1)


def _kernel_2d(kernel: tf.Tensor) -> tf.Tensor:
    """(K, Ci, Co) -> (1, K, Ci, Co)."""
    return tf.expand_dims(kernel, 0)


def forward(node: Node, params: dict, xs: list[tf.Tensor], ctx: ForwardContext):
    x4 = _as_2d(xs[0])
    saved = ctx.save_input(node, x4)
    kernel = _kernel_2d(after_saved(params["kernel"], saved))
    y = tf.squeeze(conv2d.conv(x4, kernel, node.config, node.trainable), axis=1)
    if "bias" in params:
        y = y + params["bias"]
    return y, saved


def backward(node: Node, params: dict, saved, dy: tf.Tensor, need_dx: bool):
    dy4 = _as_2d(dy)
    grads = {"kernel": tf.squeeze(conv2d.weight_grad(saved, dy4, node.config), axis=0)}
    if "bias" in params:
        grads["bias"] = tf.reduce_sum(dy, axis=[0, 1])
    dx = None
    if need_dx:
        dx = tf.squeeze(conv2d.input_grad(dy4, _kernel_2d(params["kernel"]), node.config), axis=1)
    return [dx], grads


saved_bytes = conv2d.saved_bytes
