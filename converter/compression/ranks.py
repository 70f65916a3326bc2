"""Rank rules shared by the methods and the manifest (numpy only: used on calibration data at conversion)."""

from __future__ import annotations

import numpy as np


def rank_from_energy(sigma2: np.ndarray, eps: float) -> int:
    """The paper's rule: smallest k with Σ_{i≤k} σ²_i / Σσ² ≥ ε (σ² sorted descending)."""
    sigma2 = np.sort(np.asarray(sigma2, dtype=np.float64))[::-1]
    total = sigma2.sum()
    if total <= 0:
        return 1
    share = np.cumsum(sigma2) / total
    return int(min(np.searchsorted(share, eps - 1e-12) + 1, len(sigma2)))


def unfolding(x: np.ndarray, mode: int) -> np.ndarray:
    """Mode-n unfolding of ``x`` in float64: (I_n, product of the other sizes)."""
    return np.moveaxis(x, mode, 0).reshape(x.shape[mode], -1).astype(np.float64)


def mode_spectrum(x: np.ndarray, mode: int) -> np.ndarray:
    """Squared singular values of the mode-n unfolding of ``x`` (descending)."""
    return np.linalg.svd(unfolding(x, mode), compute_uv=False) ** 2


def mode_basis(x: np.ndarray, mode: int, rank: int) -> np.ndarray:
    """Leading ``rank`` left singular vectors of the mode-n unfolding, float32 (I_n, rank)."""
    u, _, _ = np.linalg.svd(unfolding(x, mode), full_matrices=False)
    return u[:, :rank].astype(np.float32)


def eps_ranks(x: np.ndarray, eps: float, modes: tuple[int, ...] = (0, 1, 2, 3)) -> list[int]:
    """ε-rank of each listed mode of ``x`` (the reference HOSVD's choice)."""
    return [rank_from_energy(mode_spectrum(x, m), eps) for m in modes]


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
