"""What every layer module works on: a graph node and the forward context."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from converter.compression.factored import Factored
from converter.ops import depend, serial_chunks


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


def after_saved(weight: tf.Tensor, saved: Factored | None) -> tf.Tensor:
    """``weight`` made to depend (:func:`depend`) on the compressed form of the layer's input, so the layer's own
    op runs after the compression: the compression's workspace and the layer's full-size output are never alive
    together, and the output's consumers cannot pull the compression into the backward pass. A tie through the
    small weight costs nothing; one through the output (``y + 0``) made a full-size copy of it."""
    if isinstance(saved, Factored) and saved.compressed:
        return depend(weight, saved.core)
    return weight


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


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


def pack_mask_by_rows(inputs: list[tf.Tensor], mask_of: Callable[..., tf.Tensor], row_elements: int) -> tf.Tensor:
    """``pack_mask(mask_of(*inputs))``, computed on slices of the batch axis one after the other
    (:func:`~converter.ops.serial_chunks`), so neither the full-size bool mask nor the packing's int32 tensors
    (each as large as the float activation) exist at once. Slices join byte-aligned only when a sample's mask
    (``row_elements``) is a whole number of bytes; otherwise the batch is packed in one go."""
    batch = inputs[0].shape[0]
    parts = None if row_elements % 8 == 0 else [(0, batch)]
    packed = serial_chunks(inputs, 0, lambda *rows: pack_mask(mask_of(*rows)), parts)
    return tf.concat(packed, 0)  # one part: an identity, dropped by the converter


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
