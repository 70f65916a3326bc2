"""What every layer module works on: a graph node and the forward context."""

from __future__ import annotations

import math
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


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def depend(t: tf.Tensor, on: tf.Tensor) -> tf.Tensor:
    """``t + min(|s|, 0)`` for the first element ``s`` of ``on``: ``t`` with a data dependency on ``on``.

    TFLite has no control edges, and the converter's op order does not follow the train step's forward/backward
    structure: it moved compressions after the loss (keeping full-size activations alive through the forward
    pass) and hoisted backward-only work (unpacked masks, expanded cores, kernels in matmul form) before it. A
    data dependency is the one ordering it keeps. The zero must be one the converter cannot fold: it folded
    ``t + 0·s`` to ``t`` (checked on TF 2.21: ``pad(depend(x, dy))`` became a lone PAD of ``x``), it keeps
    ``min(|s|, 0)`` (ABS, MINIMUM, ADD), which is 0 for every ``s`` but NaN.
    """
    first = tf.cast(tf.reshape(tf.slice(tf.reshape(on, [-1]), [0], [1]), []), tf.float32)
    zero = tf.minimum(tf.abs(first), 0.0)
    if t.dtype.is_floating:
        return t + tf.cast(zero, t.dtype)
    # integer (packed uint8) tensors: a SLICE starting at a computed 0 (uint8 ADD/SELECT are not builtins)
    begin = tf.fill([len(t.shape)], tf.cast(zero, tf.int32))
    return tf.slice(t, begin, t.shape)


def pack_mask(mask: tf.Tensor) -> tf.Tensor:
    """A bool tensor as one bit per element: uint8 ``(ceil(N / 8),)``, built from builtin ops (CAST, MUL, SUM).

    ReLU/ReLU6 and max-pool masks are what a backward pass keeps besides the weighted layers' inputs; unpacked
    they take a byte per element, a quarter of the float activation."""
    flat = tf.reshape(mask, [-1])
    pad = -flat.shape[0] % 8
    if pad:
        flat = tf.concat([flat, tf.zeros([pad], tf.bool)], 0)
    bits = tf.reshape(tf.cast(flat, tf.int32), [-1, 8]) * tf.constant(_BIT_WEIGHTS, tf.int32)
    return tf.cast(tf.reduce_sum(bits, axis=1), tf.uint8)


_BITS_OF = np.array([[(code >> k) & 1 for k in range(8)] for code in range(256)], bool)  # byte -> its 8 bits


def unpack_mask(packed: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    """The bool tensor of ``dy``'s shape that :func:`pack_mask` packed: each byte looked up (GATHER) in a
    256 × 8 bool table, computed only once ``dy`` exists (:func:`depend`), so the full-size mask lives only
    inside its backward step.

    The lookup's only full-size tensor is the bool result. Unpacked arithmetically (FLOOR_DIV, FLOOR_MOD by the
    bit weights) it went through two int32 (N/8, 8) tensors, each as large as the float activation: measured
    on MobileNetV2 224² (last 20, batch 32) they were 27.6 of the 70.6 MiB alive at the train step's peak op."""
    shape = dy.shape
    count = math.prod(shape)
    codes = tf.cast(depend(packed, dy), tf.int32)
    flat = tf.reshape(tf.gather(tf.constant(_BITS_OF), codes), [-1])
    if flat.shape[0] != count:
        flat = flat[:count]
    return tf.reshape(flat, list(shape))


def packed_mask_bytes(elements: int) -> int:
    """Bytes :func:`pack_mask` keeps for a mask of ``elements``."""
    return -(-elements // 8)
