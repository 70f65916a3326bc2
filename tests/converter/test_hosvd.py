"""HOSVD with builtin ops against numpy's SVD-based HOSVD on tensors with planted Tucker ranks."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from converter import ops
from converter.compression.hosvd import hosvd, max_ranks
from converter.compression.ranks import rank_from_energy
from converter.compression.subspace import start_matrix
from tests.converter.builtin import run_builtin

SHAPE = (8, 6, 7, 10)
PLANTED = (3, 2, 4, 2)


def planted_tensor(seed: int = 0, decay: float = 0.6) -> np.ndarray:
    """core ×_n U_n with orthonormal U_n; the core's energy decays geometrically along every mode."""
    rng = np.random.default_rng(seed)
    core = rng.standard_normal(PLANTED)
    for mode, rank in enumerate(PLANTED):
        scale = decay ** np.arange(rank)
        core = core * scale.reshape([-1 if m == mode else 1 for m in range(4)])
    x = core
    for mode, (size, rank) in enumerate(zip(SHAPE, PLANTED, strict=True)):
        u = np.linalg.qr(rng.standard_normal((size, rank)))[0]
        x = np.moveaxis(np.tensordot(u, np.moveaxis(x, mode, 0), axes=(1, 0)), 0, mode)
    return x.astype(np.float32)


def numpy_hosvd(x: np.ndarray, eps: float) -> tuple[list[int], np.ndarray]:
    """Reference: per mode, SVD of the unfolding, the paper's ε rule, projection, reconstruction."""
    factors, ranks = [], []
    for mode in range(4):
        unfolded = np.moveaxis(x, mode, 0).reshape(x.shape[mode], -1).astype(np.float64)
        u, s, _ = np.linalg.svd(unfolded, full_matrices=False)
        share = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.argmax(share >= eps - 1e-9)) + 1
        ranks.append(k)
        factors.append(u[:, :k])
    rebuilt = x.astype(np.float64)
    for mode, u in enumerate(factors):
        proj = u @ u.T
        rebuilt = np.moveaxis(np.tensordot(proj, np.moveaxis(rebuilt, mode, 0), axes=(1, 0)), 0, mode)
    return ranks, rebuilt


def reconstruct(core: np.ndarray, factors) -> np.ndarray:
    x = tf.constant(core)
    for mode, u in enumerate(factors):
        if u is not None:
            x = ops.mode_dot(x, tf.constant(u), mode, project=False)
    return x.numpy()


def run_hosvd(x: np.ndarray, eps: float, iters: int, max_rank: int = 16):
    ranks = max_ranks(x.shape, max_rank, (0, 1, 2, 3))
    starts = [start_matrix(x.shape[m], r, seed=m) for m, r in enumerate(ranks)]
    factored, effective, _ = hosvd(tf.constant(x), eps, starts, iters)
    factors = [None if u is None else u.numpy() for u in factored.factors]
    return effective.numpy().tolist(), factored.core.numpy(), factors


def test_planted_ranks_are_recovered_and_reconstruction_is_exact():
    x = planted_tensor()
    ranks, core, factors = run_hosvd(x, eps=0.9999, iters=3)
    ref_ranks, ref_rebuilt = numpy_hosvd(x, eps=0.9999)
    assert ref_ranks == list(PLANTED)
    assert ranks == list(PLANTED)
    rebuilt = reconstruct(core, factors)
    assert np.linalg.norm(rebuilt - x) / np.linalg.norm(x) < 1e-4
    assert np.linalg.norm(rebuilt - ref_rebuilt) / np.linalg.norm(x) < 1e-4


@pytest.mark.parametrize("eps", [0.6, 0.8, 0.9])
def test_eps_rule_picks_the_papers_rank(eps):
    """With the subspace iteration converged, ε picks numpy's rank and the same truncated reconstruction."""
    x = planted_tensor(seed=3, decay=0.5)
    ranks, core, factors = run_hosvd(x, eps=eps, iters=8)
    ref_ranks, ref_rebuilt = numpy_hosvd(x, eps=eps)
    assert ranks == ref_ranks
    np.testing.assert_allclose(reconstruct(core, factors), ref_rebuilt, atol=1e-4 * np.abs(x).max())


def test_one_step_keeps_at_least_eps_of_the_energy():
    """Unconverged (one step), the rank may exceed the paper's, but the kept energy share is still ≥ ε."""
    x = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    for eps in (0.5, 0.8):
        ranks, _, factors = run_hosvd(x, eps=eps, iters=1)
        ref_ranks, _ = numpy_hosvd(x, eps=eps)
        assert all(r >= ref for r, ref in zip(ranks, ref_ranks, strict=True))
        for mode, u in enumerate(factors):
            kept = np.linalg.norm(np.tensordot(u.T, np.moveaxis(x, mode, 0), axes=(1, 0))) ** 2
            assert kept >= (eps - 1e-4) * np.linalg.norm(x) ** 2


def test_rank_rule_reference_values():
    assert rank_from_energy(np.array([5.0, 3.0, 1.0, 1.0]), 0.8) == 2  # 0.5, 0.8 -> k = 2
    assert rank_from_energy(np.array([5.0, 3.0, 1.0, 1.0]), 0.81) == 3
    assert rank_from_energy(np.array([1.0, 0.0]), 1.0) == 1


def test_hosvd_runs_identically_in_litert():
    """The same function converted with builtins only gives the same ranks and core on the device runtime."""
    x = planted_tensor(seed=7)
    ranks = max_ranks(SHAPE, 16, (0, 1, 2, 3))
    starts = [start_matrix(SHAPE[m], r, seed=m) for m, r in enumerate(ranks)]

    @tf.function(input_signature=[tf.TensorSpec(SHAPE, tf.float32)], autograph=False)
    def decompose(t):
        factored, effective, _ = hosvd(t, 0.9, starts, 2)
        return {"core": factored.core, "ranks": effective}

    out = {("ranks" if t.dtype == np.int32 else "core"): t for t in run_builtin(decompose, x)}
    expected = decompose(tf.constant(x))
    assert out["ranks"].tolist() == expected["ranks"].numpy().tolist()
    np.testing.assert_allclose(out["core"], expected["core"].numpy(), atol=1e-4 * np.abs(x).max())


def test_rank_deficient_mode_at_eps_one_reconstructs_exactly():
    """A Conv1D-shaped (B, 1, L, C) activation: the length mode (24) has rank ≤ B·C = 12, so half of its start
    columns are linearly dependent; they must drop out instead of becoming non-orthogonal noise directions."""
    x = np.random.default_rng(0).standard_normal((4, 1, 24, 3)).astype(np.float32)
    ranks = max_ranks(x.shape, 32, (0, 1, 2, 3))
    starts = [None if r is None else start_matrix(x.shape[m], r, seed=m) for m, r in enumerate(ranks)]
    factored, _, _ = hosvd(tf.constant(x), 1.0, starts, 1)
    length_factor = factored.factors[2].numpy()
    assert int(np.sum(np.linalg.norm(length_factor, axis=0) > 0.5)) == 12  # the dependent columns are zero
    np.testing.assert_allclose(length_factor.T @ length_factor, np.diag(np.linalg.norm(length_factor, axis=0) ** 2),
                               atol=1e-5)
    rebuilt = reconstruct(factored.core.numpy(), [None if u is None else u.numpy() for u in factored.factors])
    assert np.linalg.norm(rebuilt - x) / np.linalg.norm(x) < 1e-5
