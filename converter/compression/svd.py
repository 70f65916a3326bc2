"""``svd``: truncated SVD of the mode-0 (batch) unfolding B × (H·W·C), rank chosen by ε.

It is HOSVD restricted to the batch mode, so it reuses that code rather than repeating it.
"""

from __future__ import annotations

from converter.compression.hosvd import Hosvd


class BatchSvd(Hosvd):
    """Only the batch mode is decomposed; H, W and C are kept whole."""

    method = "svd"
    modes = (0,)
