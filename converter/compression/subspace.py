"""Leading eigenvectors of a Gram matrix with builtin ops: subspace iteration, Gram–Schmidt, Rayleigh quotients.

``tf.linalg.svd``/``eigh`` do not convert to TFLite and ``qr`` only as a Flex op, so the decomposition is
written with MATMUL, SUM, SQRT, DIV, CONCATENATION, TOPK_V2 and GATHER. Ranks are static (the maximum);
ε selects the effective rank at run time by zeroing the columns beyond it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

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


def leading_eigvecs(g: tf.Tensor, start: np.ndarray, iters: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Approximate top eigenpairs of a symmetric PSD matrix ``g`` (I, I) by subspace iteration.

    Args:
        g: the Gram matrix.
        start: (I, R) start matrix (or a warm-start basis).
        iters: multiplications by ``g``; each sharpens the basis by the eigenvalue ratio.

    Returns:
        ``(q, lam)``: (I, R) orthonormal columns sorted by decreasing Rayleigh quotient ``lam`` (R,).
    """
    q = tf.constant(start) if isinstance(start, np.ndarray) else start
    for _ in range(iters):
        q = orthonormalize(tf.matmul(g, q))
    lam = tf.reduce_sum(q * tf.matmul(g, q), axis=0)
    lam, order = tf.math.top_k(lam, k=q.shape[1])
    return tf.gather(q, order, axis=1), lam


def eps_mask(lam: tf.Tensor, total: tf.Tensor, eps: float) -> tuple[tf.Tensor, tf.Tensor]:
    """The paper's rank rule at run time: smallest k with Σ_{i≤k} λ_i ≥ ε·Σλ, as a 0/1 column mask.

    ``total`` is the full energy ‖X‖²_F (so a capped maximum rank is honest about what it misses).
    With orthonormal columns, ``Σ_{i≤k} λ_i`` is exactly the energy the first k columns capture, so the kept
    columns hold at least ε of the energy even before the iteration has converged (Ky Fan: unconverged
    quotients can only make k larger than the paper's, never lose energy); more iterations bring k down to it.
    Returns ``(mask (R,), k ())``.
    """
    below = tf.cast(tf.cumsum(lam) < eps * total, tf.int32)
    k = tf.minimum(tf.reduce_sum(below) + 1, lam.shape[0])
    mask = tf.cast(tf.range(lam.shape[0]) < k, tf.float32)
    return mask, k
