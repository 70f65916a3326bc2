"""Compression methods for the activations saved for the weight gradient; one small module each.

Every method builds a per-layer object with ``compress(x) -> (Factored, update ops)``, ``ranks``,
``saved_elements()`` and ``variables()``; the layers only see :class:`~converter.compression.factored.Factored`.
"""

from __future__ import annotations

from enum import StrEnum


class Method(StrEnum):
    NONE = "none"
    SVD = "svd"
    HOSVD = "hosvd"
    ASI = "asi"


def parse_method(name: str) -> Method:
    """The method called ``name``; an unknown name fails listing the allowed ones."""
    try:
        return Method(name)
    except ValueError:
        allowed = ", ".join(m.value for m in Method)
        raise ValueError(f"unknown compression method {name!r}; choose one of: {allowed}") from None
