"""The saved form of an activation and the algebra the weight gradients need from it.

An activation X of shape (B, H, W, C) is saved as a :class:`Factored`: a core and one factor per mode, with
``X ≈ core ×_B U_B ×_H U_H ×_W U_W ×_C U_C``. A factor of ``None`` means the identity (that mode is kept
whole), so the vanilla method is ``Factored(x, (None,) * 4)`` and the mode-0 SVD keeps only ``U_B``.

Weight gradients are contracted from the factors, never by rebuilding X (paper, conv_hosvd.py):
``dY ×_B U_Bᵀ`` (or ``core ×_B U_B``, whichever is smaller: :func:`batch_applied`), ``core ×_H U_H ×_W U_W``,
then the ordinary weight gradient, then ``×_C U_C``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import tensorflow as tf

from converter import ops

BATCH, HEIGHT, WIDTH, CHANNELS = range(4)


class Factored(NamedTuple):
    """Tucker form of a (B, H, W, C) activation: ``core`` (K_B, K_H, K_W, K_C) and factors (I_n, K_n) or None."""

    core: tf.Tensor
    factors: tuple[tf.Tensor | None, tf.Tensor | None, tf.Tensor | None, tf.Tensor | None]

    @classmethod
    def whole(cls, x: tf.Tensor) -> Factored:
        return cls(x, (None, None, None, None))

    @property
    def compressed(self) -> bool:
        """True when some mode has a factor (not the vanilla form, the activation itself)."""
        return any(u is not None for u in self.factors)


def project(x: tf.Tensor, factors: tuple[tf.Tensor | None, ...]) -> Factored:
    """The Tucker form of ``x`` on given factors: ``core = x ×_n U_nᵀ`` for every factor that is not None.

    The mode that shrinks most goes first, so every later product (and its transposed copy) works on an already
    smaller tensor: projecting 960 channels onto 32 before touching the batch mode keeps the intermediates 30×
    smaller than the natural mode order did.
    """
    present = sorted(((mode, u) for mode, u in enumerate(factors) if u is not None),
                     key=lambda item: item[1].shape[1] / item[1].shape[0])
    if not present:
        return Factored(x, tuple(factors))
    first, u = present[0]
    # the first product reads the full-size x: slice by slice (ops.serial_chunks), so only one slice's reshaped
    # and transposed copies exist at a time; the later ones work on the shrunk core
    axis = ops.slice_axis(x, first)
    parts = ops.serial_chunks([x], axis, lambda part: ops.mode_dot(part, u, first, project=True))
    core = tf.concat(parts, axis)  # one part: an identity, dropped by the converter
    for mode, u in present[1:]:
        core = ops.mode_dot(core, u, mode, project=True)
    return Factored(core, tuple(factors))


def project_batch(saved: Factored, dy: tf.Tensor) -> tf.Tensor:
    """``dY ×_B U_Bᵀ``: (B, ...) -> (K_B, ...), or ``dy`` itself when the batch mode is whole."""
    u_b = saved.factors[BATCH]
    if u_b is None:
        return dy
    flat = tf.reshape(dy, [dy.shape[0], -1])
    return tf.reshape(tf.matmul(u_b, flat, transpose_a=True), [u_b.shape[1], *dy.shape[1:]])


def batch_applied(saved: Factored, dy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(Z, dY')`` for a weight gradient ``Σ Z ⊗ dY'`` over the batch: the core expanded over H and W, with the
    batch factor applied on whichever side it makes smaller — ``dY ×_B U_Bᵀ`` (the paper's order, dY' has K_B rows)
    or ``core ×_B U_B`` (Z has B rows, dY' is dY). With few channel components and many output channels the core
    side is far smaller: at MobileNetV2's Conv_1 (K_B 28 of 32, 1280 outputs) the projected dY was a 6.7 MiB
    tensor beside dY at the step's peak; its expanded core is 0.2 MiB."""
    z = expand_spatial(saved)
    u_b = saved.factors[BATCH]
    if u_b is None:
        return z, dy
    if u_b.shape[0] * math.prod(z.shape[1:]) < u_b.shape[1] * math.prod(dy.shape[1:]):
        return ops.mode_dot(z, u_b, BATCH, project=False), dy
    return z, project_batch(saved, dy)


def expand_spatial(saved: Factored) -> tf.Tensor:
    """``core ×_H U_H ×_W U_W``: (K_B, K_H, K_W, K_C) -> (K_B, H, W, K_C)."""
    t = saved.core
    for mode in (HEIGHT, WIDTH):
        u = saved.factors[mode]
        if u is not None:
            t = ops.mode_dot(t, u, mode, project=False)
    return t


def lift_channels(saved: Factored, g: tf.Tensor) -> tf.Tensor:
    """``U_C g``: a per-tap weight gradient (K_C, C_out) -> (C, C_out)."""
    u_c = saved.factors[CHANNELS]
    return g if u_c is None else tf.matmul(u_c, g)


def tucker_elements(shape: tuple[int, ...], ranks: tuple[int | None, ...]) -> int:
    """Elements stored for a Tucker form (the paper's metric): ``Π K_n + Σ I_n·K_n``; ``None`` rank = whole mode."""
    core = 1
    factors = 0
    for size, rank in zip(shape, ranks, strict=True):
        if rank is None:
            core *= size
        else:
            core *= rank
            factors += size * rank
    return core + factors
