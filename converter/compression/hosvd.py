"""``hosvd``: Tucker decomposition over all four modes of an NHWC activation, ranks chosen by ε at run time.

Per mode: Gram matrix, subspace iteration to a static maximum rank, ε masks the columns beyond the paper's
rank. The core is the activation projected on every (masked) factor. Modes of size 1 (Conv1D's unit height)
are kept whole.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from converter import ops
from converter.compression.factored import Factored, project, tucker_elements
from converter.compression.subspace import eps_mask, leading_eigvecs, start_matrix


def max_ranks(shape: tuple[int, ...], max_rank: int, modes: tuple[int, ...]) -> list[int | None]:
    """Static rank per mode: ``min(I_n, max_rank)`` for the decomposed modes, ``None`` (whole) elsewhere."""
    return [min(size, max_rank) if (mode in modes and size > 1) else None for mode, size in enumerate(shape)]


def hosvd(x: tf.Tensor, eps: float, starts: list[np.ndarray | None], iters: int) -> tuple[Factored, tf.Tensor]:
    """Truncated HOSVD of a (B, H, W, C) tensor.

    Args:
        x: the activation.
        eps: energy share each mode keeps (the paper's ε).
        starts: per mode a (I_n, R_n) start matrix, or None to keep that mode whole.
        iters: subspace-iteration steps per mode.

    Returns:
        ``(factored, ranks)``: factors with the columns beyond each effective rank zeroed, and the effective
        ranks (4,) int32 (whole modes report their size).
    """
    total = tf.reduce_sum(x * x)
    factors: list[tf.Tensor | None] = []
    ranks = []
    for mode, start in enumerate(starts):
        if start is None:
            factors.append(None)
            ranks.append(tf.constant(x.shape[mode], tf.int32))
            continue
        q, lam = leading_eigvecs(ops.gram(x, mode), start, iters)
        mask, k = eps_mask(lam, total, eps)
        factors.append(q * mask)
        ranks.append(k)
    return project(x, tuple(factors)), tf.stack(ranks)


class Hosvd:
    """Per-layer HOSVD settings: static maximum ranks (``None`` = whole mode) and fixed start matrices."""

    method = "hosvd"
    modes: tuple[int, ...] = (0, 1, 2, 3)

    def __init__(self, shape: tuple[int, ...], eps: float, ranks: list[int | None], iters: int):
        self.shape = shape
        self.eps = eps
        self.iters = iters
        self.ranks = ranks
        self.starts = [None if r is None else start_matrix(shape[m], r, seed=m) for m, r in enumerate(self.ranks)]

    def compress(self, x: tf.Tensor) -> tuple[Factored, list]:
        factored, _ = hosvd(x, self.eps, self.starts, self.iters)
        return factored, []

    def saved_elements(self, ranks: list[int | None] | None = None) -> int:
        """The paper's metric at ``ranks`` (default: the static maximum ranks)."""
        return tucker_elements(self.shape, tuple(self.ranks if ranks is None else ranks))

    def variables(self) -> dict[str, tf.Variable]:
        return {}
