"""Leading eigenvectors of a Gram matrix with builtin ops: subspace iteration, Gram–Schmidt, Rayleigh quotients.

``tf.linalg.svd``/``eigh`` do not convert to TFLite and ``qr`` only as a Flex op, so the decomposition is
written with MATMUL, SUM, SQRT, DIV, CONCATENATION, TOPK_V2 and GATHER. Ranks are static (the maximum);
ε selects the effective rank at run time by zeroing the columns beyond it
(:func:`converter.compression.ranks.eps_mask`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from converter.compression.ranks import mode_basis
from converter.compression.state import PackedState, StateStep

_TINY = 1e-30
_DEPENDENT = 1e-3  # relative norm left after projection below which a column counts as linearly dependent


def start_matrix(size: int, rank: int, seed: int = 0) -> np.ndarray:
    """A fixed (size, rank) start for the iteration: the identity when the rank covers the mode, else Gaussian."""
    if rank >= size:
        return np.eye(size, rank, dtype=np.float32)
    return np.random.default_rng(seed).standard_normal((size, rank)).astype(np.float32)


def orthonormalize(y: tf.Tensor) -> tf.Tensor:
    """Orthonormal columns spanning ``y`` (I, R), column order kept: classical Gram–Schmidt, twice.

    Twice is enough for float32 (Giraud et al.); a column that is linearly dependent on the earlier ones becomes
    zero and is ranked last by its Rayleigh quotient (0). The columns are processed in a WHILE loop over a
    fixed-size (I, R) basis whose not-yet-built columns are zero, so the graph holds one small loop body instead
    of R unrolled copies (unrolled Gram–Schmidt made conversion slow and graphs huge).
    """
    size, rank = y.shape
    if rank == 1:
        return y / tf.maximum(tf.sqrt(tf.reduce_sum(y * y)), _TINY)

    def body(j: tf.Tensor, q: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        pick = tf.reshape(tf.one_hot(j, rank, dtype=y.dtype), [rank, 1])
        v = tf.matmul(y, pick)
        before = tf.sqrt(tf.reduce_sum(v * v))
        for _ in range(2):
            v = v - tf.matmul(q, tf.matmul(q, v, transpose_a=True))
        after = tf.sqrt(tf.reduce_sum(v * v))
        # A column (nearly) inside the span already built is rounding noise: normalising it would add a
        # direction that is not orthogonal to the others and whose Rayleigh quotient overstates the energy.
        scale = tf.where(after > _DEPENDENT * before + _TINY, 1.0 / tf.maximum(after, _TINY), 0.0)
        return j + 1, q + tf.matmul(v * scale, pick, transpose_b=True)

    _, q = tf.while_loop(lambda j, q: j < rank, body, (tf.constant(0), tf.zeros([size, rank], y.dtype)),
                         maximum_iterations=rank)
    return tf.reshape(q, [size, rank])


def subspace_iteration(times: Callable[[tf.Tensor], tf.Tensor], start: tf.Tensor,
                       iters: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Approximate top eigenvectors of a symmetric PSD matrix G (I, I) by subspace iteration.

    Args:
        times: ``v -> G v`` for a thin (I, R) ``v``: a product with G, or with the unfolding twice when G itself
            would be large (:func:`converter.ops.gram_times`).
        start: (I, R) start matrix (or a warm-start basis).
        iters: multiplications by G; each sharpens the basis by the eigenvalue ratio.

    Returns:
        ``(q, G q)``: (I, R) orthonormal columns and their product with G, for :func:`by_rayleigh_quotient`.
    """
    q = start
    for _ in range(iters):
        q = orthonormalize(times(q))
    return q, times(q)


def by_rayleigh_quotient(q: tf.Tensor, gq: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(q, lam)``: the columns of ``q`` sorted by decreasing Rayleigh quotient ``lam`` (R,), from ``gq`` = G q."""
    lam, order = tf.math.top_k(tf.reduce_sum(q * gq, axis=0), k=q.shape[1])
    return tf.gather(q, order, axis=1), lam


class WarmBases:
    """Per-mode bases kept across training steps, the warm starts of the subspace iteration.

    Consecutive batches of one layer span nearly the same subspace, so one iteration from the previous step's
    basis does what several from a fixed start do. A basis starts (the cold start of the first step) as the
    leading singular vectors of calibration activations when given, else as :func:`start_matrix`. A column that
    the iteration zeroed (linearly dependent on that batch) restarts from the fixed start, so it cannot stay
    dead for later batches. The bases are slots of the bundle's one state variable
    (:class:`~converter.compression.state.PackedState`, role ``compression:state`` in ``get_weights``, so
    checkpoints keep them; the manifest's ``compression.state`` says where each ``basis_mode<n>`` lies).
    """

    def __init__(self, shape: tuple[int, ...], ranks: list[int | None], name: str, state: PackedState,
                 layer: str = "", calibration: np.ndarray | None = None):
        self.fixed: dict[int, np.ndarray] = {}
        self.keys: dict[int, str] = {}
        for mode, rank in enumerate(ranks):
            if rank is None:
                continue
            self.fixed[mode] = start_matrix(shape[mode], rank, seed=mode)
            if calibration is None:
                init = np.linalg.qr(self.fixed[mode])[0].astype(np.float32)
            else:  # fewer singular vectors than the rank (a small calibration set): the rest start dead
                found = mode_basis(calibration, mode, rank)
                init = np.pad(found, [(0, 0), (0, rank - found.shape[1])])
            self.keys[mode] = state.add(f"{name}_basis_mode{mode}", layer, f"basis_mode{mode}", init)

    @property
    def modes(self) -> list[int]:
        return list(self.keys)

    def start(self, mode: int, step: StateStep) -> tf.Tensor:
        """This step's start for ``mode``: the previous basis, dead (zero) columns refilled from the fixed start."""
        basis = step.read(self.keys[mode])
        alive = tf.reduce_sum(basis * basis, axis=0, keepdims=True) > 0.25
        return tf.where(alive, basis, tf.constant(self.fixed[mode]))

    def update(self, mode: int, q: tf.Tensor, step: StateStep, read_later: bool = False) -> None:
        step.write(self.keys[mode], q, read_later)
