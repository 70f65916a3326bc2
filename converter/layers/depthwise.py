"""DepthwiseConv2D: forward, backward and saved-activation size.

Kernel (KH, KW, C, M); output channel ``c·M + m`` sees only input channel ``c``. With a channel factor U_C
(K_C columns) the tap gradient is ``Σ_k U_C[c, k] (Zᵀ dY)[k, c·M+m]`` — a (K_C, C·M) matmul masked by U_C —
so the channel-mixing of the Tucker form never rebuilds the activation and depthwise layers do get a gradient
(unlike the reference code's grouped branch).
"""

from __future__ import annotations

import tensorflow as tf

from converter import ops
from converter.compression.factored import CHANNELS, Factored
from converter.layers import conv2d
from converter.layers.base import ForwardContext, Node, after_saved, depend

WEIGHTED = True


def parse(layer, node: Node) -> None:
    kernel = layer.kernel.numpy()  # Keras 3 names it `kernel`; the role keeps the Keras 2 name
    node.config = conv2d.spatial_config(layer.name, node.in_shapes[0][:2], kernel.shape[:2], layer.strides,
                                        layer.dilation_rate, layer.padding)
    node.weights = {"depthwise_kernel": kernel}
    if layer.use_bias:
        node.weights["bias"] = layer.bias.numpy()


def forward(node: Node, params: dict, xs: list[tf.Tensor], ctx: ForwardContext):
    cfg = node.config
    saved = ctx.save_input(node, xs[0])
    xp = ops.pad_hw(xs[0], cfg["pads"])
    y = tf.nn.depthwise_conv2d(xp, after_saved(params["depthwise_kernel"], saved), strides=[1, *cfg["strides"], 1],
                               padding="VALID", dilations=cfg["dilation"])
    if "bias" in params:
        y = y + params["bias"]
    return y, saved


def weight_grad(saved: Factored, dy: tf.Tensor, cfg: dict, kernel_shape) -> tf.Tensor:
    """dL/dkernel (KH, KW, C, M)."""
    _, _, c, m = kernel_shape
    u_c = saved.factors[CHANNELS]

    def tap_grad(window: tf.Tensor, dy_b: tf.Tensor) -> tf.Tensor:
        if u_c is None and m == 1:  # whole channels: an elementwise product summed over positions
            return tf.expand_dims(tf.reduce_sum(window * dy_b, axis=0), 1)
        if u_c is None:
            return tf.reduce_sum(tf.expand_dims(window, 2) * tf.reshape(dy_b, [-1, c, m]), axis=0)
        g = tf.reshape(ops.matmul_tn(window, dy_b), [u_c.shape[1], c, m])
        return tf.reduce_sum(g * tf.expand_dims(tf.transpose(u_c), 2), axis=0)

    return conv2d.weight_grad_taps(saved, dy, cfg, tap_grad, (c, m))


def input_grad(dy: tf.Tensor, kernel: tf.Tensor, cfg: dict) -> tf.Tensor:
    """dL/dx (B, H, W, C): correlation of ``dy`` with the flipped kernel (per phase if strided), summed over M."""
    _, _, c, m = kernel.shape
    flipped = tf.reverse(kernel, [0, 1])

    def correlate(t: tf.Tensor, taps: tuple[slice, slice]) -> tf.Tensor:
        sub = flipped[taps[0], taps[1]]
        sub = tf.reshape(sub, [*sub.shape[:2], c * m, 1])
        out = tf.nn.depthwise_conv2d(t, sub, strides=[1, 1, 1, 1], padding="VALID", dilations=cfg["dilation"])
        if m == 1:
            return out
        return tf.reduce_sum(tf.reshape(out, [*out.shape[:3], c, m]), axis=-1)

    return ops.input_grad_via_correlation(dy, cfg["in_hw"], cfg["pads"], cfg["kernel_hw"], cfg["strides"],
                                          cfg["dilation"], correlate)


def backward(node: Node, params: dict, saved: Factored, dy: tf.Tensor, need_dx: bool):
    kernel = params["depthwise_kernel"]
    grads = {"depthwise_kernel": weight_grad(saved, dy, node.config, kernel.shape)}
    if "bias" in params:
        grads["bias"] = tf.reduce_sum(dy, axis=[0, 1, 2])
    # after the weight gradient, as in conv2d.backward (else dy stays alive in between)
    dx = input_grad(dy, depend(kernel, grads["depthwise_kernel"]), node.config) if need_dx else None
    return [dx], grads


saved_bytes = conv2d.saved_bytes
