"""``asi``: fixed ranks from a memory budget, one warm-started subspace-iteration step per batch.

After the follow-up paper (ASI, ICML 2025): the ranks are chosen once, at conversion, from calibration data and
a budget for the saved activations; the bases live in variables (returned by ``get_weights`` as
``compression:basis_mode<n>``) and each training step refines them with a single multiplication by the Gram
matrix and a Gram–Schmidt pass, so no ε test or sorting runs on the device.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from converter import ops
from converter.compression.factored import Factored, project, tucker_elements
from converter.compression.ranks import mode_spectrum, rank_from_energy
from converter.compression.subspace import WarmBases, orthonormalize

log = logging.getLogger(__name__)


def gram_times(x: tf.Tensor, mode: int, v: tf.Tensor) -> tf.Tensor:
    """``X_(n) X_(n)ᵀ v`` without forming the Gram matrix: two thin matmuls."""
    if mode == 3:
        flat = tf.reshape(x, [-1, x.shape[3]])
        return tf.matmul(flat, tf.matmul(flat, v), transpose_a=True)
    a = ops.unfold(x, mode)
    return tf.matmul(a, tf.matmul(a, v, transpose_a=True))


def ranks_at(spectra: list[np.ndarray | None], eps: float, max_rank: int) -> list[int | None]:
    """Per-mode ε-rank capped at ``max_rank``; ``None`` spectra (whole modes) stay ``None``."""
    return [None if s is None else min(rank_from_energy(s, eps), max_rank) for s in spectra]


def choose_ranks(activations: list[np.ndarray], eps: float, budget_bytes: int | None,
                 max_rank: int) -> tuple[list[list[int | None]], float]:
    """Fixed ranks for every compressed layer.

    Without a budget, each mode gets its ε-rank on the calibration activations. With one, ε is lowered (by
    bisection) until the float32 Tucker sizes of all layers fit.

    Args:
        activations: per layer, a calibration batch of its saved input (B, H, W, C).
        eps: the requested energy share.
        budget_bytes: total bytes allowed for the saved activations of all compressed layers, or None.
        max_rank: static cap per mode.

    Returns:
        ``(ranks per layer, ε actually used)``.

    Raises:
        ValueError: the budget is below what rank 1 in every mode needs.
    """
    spectra = [[mode_spectrum(a, m) if a.shape[m] > 1 else None for m in range(4)] for a in activations]

    def total_bytes(e: float) -> int:
        return sum(4 * tucker_elements(a.shape, tuple(ranks_at(s, e, max_rank)))
                   for a, s in zip(activations, spectra, strict=True))

    if budget_bytes is None or total_bytes(eps) <= budget_bytes:
        return [ranks_at(s, eps, max_rank) for s in spectra], eps
    if total_bytes(0.0) > budget_bytes:
        raise ValueError(f"--ram-budget-mb {budget_bytes / 2**20:.3f} is below the smallest asi plan "
                         f"(rank 1 everywhere needs {total_bytes(0.0) / 2**20:.3f} MiB)")
    lo, hi = 0.0, eps
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total_bytes(mid) <= budget_bytes else (lo, mid)
    log.info("asi: ε lowered from %.3f to %.3f to fit %.2f MiB", eps, lo, budget_bytes / 2**20)
    return [ranks_at(s, lo, max_rank) for s in spectra], lo


class Asi:
    """Per-layer ASI state: fixed ranks and warm-start bases in variables."""

    method = "asi"

    def __init__(self, shape: tuple[int, ...], ranks: list[int | None], calibration: np.ndarray | None,
                 name: str):
        self.shape = shape
        self.ranks = ranks
        self.warm = WarmBases(shape, ranks, name, calibration)

    def compress(self, x: tf.Tensor) -> tuple[Factored, list]:
        factors: list[tf.Tensor | None] = [None] * len(self.shape)
        updates = []
        for mode in self.warm.bases:
            factors[mode] = orthonormalize(gram_times(x, mode, self.warm.start(mode)))
            updates.append(self.warm.update(mode, factors[mode]))
        return project(x, tuple(factors)), updates

    def saved_elements(self, ranks: list[int | None] | None = None) -> int:
        return tucker_elements(self.shape, tuple(self.ranks if ranks is None else ranks))

    def variables(self) -> dict[str, tf.Variable]:
        return self.warm.variables()
