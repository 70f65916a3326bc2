"""Rank rules shared by the methods and the manifest: the ε rule in numpy (static ranks from calibration data at
conversion) and in TensorFlow (effective ranks at run time, in the train graph), side by side."""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import tensorflow as tf

from converter.compression import parse_choice


class EpsRule(StrEnum):
    """Which energy ε is a share of.

    ``energy`` is the paper's rule: the smallest k with Σ_{i≤k} λ_i ≥ ε·Σλ. ``centred`` always keeps the leading
    component and applies ε to the energy beyond it: the smallest k with Σ_{2≤i≤k} λ_i ≥ ε·(Σλ − λ_1). For
    non-negative (post-ReLU) activations the leading component is close to the batch mean and holds most of the
    energy, so the paper's ε keeps little more than the mean and the weight gradient loses the per-sample
    variation fine-tuning learns from (docs/bench.md, issue 11).
    """

    ENERGY = "energy"
    CENTRED = "centred"


LEADING = {EpsRule.ENERGY: 0, EpsRule.CENTRED: 1}
"""Components each rule keeps before applying ε to the energy that remains."""


def parse_eps_rule(name: str) -> EpsRule:
    """The rule called ``name``; an unknown name fails listing the allowed ones."""
    return parse_choice(EpsRule, name, "ε rule")


def rank_from_energy(sigma2: np.ndarray, eps: float, rule: EpsRule = EpsRule.ENERGY) -> int:
    """The ε-rank of a spectrum ``sigma2`` (σ², any order) under ``rule`` (see :class:`EpsRule`)."""
    sigma2 = np.sort(np.asarray(sigma2, dtype=np.float64))[::-1]
    lead = min(LEADING[rule], len(sigma2))
    rest = sigma2[lead:]
    total = rest.sum()
    if total <= 0:
        return max(lead, 1)
    share = np.concatenate([[0.0], np.cumsum(rest) / total])  # share of the first j beyond the lead, j = 0, 1, …
    return int(min(max(lead + np.searchsorted(share, eps - 1e-12), 1), len(sigma2)))


def eps_mask(lam: tf.Tensor, total: tf.Tensor, eps: float,
             rule: EpsRule = EpsRule.ENERGY) -> tuple[tf.Tensor, tf.Tensor]:
    """:func:`rank_from_energy` at run time, on Rayleigh quotients ``lam`` (R,) sorted descending: the rank k as
    a 0/1 column mask.

    ``total`` is the full energy ‖X‖²_F, not Σλ, so a capped maximum rank is honest about what it misses; the
    centred rule's remaining energy is ``total − λ_1``. With orthonormal columns, ``Σ_{i≤k} λ_i`` is exactly the
    energy the first k columns capture, so the paper's rule keeps at least ε of the energy even before the
    iteration has converged (Ky Fan: unconverged quotients can only make k larger than the paper's, never lose
    energy); more iterations bring k down to it. The centred rule keeps at least ``λ_1 + ε·(total − λ_1)``.
    Returns ``(mask (R,), k ())``; ``eps`` > 0 (the converter checks it).
    """
    width = lam.shape[0]
    lead = LEADING[rule]
    if width <= lead:
        return tf.ones([width], tf.float32), tf.constant(width, tf.int32)
    rest = total - tf.reduce_sum(lam[:lead]) if lead else total
    below = tf.cast(tf.cumsum(lam[lead:]) < eps * rest, tf.int32)
    k = tf.minimum(lead + tf.reduce_sum(below) + 1, width)
    mask = tf.cast(tf.range(width) < k, tf.float32)
    return mask, k


def unfolding(x: np.ndarray, mode: int) -> np.ndarray:
    """Mode-n unfolding of ``x`` in float64: (I_n, product of the other sizes)."""
    return np.moveaxis(x, mode, 0).reshape(x.shape[mode], -1).astype(np.float64)


def _gram(x: np.ndarray, mode: int) -> np.ndarray:
    """``A·Aᵀ`` of the mode-n unfolding A, float64 (I_n, I_n).

    The unfoldings are wide (I_n ≪ the other sizes' product), so an eigendecomposition of this small matrix gives
    the spectrum and the left singular vectors ~8× faster than an SVD of A, equal to float64 rounding in what
    calibration uses (the leading part; tests/converter/test_eps_rule.py checks it against ``np.linalg.svd``).
    """
    a = unfolding(x, mode)
    return a @ a.T


def mode_spectrum(x: np.ndarray, mode: int) -> np.ndarray:
    """Squared singular values of the mode-n unfolding of ``x`` (descending)."""
    return np.maximum(np.linalg.eigvalsh(_gram(x, mode))[::-1], 0.0)


def mode_basis(x: np.ndarray, mode: int, rank: int) -> np.ndarray:
    """Leading ``rank`` left singular vectors of the mode-n unfolding, float32 (I_n, rank)."""
    _, vectors = np.linalg.eigh(_gram(x, mode))  # ascending eigenvalues
    return vectors[:, ::-1][:, :rank].astype(np.float32)


def eps_ranks(x: np.ndarray, eps: float, modes: tuple[int, ...] = (0, 1, 2, 3),
              rule: EpsRule = EpsRule.ENERGY) -> list[int]:
    """ε-rank of each listed mode of ``x`` under ``rule`` (the reference HOSVD's choice)."""
    return [rank_from_energy(mode_spectrum(x, m), eps, rule) for m in modes]


def headroom(rank: int) -> int:
    """Static rank for an ε-rank measured on calibration data: 25 % (+1) more for batches that need a little
    more, and for the unconverged subspace iteration (whose run-time rank is at least the paper's)."""
    return rank + rank // 4 + 1


def static_ranks(eps_ranks: list[int | None], shape: tuple[int, ...], max_rank: int) -> tuple[list[int | None],
                                                                                           list[int]]:
    """Static maximum ranks sized from calibration ε-ranks.

    A mode whose sized rank reaches its size is kept whole (``None``): an (I, I) factor would only add memory.

    Returns:
        ``(ranks, capped)``: the ranks, and the modes where ``max_rank`` binds (the ε-rank exceeds it, so that
        mode keeps less energy than ε).
    """
    ranks: list[int | None] = []
    capped = []
    for mode, (rank, size) in enumerate(zip(eps_ranks, shape, strict=True)):
        if rank is None:
            ranks.append(None)
            continue
        if rank > max_rank:
            capped.append(mode)
        sized = min(headroom(rank), max_rank)
        ranks.append(None if sized >= size else sized)
    return ranks, capped
