"""``hosvd``: Tucker decomposition over all four modes of an NHWC activation, ranks chosen by ε at run time.

Per mode: Gram matrix, subspace iteration to a static maximum rank (warm-started from the previous step's
basis), ε masks the columns beyond the rank its rule picks (the paper's, or centred:
:class:`~converter.compression.ranks.EpsRule`). The core is the activation projected on every (masked)
factor. Modes of size 1 (Conv1D's unit height) are kept whole.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from converter import ops
from converter.compression.factored import BATCH, CHANNELS, Factored, project, tucker_elements
from converter.compression.ranks import EpsRule, eps_mask
from converter.compression.state import PackedState, StateStep
from converter.compression.subspace import WarmBases, by_rayleigh_quotient, start_matrix, subspace_iteration


def max_ranks(shape: tuple[int, ...], max_rank: int, modes: tuple[int, ...]) -> list[int | None]:
    """Static rank per mode: ``min(I_n, max_rank)`` for the decomposed modes, ``None`` (whole) elsewhere."""
    return [min(size, max_rank) if (mode in modes and size > 1) else None for mode, size in enumerate(shape)]


def implicit_gram(shape: tuple[int, ...], mode: int, width: int, steps: int) -> bool:
    """Whether mode ``mode``'s subspace iteration multiplies by its Gram matrix G implicitly (twice by the
    unfolding, :func:`converter.ops.gram_times`) rather than making G: when that takes fewer multiply-adds over
    the ``steps`` + 1 products with a (I_n, ``width``) basis. It does for wide channel modes (960 channels, width
    36: 0.22 against 1.5 G multiply-adds at batch 32, 7×7) and then never holds G (3.5 MiB there)."""
    if mode not in (BATCH, CHANNELS):
        return False  # a spatial mode's Gram is small; gram_times makes it per slice anyway
    size = shape[mode]
    others = math.prod(shape) // size
    products = steps + 1
    return products * 2 * others * size * width < others * size * size + products * size * size * width


def hosvd(x: tf.Tensor, eps: float, starts: list[np.ndarray | tf.Tensor | None], iters: int,
          keep: list[int | None] | None = None, batch_iters: int | None = None,
          rule: EpsRule = EpsRule.ENERGY) -> tuple[Factored, tf.Tensor, list[tf.Tensor | None]]:
    """Truncated HOSVD of a (B, H, W, C) tensor.

    Args:
        x: the activation.
        eps: energy share each mode keeps (the paper's ε), of the energy ``rule`` says.
        starts: per mode a (I_n, W_n) start matrix (fixed, or the previous step's basis), or None to keep that
            mode whole.
        iters: subspace-iteration steps per mode.
        batch_iters: steps for the batch mode instead (default ``iters``): it starts cold at every step.
        keep: per mode the static rank R_n ≤ W_n of the saved factor (default W_n); the W_n - R_n extra columns
            oversample the iteration, which converges at the ratio λ_{W+1}/λ_k instead of λ_{R+1}/λ_k.
        rule: the ε rule (:class:`~converter.compression.ranks.EpsRule`).

    Returns:
        ``(factored, ranks, bases)``: factors (I_n, R_n) with the columns beyond each effective rank zeroed, the
        effective ranks (4,) int32 (whole modes report their size), and per mode the whole (I_n, W_n) basis
        sorted by Rayleigh quotient, unmasked (the next step's warm start).
    """
    steps_of = {mode: batch_iters if (mode == BATCH and batch_iters is not None) else iters
                for mode, start in enumerate(starts) if start is not None}
    grams = {mode: ops.gram(x, mode) for mode in steps_of
             if not implicit_gram(x.shape, mode, starts[mode].shape[1], steps_of[mode])}
    # ‖X‖² is every Gram's trace: the smallest one's needs the smallest identity constant (960² floats at C = 960)
    smallest = min(steps_of, key=lambda m: x.shape[m]) if steps_of else None
    total = None if smallest is None else ops.trace(grams[smallest] if smallest in grams else ops.gram(x, smallest))
    factors: list[tf.Tensor | None] = []
    bases: list[tf.Tensor | None] = []
    ranks = []
    for mode, start in enumerate(starts):
        if start is None:
            factors.append(None)
            bases.append(None)
            ranks.append(tf.constant(x.shape[mode], tf.int32))
            continue
        rank = start.shape[1] if keep is None or keep[mode] is None else keep[mode]

        def finish(q: tf.Tensor, gq: tf.Tensor, total: tf.Tensor, rank: int = rank) -> tuple[tf.Tensor, ...]:
            q, lam = by_rayleigh_quotient(q, gq)
            mask, k = eps_mask(lam[:rank], total, eps, rule)
            return q, q[:, :rank] * mask, k

        # what works on the small bases alone runs off XNNPACK (ops.undelegated): with a small Gram matrix the
        # whole iteration, else all but the products with the full-size unfolding
        start = tf.constant(start) if isinstance(start, np.ndarray) else start
        g = grams.get(mode)
        if g is None:
            q, factor, k = ops.undelegated(
                finish, *subspace_iteration(lambda v, m=mode: ops.gram_times(x, m, v), start, steps_of[mode]), total)
        else:
            q, factor, k = ops.undelegated(
                lambda g, s, t, m=mode: finish(*subspace_iteration(lambda v: ops.matmul(g, v), s, steps_of[m]), t),
                g, start, total)
        bases.append(q)
        factors.append(factor)
        ranks.append(k)
    return project(x, tuple(factors)), tf.stack(ranks), bases


class Hosvd:
    """Per-layer HOSVD state: static maximum ranks (``None`` = whole mode), fixed starts, warm-start bases.

    With ``warm`` every mode but the batch mode starts from the previous step's basis (slots of ``state``,
    :class:`~converter.compression.subspace.WarmBases`); the batch mode holds other samples at every step, so its
    previous basis says nothing about the next batch and it starts cold each time.
    """

    method = "hosvd"
    modes: tuple[int, ...] = (0, 1, 2, 3)

    def __init__(self, shape: tuple[int, ...], eps: float, ranks: list[int | None], iters: int, *,
                 name: str = "hosvd", layer: str = "", state: PackedState | None = None,
                 calibration: np.ndarray | None = None, warm: bool = True, oversample: int = 0,
                 batch_iters: int | None = None, rule: EpsRule = EpsRule.ENERGY):
        self.shape = shape
        self.eps = eps
        self.rule = rule
        self.iters = iters
        self.batch_iters = batch_iters
        self.ranks = ranks
        width = [None if r is None else min(shape[m], r + oversample) for m, r in enumerate(ranks)]
        self.starts = [None if w is None else start_matrix(shape[m], w, seed=m) for m, w in enumerate(width)]
        warm_widths = [w if (warm and m != BATCH) else None for m, w in enumerate(width)]
        self.warm = WarmBases(shape, warm_widths, name, PackedState() if state is None else state, layer,
                              calibration)

    def compress(self, x: tf.Tensor, step: StateStep | None = None) -> Factored:
        """The saved form of ``x``; the new warm-start bases go to ``step``."""
        starts = [self.warm.start(m, step) if m in self.warm.keys else s for m, s in enumerate(self.starts)]
        factored, _, bases = hosvd(x, self.eps, starts, self.iters, self.ranks, self.batch_iters, self.rule)
        for m in self.warm.modes:
            self.warm.update(m, bases[m], step)
        return factored

    def saved_elements(self, ranks: list[int | None] | None = None) -> int:
        """The paper's metric at ``ranks`` (default: the static maximum ranks)."""
        return tucker_elements(self.shape, tuple(self.ranks if ranks is None else ranks))
