"""Conv2D: forward, backward (input and weight gradients) and saved-activation size.

Saves its input (through the compression method) for the weight gradient. The weight gradient is KH·KW
shifted matmuls over the Tucker factors (correct for every stride, padding and dilation); the input gradient is
correlations of ``dy`` with the flipped kernel (one per phase when strided:
:func:`converter.ops.input_grad_via_correlation`). A trained kernel is a variable, which XNNPACK does not take in
CONV_2D or TRANSPOSE_CONV, so a trained layer's convolutions are BATCH_MATMULs on XNNPACK: for a 1×1 kernel one
matmul (:func:`converter.ops.im2col_matmul`, which for one tap is a reshape), for a k×k kernel one matmul per
tap, summed, one window alive at a time (:func:`converter.ops.tap_chain_conv`), forward and input gradient alike.
The built-in CONV_2D allocated an im2col scratch of all KH·KW windows (55 MiB for a 3×3 conv at 14×14×256, batch
32) and TRANSPOSE_CONV scratch of its own; a whole im2col tensor is as large (``tests/converter/test_measure.py``'s
model peaked at 553 MiB with it against 363 without). Measured on the ResNet18-style model's last two stages
(224², batch 32, streamed): hosvd 362.2 → 292.5 MiB, none 356.3 → 313.1 (docs/bench.md, "Training-step speed").
Frozen layers keep CONV_2D.

The forward's windows pad themselves (:func:`converter.ops.tap_window`) and never make the padded input: the
TFLite converter folds ``engine.after_dy``'s tie, so a whole padded input in the forward would be the very tensor
the weight gradient pads and slices, shared and kept from the forward half to the backward half (65 % larger
than the input at 7×7 with a 3×3 kernel).
"""

from __future__ import annotations

import math

import tensorflow as tf

from converter import ops
from converter.compression.factored import CHANNELS, Factored, batch_applied, lift_channels
from converter.errors import ConversionError
from converter.layers.base import ForwardContext, Node, after_saved, depend

WEIGHTED = True


def spatial_config(node_name: str, in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides, dilation,
                   padding: str) -> dict:
    """Explicit pads and output size for a 2-D window op ('valid', 'same' or 'causal' along the width)."""
    strides, dilation = tuple(strides), tuple(dilation)
    if padding == "valid":
        pads = ((0, 0), (0, 0))
    elif padding == "same":
        pads = (ops.same_pads(in_hw[0], kernel_hw[0], strides[0], dilation[0]),
                ops.same_pads(in_hw[1], kernel_hw[1], strides[1], dilation[1]))
    elif padding == "causal":
        pads = ((0, 0), ((kernel_hw[1] - 1) * dilation[1], 0))
    else:
        raise ConversionError(f"layer {node_name!r}: padding {padding!r} is not supported")
    out_hw = tuple(ops.out_size(in_hw[a], kernel_hw[a], strides[a], dilation[a], pads[a]) for a in range(2))
    return {"kernel_hw": tuple(kernel_hw), "strides": strides, "dilation": dilation, "pads": pads,
            "in_hw": tuple(in_hw), "out_hw": out_hw}


def parse(layer, node: Node) -> None:
    if getattr(layer, "groups", 1) != 1:
        raise ConversionError(f"layer {layer.name!r} (Conv2D): grouped convolution (groups={layer.groups}) "
                              "is not supported")
    kernel = layer.kernel.numpy()
    node.config = spatial_config(layer.name, node.in_shapes[0][:2], kernel.shape[:2], layer.strides,
                                 layer.dilation_rate, layer.padding)
    node.weights = {"kernel": kernel}
    if layer.use_bias:
        node.weights["bias"] = layer.bias.numpy()


def lowered(cfg: dict) -> bool:
    """A trained convolution whose kernel is one tap: BATCH_MATMULs on XNNPACK, at no memory cost."""
    return math.prod(cfg["kernel_hw"]) == 1


def conv(x: tf.Tensor, kernel: tf.Tensor, cfg: dict, trainable: bool) -> tf.Tensor:
    """The forward convolution: for a trained kernel a matmul (1×1) or a chain of per-tap matmuls (k×k), CONV_2D
    for a frozen one (see the module docstring)."""
    if trainable and lowered(cfg):
        kh, kw, c_in, c_out = kernel.shape
        return ops.im2col_matmul(x, tf.reshape(kernel, [kh * kw * c_in, c_out]), (kh, kw), cfg["strides"],
                                 cfg["dilation"], cfg["pads"])
    if trainable:
        return ops.tap_chain_conv(x, kernel, cfg["strides"], cfg["dilation"], cfg["pads"])
    xp = ops.pad_hw(x, cfg["pads"])
    return tf.nn.conv2d(xp, kernel, strides=cfg["strides"], padding="VALID", dilations=cfg["dilation"])


def forward(node: Node, params: dict, xs: list[tf.Tensor], ctx: ForwardContext):
    saved = ctx.save_input(node, xs[0])
    y = conv(xs[0], after_saved(params["kernel"], saved), node.config, node.trainable)
    if "bias" in params:
        y = y + params["bias"]
    return y, saved


def weight_grad_taps(saved: Factored, dy: tf.Tensor, cfg: dict, tap_grad, tap_shape: tuple[int, int]) -> tf.Tensor:
    """Per kernel tap, ``tap_grad(window (N, K_C), dy (N, C_out)) -> tap_shape``, stacked to (KH, KW, *tap_shape).

    The batch factor is applied to ``dy`` or to the core, whichever it leaves smaller, and the core expanded over
    H and W, so the activation is never rebuilt (paper: Z1 = U_Bᵀ dY, Z3 = core ×_H U_H ×_W U_W). The taps run
    one after another, each window's rows a GATHER at indices tied to the previous tap's gradient (as
    :func:`ops.serial_chunks` does), so one window is alive at a time. Unrolled without the chain, the converter
    scheduled every tap's window at once (9 × 5.7 MiB on MobileNetV2's last depthwise layer); a WHILE loop kept
    one, but TFLite allocates a loop body's arena once and keeps it beside the main arena for the whole step (on
    MobileNetV2's last 16 layers the chain took the streamed `none` peak from 238.9 to 217.2 MiB).
    """
    z, dy_b = batch_applied(saved, dy)
    dy_b = ops.flatten_rows(dy_b)
    zp = ops.pad_hw(z, cfg["pads"])
    kh, kw = cfg["kernel_hw"]
    (sh, sw), (dh, dw), (oh, ow) = cfg["strides"], cfg["dilation"], cfg["out_hw"]
    if kh * kw == 1:
        g = tap_grad(ops.flatten_rows(ops.shifted_window(zp, 0, 0, cfg["out_hw"], cfg["strides"],
                                                         cfg["dilation"])), dy_b)
        return tf.reshape(g, [1, 1, *g.shape])
    kc = zp.shape[3]
    grads: list[tf.Tensor] = []
    for i in range(kh):
        for j in range(kw):
            rows = ops.depend(tf.range(i * dh, i * dh + (oh - 1) * sh + 1, sh), grads[-1] if grads else dy_b)
            window = tf.gather(tf.gather(zp, rows, axis=1), tf.range(j * dw, j * dw + (ow - 1) * sw + 1, sw), axis=2)
            grads.append(tap_grad(tf.reshape(window, [-1, kc]), dy_b))
    return tf.reshape(tf.stack(grads), [kh, kw, *tap_shape])


def weight_grad(saved: Factored, dy: tf.Tensor, cfg: dict) -> tf.Tensor:
    """dL/dkernel (KH, KW, C_in, C_out) from the saved factors."""
    u_c = saved.factors[CHANNELS]
    c_in = saved.core.shape[3] if u_c is None else u_c.shape[0]
    return weight_grad_taps(saved, dy, cfg,
                            lambda window, dy_b: lift_channels(saved, ops.matmul_tn(window, dy_b)),
                            (c_in, dy.shape[-1]))


def input_grad(dy: tf.Tensor, kernel: tf.Tensor, cfg: dict) -> tf.Tensor:
    """dL/dx (B, H, W, C_in): for a 1×1 kernel ``dy`` times the kernel (a matmul; strided: per phase).

    The flipped kernel goes in as (C_in, KH·KW·C_out) with a transposed matmul: a (KH·KW·C_out, C_in) transpose
    feeding a plain matmul is folded by the TFLite converter into a FULLY_CONNECTED, which XNNPACK refuses for a
    variable weight. The kernel is tied to ``dy``: its matmul form depends on the variable only, and the converter
    made it in the forward half and kept it across. A k×k kernel: correlations of ``dy`` with the flipped kernel,
    each a chain of per-tap matmuls (no im2col copies of ``dy``: see the module docstring).
    """
    kh, kw = cfg["kernel_hw"]
    if not lowered(cfg):
        flipped_hwio = tf.transpose(tf.reverse(depend(kernel, dy), [0, 1]), [0, 1, 3, 2])
        return ops.input_grad_via_correlation(
            dy, cfg["in_hw"], cfg["pads"], cfg["kernel_hw"], cfg["strides"], cfg["dilation"],
            lambda t, taps: ops.tap_chain_conv(t, flipped_hwio[taps[0], taps[1]], (1, 1), cfg["dilation"],
                                               ((0, 0), (0, 0))))
    kernel = depend(kernel, dy)
    # one tap: nothing to flip, and it is the only tap of every phase that has one
    rows = tf.reshape(tf.transpose(kernel, [2, 0, 1, 3]), [kernel.shape[2], -1])
    return ops.input_grad_via_correlation(
        dy, cfg["in_hw"], cfg["pads"], cfg["kernel_hw"], cfg["strides"], cfg["dilation"],
        lambda t, _taps: ops.im2col_matmul(t, rows, (kh, kw), (1, 1), cfg["dilation"], transpose_weights=True))


def backward(node: Node, params: dict, saved: Factored, dy: tf.Tensor, need_dx: bool):
    grads = {"kernel": weight_grad(saved, dy, node.config)}
    if "bias" in params:
        grads["bias"] = tf.reduce_sum(dy, axis=[0, 1, 2])
    # The input gradient after the weight gradient (a dependency on it through the small kernel): in the other
    # order the converter left dy alive from the input gradient across the next layers' backward to this
    # layer's weight gradient (measured: two 13.8 MiB dy at the peak of MobileNetV2 224², last 20).
    dx = input_grad(dy, depend(params["kernel"], grads["kernel"]), node.config) if need_dx else None
    return [dx], grads


def saved_bytes(node: Node, batch: int) -> int:
    """Vanilla saved activation: the whole float32 input (B, H, W, C_in)."""
    return 4 * batch * math.prod(node.in_shapes[0])
