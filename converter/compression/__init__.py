"""Compression methods for the activations saved for the weight gradient; one small module each.

Every method builds a per-layer object with ``compress(x, step) -> Factored`` (its state, the warm-start bases,
read from and written to the step's :class:`~converter.compression.state.StateStep`), ``ranks`` and
``saved_elements()``; the layers only see :class:`~converter.compression.factored.Factored`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

E = TypeVar("E", bound=StrEnum)


class Method(StrEnum):
    NONE = "none"
    SVD = "svd"
    HOSVD = "hosvd"
    ASI = "asi"


def parse_choice(kind: type[E], name: str, what: str) -> E:
    """The member of ``kind`` called ``name``; an unknown name fails naming ``what`` and the allowed ones."""
    try:
        return kind(name)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise ValueError(f"unknown {what} {name!r}; choose one of: {allowed}") from None


def parse_method(name: str) -> Method:
    """The method called ``name``; an unknown name fails listing the allowed ones."""
    return parse_choice(Method, name, "compression method")
