"""Tensor primitives used by forward and backward passes, each lowering to TFLite builtin ops only.

Everything here works on NHWC tensors with static shapes. Convolution padding is always explicit
(``pads = ((top, bottom), (left, right))``) so that 'same', 'valid' and 'causal' share one code path and the
backward pass knows exactly which input positions each output saw.
"""

from __future__ import annotations

import tensorflow as tf

Pads = tuple[tuple[int, int], tuple[int, int]]


def same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding for one spatial axis: (before, after)."""
    out = -(-size // stride)
    extent = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def out_size(size: int, kernel: int, stride: int, dilation: int, pads: tuple[int, int]) -> int:
    """Output length of a convolution/pooling along one axis with explicit padding."""
    extent = (kernel - 1) * dilation + 1
    return (size + pads[0] + pads[1] - extent) // stride + 1


def pad_hw(x: tf.Tensor, pads: Pads) -> tf.Tensor:
    """Zero-pad the two spatial axes of a (B, H, W, C) tensor; no op when there is nothing to pad."""
    if not any(pads[0]) and not any(pads[1]):
        return x
    return tf.pad(x, [[0, 0], list(pads[0]), list(pads[1]), [0, 0]])


def shifted_window(xp: tf.Tensor, kh: int, kw: int, out_hw: tuple[int, int], strides: tuple[int, int],
                   dilation: tuple[int, int]) -> tf.Tensor:
    """The (B, H', W', C) slice of padded input ``xp`` that kernel tap (kh, kw) multiplies."""
    h0, w0 = kh * dilation[0], kw * dilation[1]
    h1 = h0 + (out_hw[0] - 1) * strides[0] + 1
    w1 = w0 + (out_hw[1] - 1) * strides[1] + 1
    return xp[:, h0:h1:strides[0], w0:w1:strides[1], :]


def zero_insert(dy: tf.Tensor, strides: tuple[int, int]) -> tf.Tensor:
    """Spread (B, H', W', C) to (B, (H'-1)*sh+1, (W'-1)*sw+1, C) with zeros between rows/columns.

    Reshape + PAD on 4-D tensors only (TFLite's PAD and reshape handle those everywhere).
    """
    b, h, w, c = dy.shape
    sh, sw = strides
    if sh > 1:
        dy = tf.reshape(dy, [b, h, 1, w * c])
        dy = tf.pad(dy, [[0, 0], [0, 0], [0, sh - 1], [0, 0]])
        dy = tf.reshape(dy, [b, h * sh, w, c])[:, : (h - 1) * sh + 1]
        h = (h - 1) * sh + 1
    if sw > 1:
        dy = tf.reshape(dy, [b * h, w, 1, c])
        dy = tf.pad(dy, [[0, 0], [0, 0], [0, sw - 1], [0, 0]])
        dy = tf.reshape(dy, [b, h, w * sw, c])[:, :, : (w - 1) * sw + 1]
    return dy


def input_grad_via_correlation(dy: tf.Tensor, in_hw: tuple[int, int], pads: Pads, kernel_hw: tuple[int, int],
                               strides: tuple[int, int], dilation: tuple[int, int], correlate) -> tf.Tensor:
    """Input gradient of a strided, dilated, padded convolution as a 'full' correlation.

    ``dy`` is spread by the stride, padded by the kernel extent minus one, and correlated (``correlate``:
    (B, H, W, C) -> (B, H, W, C') with the spatially flipped kernel, VALID, same dilation); the result covers the
    padded input, from which the real input region is cropped.
    """
    kh, kw = kernel_hw
    ext_h, ext_w = (kh - 1) * dilation[0], (kw - 1) * dilation[1]
    spread = zero_insert(dy, strides)
    full = tf.pad(spread, [[0, 0], [ext_h, ext_h], [ext_w, ext_w], [0, 0]])
    dxp = correlate(full)
    # dxp covers padded rows [0, (H'-1)*s + extent); rows the forward never reached get zero gradient.
    hp = in_hw[0] + pads[0][0] + pads[0][1]
    wp = in_hw[1] + pads[1][0] + pads[1][1]
    tail_h, tail_w = hp - dxp.shape[1], wp - dxp.shape[2]
    if tail_h or tail_w:
        dxp = tf.pad(dxp, [[0, 0], [0, tail_h], [0, tail_w], [0, 0]])
    return dxp[:, pads[0][0]: pads[0][0] + in_hw[0], pads[1][0]: pads[1][0] + in_hw[1], :]


def flatten_rows(x: tf.Tensor) -> tf.Tensor:
    """(B, ..., C) -> (B*..., C)."""
    return tf.reshape(x, [-1, x.shape[-1]])


def mode_dot(t: tf.Tensor, u: tf.Tensor, mode: int, project: bool) -> tf.Tensor:
    """Multiply axis ``mode`` of a 4-D tensor by a factor matrix ``u`` of shape (I, K).

    ``project=True`` maps size I to K (``t ×_mode uᵀ``); ``False`` maps K back to I (``t ×_mode u``).
    """
    perm = [a for a in range(4) if a != mode] + [mode]
    inv = [perm.index(a) for a in range(4)]
    moved = tf.transpose(t, perm) if mode != 3 else t
    lead = moved.shape[:3]
    flat = tf.reshape(moved, [-1, moved.shape[3]])
    out = tf.matmul(flat, u) if project else tf.matmul(flat, u, transpose_b=True)
    out = tf.reshape(out, [*lead, out.shape[1]])
    return tf.transpose(out, inv) if mode != 3 else out


def unfold(t: tf.Tensor, mode: int) -> tf.Tensor:
    """Mode-n unfolding of a 4-D tensor: (I_n, product of the other sizes)."""
    if mode == 0:
        return tf.reshape(t, [t.shape[0], -1])
    perm = [mode] + [a for a in range(4) if a != mode]
    return tf.reshape(tf.transpose(t, perm), [t.shape[mode], -1])


def gram(t: tf.Tensor, mode: int) -> tf.Tensor:
    """Gram matrix of the mode-n unfolding, (I_n, I_n), without a transposed copy of ``t``.

    Batch and channel modes are one matmul of a reshape; the spatial modes are a batched matmul over the
    axes before them, summed (an unfolding would first materialise a full-size transpose).
    """
    b, h, w, c = t.shape
    if mode == 0:
        flat = tf.reshape(t, [b, -1])
        return tf.matmul(flat, flat, transpose_b=True)
    if mode == 3:
        flat = tf.reshape(t, [-1, c])
        return tf.matmul(flat, flat, transpose_a=True)
    rows = tf.reshape(t, [b, h, w * c]) if mode == 1 else tf.reshape(t, [b * h, w, c])
    return tf.reduce_sum(tf.matmul(rows, rows, transpose_b=True), axis=0)
