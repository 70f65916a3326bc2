"""What every layer module works on: a graph node and the forward context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from converter.compression.factored import Factored


@dataclass
class Node:
    """One operation of the model in topological order.

    ``in_shapes``/``out_shape`` exclude the batch axis. ``weights`` maps a role (``kernel``, ``bias``, ...) to the
    Keras value; ``config`` holds the static attributes the layer module derived once, at parse time.
    """

    name: str
    layer: str
    keras_type: str
    kind: str
    inputs: list[int]
    output: int
    in_shapes: list[tuple[int, ...]]
    out_shape: tuple[int, ...]
    config: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    trainable: bool = False


@dataclass
class ForwardContext:
    """How a forward pass runs.

    ``training`` false (inference, the frozen prefix) means nothing is saved. ``compress`` turns the input of a
    weighted layer into its saved :class:`Factored` form and collects the method's state updates.
    """

    training: bool = False
    compress: Callable[[Node, tf.Tensor], Factored] | None = None

    def save_input(self, node: Node, x: tf.Tensor) -> Factored | None:
        if not self.training:
            return None
        if self.compress is None:
            return Factored.whole(x)
        return self.compress(node, x)


INFERENCE = ForwardContext()
