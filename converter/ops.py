"""Tensor primitives used by forward and backward passes, each lowering to TFLite builtin ops only.

Everything here works on NHWC tensors with static shapes. Convolution padding is always explicit
(``pads = ((top, bottom), (left, right))``) so that 'same', 'valid' and 'causal' share one code path and the
backward pass knows exactly which input positions each output saw.

Trained weights are variables, and XNNPACK (ai-edge-litert's default delegate) runs CONV_2D, DEPTHWISE_CONV_2D,
TRANSPOSE_CONV and FULLY_CONNECTED only with *constant* weights: with a variable operand they fall back to the
built-in kernels (single-threaded here, 2.5–4× slower than XNNPACK's constant-weight rate; ``python -m
bench.layers``). BATCH_MATMUL, MUL, ADD, PAD, SUM and stride-1 slices it runs with dynamic operands. So the
computations on trained weights go through :func:`matmul` (always BATCH_MATMUL) and :func:`im2col_matmul`
(im2col + one matmul). A depthwise convolution as a multiply-add per tap on XNNPACK was 5× slower than the
built-in DEPTHWISE_CONV_2D with a variable filter (memory-bound: 17 full-size elementwise ops, and the converter
re-associates their sum so six products are alive at once), so depthwise layers keep that op.
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


def matmul(a: tf.Tensor, b: tf.Tensor, transpose_a: bool = False, transpose_b: bool = False) -> tf.Tensor:
    """``a @ b`` as a BATCH_MATMUL whatever the operands (XNNPACK runs it with both dynamic).

    ``tf.matmul(..., transpose_b=True)`` (and ``tf.matmul(a, tf.transpose(b))``) lower to FULLY_CONNECTED, which
    XNNPACK delegates only when ``b`` is a constant.
    """
    return tf.raw_ops.BatchMatMulV3(x=a, y=b, adj_x=transpose_a, adj_y=transpose_b, Tout=a.dtype)


def im2col(xp: tf.Tensor, kernel_hw: tuple[int, int], strides: tuple[int, int],
           dilation: tuple[int, int]) -> tf.Tensor:
    """(B, H', W', KH·KW·C): the kernel taps' windows of padded ``xp`` side by side, tap-major (kernel order)."""
    kh, kw = kernel_hw
    out_hw = tuple(out_size(xp.shape[1 + a], kernel_hw[a], strides[a], dilation[a], (0, 0)) for a in range(2))
    windows = [shifted_window(xp, i, j, out_hw, strides, dilation) for i in range(kh) for j in range(kw)]
    return windows[0] if len(windows) == 1 else tf.concat(windows, axis=-1)


def im2col_matmul(xp: tf.Tensor, weights: tf.Tensor, kernel_hw: tuple[int, int], strides: tuple[int, int],
                  dilation: tuple[int, int], transpose_weights: bool = False) -> tf.Tensor:
    """VALID convolution of padded ``xp`` as im2col + one BATCH_MATMUL, (B, H', W', N).

    ``weights`` is (KH·KW·C, N), tap-major like :func:`im2col`, or (N, KH·KW·C) with ``transpose_weights``. The
    im2col tensor is as large as the scratch the built-in CONV_2D allocates for a variable filter.
    """
    cols = im2col(xp, kernel_hw, strides, dilation)
    y = matmul(flatten_rows(cols), weights, transpose_b=transpose_weights)
    return tf.reshape(y, [-1, *cols.shape[1:3], y.shape[-1]])  # the batch may be dynamic (infer, features)


def conv_as_matmul(xp: tf.Tensor, kernel: tf.Tensor, strides: tuple[int, int],
                   dilation: tuple[int, int]) -> tf.Tensor:
    """VALID convolution of padded ``xp`` with ``kernel`` (KH, KW, C_in, C_out) via :func:`im2col_matmul`."""
    kh, kw, c_in, c_out = kernel.shape
    return im2col_matmul(xp, tf.reshape(kernel, [kh * kw * c_in, c_out]), (kh, kw), strides, dilation)


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
    out = matmul(flat, u, transpose_b=not project)
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
        return matmul(flat, flat, transpose_b=True)
    if mode == 3:
        flat = tf.reshape(t, [-1, c])
        return matmul(flat, flat, transpose_a=True)
    rows = tf.reshape(t, [b, h, w * c]) if mode == 1 else tf.reshape(t, [b * h, w, c])
    return tf.reduce_sum(matmul(rows, rows, transpose_b=True), axis=0)
