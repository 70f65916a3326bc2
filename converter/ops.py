"""Tensor primitives used by forward and backward passes, each lowering to TFLite builtin ops only.

Everything here works on NHWC tensors with static shapes. Convolution padding is always explicit
(``pads = ((top, bottom), (left, right))``) so that 'same', 'valid' and 'causal' share one code path and the
backward pass knows exactly which input positions each output saw.

Trained weights are variables, and XNNPACK (ai-edge-litert's default delegate) runs CONV_2D, DEPTHWISE_CONV_2D,
TRANSPOSE_CONV and FULLY_CONNECTED only with *constant* weights: with a variable operand they fall back to the
built-in kernels (``python -m bench.layers``). BATCH_MATMUL, MUL, ADD, PAD, SUM and stride-1 slices it runs with
dynamic operands. So the layers' computations on trained weights go through :func:`matmul` (always a rank-2
BATCH_MATMUL) and :func:`im2col_matmul` (im2col + one matmul). The compression's own products
(:func:`mode_dot`, :func:`gram`) keep their forms: moved to BATCH_MATMUL they raised the hosvd peak, and an asi
conversion failed with "'tfl.batch_matmul' op found invalid output rank, expected 3 but got 4" from
:func:`mode_dot`'s reshape-matmul-reshape.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import tensorflow as tf

Pads = tuple[tuple[int, int], tuple[int, int]]


def depend(t: tf.Tensor, on: tf.Tensor) -> tf.Tensor:
    """``t + (s < −∞)`` for the first element ``s`` of ``on``: ``t`` with a data dependency on ``on``.

    TFLite has no control edges, and the converter's op order does not follow the train step's forward/backward
    structure: it moved compressions after the loss (keeping full-size activations alive through the forward
    pass) and hoisted backward-only work (unpacked masks, expanded cores, kernels in matmul form) before it. A
    data dependency is the one ordering it keeps. The zero must be one the converter cannot fold: it folded
    ``t + 0·s`` to ``t`` (checked on TF 2.21: ``pad(depend(x, dy))`` became a lone PAD of ``x``); it keeps
    ``cast(s < −∞)``, which is 0 for every ``s``, NaN included. Float and int32 tensors get the ADD; others
    (packed uint8 masks, whose ADD is not a builtin) a SLICE starting at that zero, which the converter keeps for
    a computed tensor but folds away for a constant one (a slice as large as its input can only start at 0).

    Every op but the ADD runs on the built-in kernels (a shrinking STRIDED_SLICE, LESS, CAST): every op XNNPACK
    takes holds a few KiB whatever its size (its own copy of the table of resource variables, ≈ 40 B per
    variable, :mod:`converter.compression.state`), and a deep hosvd step has hundreds of these ties (an
    earlier ``min(|s|, 0)`` on a sliced and reshaped element gave it five ops each).
    """
    # the first element read in place (a flattening RESHAPE first copied the whole of a tensor that other ops
    # still read: measured, an 8 MiB copy of a pooling layer's upsampled gradient)
    first = on[(0,) * len(on.shape)]
    if first.dtype != tf.float32:
        first = tf.cast(first, tf.float32)
    zero = tf.less(first, float("-inf"))
    if t.dtype.is_floating or t.dtype == tf.int32:
        return t + tf.cast(zero, t.dtype)
    return tf.slice(t, tf.fill([len(t.shape)], tf.cast(zero, tf.int32)), t.shape)


UNDELEGATED_BYTES = 4 << 10
"""The largest tensor :func:`undelegated` moves into a loop body: every op XNNPACK takes costs a few KiB whatever
its size, but every distinct loop body is a subgraph (≈ 25 KiB at load, :mod:`converter.subgraphs`) with an
arena of its own, kept for the whole step."""


def undelegated(fn: Callable[..., Sequence[tf.Tensor]], *inputs: tf.Tensor) -> list[tf.Tensor]:
    """``fn(*inputs)`` run as the body of a WHILE loop that runs once, when every input and output is at most
    :data:`UNDELEGATED_BYTES`; otherwise inline.

    The device delegates only its signatures' own subgraphs to XNNPACK, never a loop body, and a deep hosvd step
    has hundreds of ops on small bases and Rayleigh quotients that XNNPACK would take for a few KiB each while
    gaining nothing on them (MobileNetV2's last 28 layers: 2.9 MiB less in a body per mode, step as fast). ``fn``
    may use its arguments and constants only: its output shapes come from a scratch trace. The inputs are loop
    variables passed through unchanged, so the converter hoists nothing out of the body.
    """
    def small(tensors: Sequence[tf.Tensor | tf.TensorSpec]) -> bool:
        return all(t.dtype.size * math.prod(t.shape) <= UNDELEGATED_BYTES for t in tensors)

    if not small(inputs):
        return list(fn(*inputs))
    with tf.Graph().as_default():
        specs = [tf.TensorSpec(o.shape, o.dtype) for o in fn(*(tf.zeros(t.shape, t.dtype) for t in inputs))]
    if not small(specs):
        return list(fn(*inputs))
    n = len(inputs)

    def body(i: tf.Tensor, *loop: tf.Tensor) -> tuple[tf.Tensor, ...]:
        return (i + 1, *loop[:n], *fn(*loop[:n]))

    init = (tf.constant(0), *inputs, *(tf.zeros(spec.shape, spec.dtype) for spec in specs))
    return list(tf.while_loop(lambda i, *_: i < 1, body, init, maximum_iterations=1)[1 + n:])


CHUNK_BYTES = 2 << 20
"""The largest slice a chunked computation (:func:`serial_chunks`) works on at once. Whole, a Gram matrix or a
projection of a full-size activation made full-size copies beside it: TFLite's RESHAPE copies a tensor that other
ops still read, XNNPACK packs a dynamic matmul operand into its workspace, and a mask's bit packing went through
int32 tensors as large as the float activation."""


def chunk_bounds(size: int, nbytes: int, limit: int | None = None) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges that split an axis of ``size`` so each slice holds at most about ``limit`` (default
    :data:`CHUNK_BYTES`) of the ``nbytes`` the whole tensors hold (one range when they are small, at most one per
    index)."""
    parts = min(size, max(1, -(-nbytes // (limit or CHUNK_BYTES))))
    edges = [size * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(edges))


def serial_chunks(tensors: Sequence[tf.Tensor], axis: int, fn: Callable[..., tf.Tensor],
                  parts: list[tuple[int, int]] | None = None, summed: bool = False,
                  after: tf.Tensor | None = None) -> list[tf.Tensor]:
    """``fn`` on successive slices along ``axis`` of every tensor in ``tensors`` (same size along it), one result
    per slice, in order (``parts`` fixes the ranges, default :func:`chunk_bounds`); with ``summed``, one result:
    their running sum, each next slice waiting for it, so at most two results are alive (a Gram matrix of 960
    channels is 3.5 MiB per slice, more than the slice itself).

    Each slice is a GATHER of indices computed from the previous result (:func:`depend`), so the interpreter takes
    a slice only once the previous one's work is done and at most one slice (and ``fn``'s workspace on it) is
    alive. Unrolled without that chain, the TFLite converter scheduled all of them at once (as it did the weight
    gradient's kernel taps). A SLICE at a computed offset would do the same, but TFLite makes its output a dynamic
    tensor, allocated outside the arena and kept to the end of the invoke (measured: +8.9 MiB on MobileNetV2's
    last 5 layers); a GATHER's output shape is static, so its slices share the arena. One range: ``fn`` on the
    tensors themselves. With ``after``, the first slice too is taken only once ``after`` exists.
    """
    size = tensors[0].shape[axis]
    if parts is None:
        parts = chunk_bounds(size, sum(t.dtype.size * math.prod(t.shape) for t in tensors))
    if len(parts) == 1:
        return [fn(*tensors)]
    results: list[tf.Tensor] = []
    for lo, hi in parts:
        rows = tf.range(lo, hi, dtype=tf.int32)
        if results or after is not None:
            rows = depend(rows, results[-1] if results else after)
        result = fn(*(tf.gather(t, rows, axis=axis) for t in tensors))
        if summed and results:
            results[-1] = results[-1] + result
        else:
            results.append(result)
    return results


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
    if (h0, w0, h1, w1) == (0, 0, *xp.shape[1:3]) and tuple(strides) == (1, 1):
        return xp  # a full-range slice would still be a copy
    return xp[:, h0:h1:strides[0], w0:w1:strides[1], :]


def matmul(a: tf.Tensor, b: tf.Tensor, transpose_a: bool = False, transpose_b: bool = False) -> tf.Tensor:
    """``a @ b`` of two matrices as a BATCH_MATMUL whatever the operands (XNNPACK runs it with both dynamic).

    ``tf.matmul(..., transpose_b=True)`` (and ``tf.matmul(a, tf.transpose(b))``) lower to FULLY_CONNECTED, which
    XNNPACK delegates only when ``b`` is a constant. Rank 2 only: the TFLite converter rejects BATCH_MATMUL
    outputs above rank 3.
    """
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise ValueError(f"ops.matmul takes matrices, got shapes {a.shape} and {b.shape}")
    return tf.raw_ops.BatchMatMulV3(x=a, y=b, adj_x=transpose_a, adj_y=transpose_b, Tout=a.dtype)


MATMUL_CHUNK_BYTES = 6 << 20
"""The largest pair of row blocks :func:`matmul_tn` multiplies at once. XNNPACK runs ``aᵀb`` by transposing ``a``
and packing ``b`` into its workspace, which it sizes for the largest such product in the graph and keeps for the
whole step: a 1×1 convolution's weight gradient at 28×28, batch 32 (25,088 × 192 operands) made it one 21 MiB
block."""


def matmul_tn(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """``aᵀ b`` of two matrices with the same rows (a weight gradient: positions × channels on both sides), as one
    BATCH_MATMUL, or, when the operands exceed :data:`MATMUL_CHUNK_BYTES`, summed over row blocks of that size.

    The first block waits for ``b`` (:func:`serial_chunks`' ``after``): ``b`` is the output gradient, and untied,
    the converter took every block of ``a`` at once, long before ``b`` was made (measured: MobileNetV2's last 35
    layers uncompressed, 371.2 → 400.4 MiB; tied, 357.6).
    """
    blocks = chunk_bounds(a.shape[0], a.dtype.size * a.shape[0] * (a.shape[1] + b.shape[1]), MATMUL_CHUNK_BYTES)
    return serial_chunks([a, b], 0, lambda a_rows, b_rows: matmul(a_rows, b_rows, transpose_a=True), blocks,
                         summed=True, after=b)[0]


def _tap_range(size: int, out: int, tap: int, stride: int, dilation: int, pad: int) -> tuple[int, int]:
    """Output positions ``[lo, hi)`` along one axis whose input ``o·stride + tap·dilation - pad`` is inside."""
    offset = tap * dilation - pad
    lo = min(max(-(offset // stride), 0), out)  # ceil(-offset / stride)
    hi = max(min((size - 1 - offset) // stride + 1, out), lo)
    return lo, hi


def tap_window(x: tf.Tensor, pads: Pads, tap: tuple[int, int], out_hw: tuple[int, int], strides: tuple[int, int],
               dilation: tuple[int, int], after: tf.Tensor | None = None) -> tf.Tensor:
    """The (B, H', W', C) window of *unpadded* ``x`` that kernel tap ``tap`` multiplies, zero where it reads the
    padding: a slice of ``x`` padded by its own few rows/columns, so no padded copy of ``x`` is made. With
    ``after``, its rows are a GATHER at indices tied to ``after`` (:func:`depend`), so the window is taken only
    once ``after`` exists (as :func:`serial_chunks` does)."""
    begin, end, edges = [], [], []
    for a in range(2):
        lo, hi = _tap_range(x.shape[1 + a], out_hw[a], tap[a], strides[a], dilation[a], pads[a][0])
        if hi == lo:  # the tap reads only padding along this axis
            return tf.zeros(tf.stack([tf.shape(x)[0], *out_hw, x.shape[3]]))
        start = lo * strides[a] + tap[a] * dilation[a] - pads[a][0]
        begin.append(start)
        end.append(start + (hi - lo - 1) * strides[a] + 1)
        edges.append((lo, out_hw[a] - hi))
    steps = list(strides)
    if after is not None:  # the rows gathered: the window is cut along H already
        x = tf.gather(x, depend(tf.range(begin[0], end[0], strides[0]), after), axis=1)
        begin[0], end[0], steps[0] = 0, x.shape[1], 1
    whole = all(begin[a] == 0 and end[a] == x.shape[1 + a] and steps[a] == 1 for a in range(2))
    window = x if whole else x[:, begin[0]:end[0]:steps[0], begin[1]:end[1]:steps[1], :]  # no copy of x
    return pad_hw(window, tuple(edges))


def im2col(x: tf.Tensor, kernel_hw: tuple[int, int], strides: tuple[int, int], dilation: tuple[int, int],
           pads: Pads = ((0, 0), (0, 0))) -> tf.Tensor:
    """(B, H', W', KH·KW·C): the kernel taps' windows of ``x`` padded by ``pads``, side by side, tap-major (kernel
    order). Each window pads itself (:func:`tap_window`): a whole padded ``x`` would be the same tensor as the
    weight gradient's padded saved input, which the TFLite converter then shares and keeps from the forward to the
    backward half."""
    kh, kw = kernel_hw
    out_hw = tuple(out_size(x.shape[1 + a], kernel_hw[a], strides[a], dilation[a], pads[a]) for a in range(2))
    windows = [tap_window(x, pads, (i, j), out_hw, strides, dilation) for i in range(kh) for j in range(kw)]
    return windows[0] if len(windows) == 1 else tf.concat(windows, axis=-1)


def im2col_matmul(x: tf.Tensor, weights: tf.Tensor, kernel_hw: tuple[int, int], strides: tuple[int, int],
                  dilation: tuple[int, int], pads: Pads = ((0, 0), (0, 0)),
                  transpose_weights: bool = False) -> tf.Tensor:
    """Convolution of ``x`` padded by ``pads`` as im2col + one BATCH_MATMUL, (B, H', W', N).

    ``weights`` is (KH·KW·C, N), tap-major like :func:`im2col`, or (N, KH·KW·C) with ``transpose_weights``. The
    im2col tensor is as large as the scratch the built-in CONV_2D allocates for a variable filter.
    """
    cols = im2col(x, kernel_hw, strides, dilation, pads)
    y = matmul(flatten_rows(cols), weights, transpose_b=transpose_weights)
    return tf.reshape(y, [-1, *cols.shape[1:3], y.shape[-1]])  # the batch may be dynamic (infer, features)


def tap_chain_conv(x: tf.Tensor, kernel: tf.Tensor, strides: tuple[int, int], dilation: tuple[int, int],
                   pads: Pads) -> tf.Tensor:
    """Convolution of ``x`` padded by ``pads`` with a (KH, KW, C, N) ``kernel`` as one BATCH_MATMUL per tap,
    summed: (B, H', W', N). Each tap's window waits for the previous taps' sum (:func:`tap_window` with
    ``after``), so one window is alive at a time, where CONV_2D on the built-in kernels (a variable filter)
    allocates an im2col scratch of all KH·KW windows at once (55 MiB for a 3×3 conv at 14×14×256, batch 32).
    Each tap's (C, N) kernel slice is a GATHER tied the same way: sliced statically, the converter made every
    layer's slices at the start of the step and kept them (27 MiB for the ResNet18-style model's last stage)."""
    kh, kw, c, n = kernel.shape
    taps = tf.reshape(kernel, [kh * kw, c, n])
    out_hw = tuple(out_size(x.shape[1 + a], (kh, kw)[a], strides[a], dilation[a], pads[a]) for a in range(2))
    y = None
    for i in range(kh):
        for j in range(kw):
            window = tap_window(x, pads, (i, j), out_hw, strides, dilation, after=y)
            tap = tf.gather(taps, depend(tf.constant([i * kw + j]), x if y is None else y))
            part = matmul(flatten_rows(window), tf.reshape(tap, [c, n]))
            y = part if y is None else y + part
    return tf.reshape(y, [-1, *out_hw, kernel.shape[3]])  # the batch may be dynamic (infer, features)


def input_grad_via_correlation(dy: tf.Tensor, in_hw: tuple[int, int], pads: Pads, kernel_hw: tuple[int, int],
                               strides: tuple[int, int], dilation: tuple[int, int], correlate) -> tf.Tensor:
    """Input gradient of a strided, dilated, padded convolution as correlations of ``dy`` with the flipped kernel.

    ``correlate(t, taps)`` correlates (B, H, W, C) ``t`` with the taps ``taps`` (a pair of slices) of the spatially
    flipped kernel, VALID, same dilation, giving (B, H - extent + 1, W - extent + 1, C'). Only the rows and columns
    of the real input are computed (the window of ``dy`` they read is cut and zero-padded by :func:`tap_window`, so
    no padded-input-sized result is made and cropped; input rows the forward never reached get zero gradient).

    Unstrided: one correlation over the whole flipped kernel. Strided (dilation 1, as Keras requires): polyphase.
    Input row ``s·a + q`` is reached only by the taps ``k ≡ q + pad (mod s)``, so each of the s² phases is a small
    correlation of ``dy`` itself with every s-th tap, and the phases are interleaved. Correlating the zero-spread
    ``dy`` instead made two padded copies s² times the size of ``dy`` and did s²× the multiply-adds (measured on
    MobileNetV2's block_13 depthwise: 18.0 + 11.9 MiB alive beside the 14.5 MiB result, the step's arena peak).
    """
    if tuple(strides) == (1, 1):
        ext = [(kernel_hw[a] - 1) * dilation[a] for a in range(2)]
        reach = tap_window(dy, ((ext[0] - pads[0][0], 0), (ext[1] - pads[1][0], 0)), (0, 0),
                           (in_hw[0] + ext[0], in_hw[1] + ext[1]), (1, 1), (1, 1))
        return correlate(reach, (slice(None), slice(None)))
    if tuple(dilation) != (1, 1):
        raise ValueError(f"a strided convolution cannot be dilated (strides {strides}, dilation {dilation})")
    phases = [[_phase(in_hw[a], kernel_hw[a], strides[a], pads[a][0], q) for q in range(strides[a])] for a in range(2)]
    rows = []
    for ph in phases[0]:
        cols = []
        for pw in phases[1]:
            if not ph.taps or not pw.taps:  # no tap reaches these input positions
                cols.append(None)
                continue
            window = tap_window(dy, ((-ph.first, 0), (-pw.first, 0)), (0, 0),
                                (ph.count + ph.taps - 1, pw.count + pw.taps - 1), (1, 1), (1, 1))
            cols.append(correlate(window, (ph.kernel_slice, pw.kernel_slice)))
        rows.append(cols)
    made = next(t for cols in rows for t in cols if t is not None)
    full = [-(-in_hw[a] // strides[a]) for a in range(2)]  # positions of the largest phase along each axis
    channels = made.shape[3]

    def sized(t: tf.Tensor | None, ph: _Phase, pw: _Phase) -> tf.Tensor:
        if t is None:
            return tf.zeros([made.shape[0], *full, channels], made.dtype)
        return pad_hw(t, ((0, full[0] - ph.count), (0, full[1] - pw.count)))

    # concatenating the phases along channels and reshaping interleaves them: (…, w, q, c) is column s·w + q
    interleaved = []
    for ph, cols in zip(phases[0], rows, strict=True):
        row = tf.concat([sized(t, ph, pw) for t, pw in zip(cols, phases[1], strict=True)], axis=3)
        interleaved.append(tf.reshape(row, [made.shape[0], full[0], full[1] * strides[1], channels]))
    dx = tf.reshape(tf.concat(interleaved, axis=2),
                    [made.shape[0], full[0] * strides[0], full[1] * strides[1], channels])
    if dx.shape[1] == in_hw[0] and dx.shape[2] == in_hw[1]:
        return dx
    return dx[:, :in_hw[0], :in_hw[1], :]


class _Phase(NamedTuple):
    """One polyphase component of a strided input gradient along one axis: the input positions ``s·a + q``."""

    taps: int  # how many kernel taps reach them
    kernel_slice: slice  # those taps in the *flipped* kernel, in correlation order
    first: int  # the ``dy`` index the first correlation window starts at (negative: zero padding)
    count: int  # how many such input positions there are


def _phase(size: int, kernel: int, stride: int, pad: int, q: int) -> _Phase:
    r = (q + pad) % stride  # the first tap k ≡ q + pad (mod s)
    taps = max(0, -(-(kernel - r) // stride))
    count = -(-(size - q) // stride)
    base = (q + pad - r) // stride  # dy row of tap r for a = 0; tap r + j·s reads row base - j
    start = kernel - 1 - r - (taps - 1) * stride  # flipped index of the last tap, r + (taps - 1)·s
    return _Phase(taps, slice(start, kernel, stride) if taps else slice(0, 0), base - (taps - 1), count)


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


def slice_axis(t: tf.Tensor, mode: int) -> int:
    """The axis a computation over every mode but ``mode`` is sliced along (:func:`serial_chunks`): the
    outermost other axis with room for the slices :func:`chunk_bounds` wants, else the longest. An outer slice
    is one contiguous block per leading index, which GATHER copies by memcpy; a channel slice is gathered
    element by element (the longest axis, chosen before, was usually the channels)."""
    needed = -(-t.dtype.size * math.prod(t.shape) // CHUNK_BYTES)
    others = [a for a in range(len(t.shape)) if a != mode]
    return next((a for a in others if t.shape[a] >= needed), max(others, key=lambda a: t.shape[a]))


def gram(t: tf.Tensor, mode: int) -> tf.Tensor:
    """Gram matrix of the mode-n unfolding, (I_n, I_n), without a transposed copy of ``t``.

    Summed over slices of another axis (:func:`slice_axis`, :func:`serial_chunks`): every axis but ``mode`` is
    summed over, so the slices' Grams add up to the whole one. Per slice, the batch and channel modes are one
    matmul of a reshape; the spatial modes a batched matmul over the axes before them, summed (an unfolding
    would first materialise a full-size transpose).
    """
    return serial_chunks([t], slice_axis(t, mode), lambda part: _gram_whole(part, mode), summed=True)[0]


def gram_times(t: tf.Tensor, mode: int, v: tf.Tensor) -> tf.Tensor:
    """``G v`` for the mode-n Gram matrix G of ``t`` and a thin (I_n, W) ``v``, summed over slices as in
    :func:`gram`. For the batch and channel modes two thin matmuls per slice, so G is never made: at 960
    channels it is 3.5 MiB per slice and N·I_n² multiply-adds, against 2·N·I_n·W here (N = the other modes'
    product); a spatial mode's Gram is small and made per slice."""
    return serial_chunks([t], slice_axis(t, mode), lambda part: _gram_times_whole(part, mode, v), summed=True)[0]


def _gram_times_whole(t: tf.Tensor, mode: int, v: tf.Tensor) -> tf.Tensor:
    if mode == 3:
        flat = tf.reshape(t, [-1, t.shape[3]])
        return matmul(flat, matmul(flat, v), transpose_a=True)
    if mode == 0:
        flat = tf.reshape(t, [t.shape[0], -1])
        return matmul(flat, matmul(flat, v, transpose_a=True))
    return matmul(_gram_whole(t, mode), v)


def trace(g: tf.Tensor) -> tf.Tensor:
    """Trace of a square matrix: of a Gram matrix, ‖X‖²_F, without the full-size ``X * X`` a sum of squares makes."""
    return tf.reduce_sum(g * tf.eye(g.shape[0], dtype=g.dtype))


def _gram_whole(t: tf.Tensor, mode: int) -> tf.Tensor:
    b, h, w, c = t.shape
    if mode == 0:
        flat = tf.reshape(t, [b, -1])
        return matmul(flat, flat, transpose_b=True)  # as a FULLY_CONNECTED it ran on the built-in kernels
    if mode == 3:
        flat = tf.reshape(t, [-1, c])
        return matmul(flat, flat, transpose_a=True)
    rows = tf.reshape(t, [b, h, w * c]) if mode == 1 else tf.reshape(t, [b * h, w, c])
    return tf.reduce_sum(tf.matmul(rows, rows, transpose_b=True), axis=0)
