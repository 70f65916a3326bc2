"""``none``: save the activation as is — the vanilla baseline."""

from __future__ import annotations

import math

import tensorflow as tf

from converter.compression.factored import Factored
from converter.compression.state import StateStep


class Vanilla:
    """Keeps the whole activation; no state, no ranks."""

    method = "none"

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self.ranks: list[int | None] = [None] * len(shape)

    def compress(self, x: tf.Tensor, step: StateStep | None = None) -> Factored:
        return Factored.whole(x)

    def saved_elements(self, ranks: list[int | None] | None = None) -> int:
        return math.prod(self.shape)
