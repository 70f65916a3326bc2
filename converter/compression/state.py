"""All compression state of a bundle (the warm-start bases) in one flat variable.

Every op XNNPACK takes keeps its own copy of the interpreter's table of resource variables (≈ 40 B per
variable per delegated op, measured on ai-edge-litert 2.3: MobileNetV2 224², last 35 layers, hosvd: 107
variables × 5,719 delegated ops held 23.9 MiB after a step). One variable per basis made that cost grow with
depth twice over; one variable for all of them leaves only the trainable weights in that table.

A train step reads the variable once (:meth:`PackedState.begin`), takes each basis as a slice of that read,
and writes the variable once at its end with the new bases (:meth:`StateStep.assign`); bases no step of this
signature updates (another batch size's) are carried over from the read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from converter.ops import depend


@dataclass(frozen=True)
class Slot:
    """Where one basis lives in the flat state."""

    layer: str
    role: str
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class PackedState:
    """The bases registered by the compressors, as :class:`Slot` s of one float32 vector."""

    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}
        self._initial: list[np.ndarray] = []
        self.variable: tf.Variable | None = None

    def add(self, key: str, layer: str, role: str, initial: np.ndarray) -> str:
        """Register a basis; returns ``key``. Only before :meth:`build`."""
        if self.variable is not None:
            raise RuntimeError("the packed state is already built")
        if key in self.slots:
            raise ValueError(f"compression state {key!r} registered twice")
        offset = sum(s.size for s in self.slots.values())
        self.slots[key] = Slot(layer, role, offset, tuple(initial.shape))
        self._initial.append(np.asarray(initial, np.float32).reshape(-1))
        return key

    def build(self, name: str) -> tf.Variable | None:
        """The one variable (``None`` when nothing was registered)."""
        if self._initial and self.variable is None:
            self.variable = tf.Variable(np.concatenate(self._initial), name=name)
        return self.variable

    def begin(self) -> StateStep:
        """The state as one train step sees it."""
        return StateStep(self)

    def layout(self) -> list[dict]:
        """For the manifest: each basis' layer, role, offset and shape in the flat vector."""
        return [dict(layer=s.layer, role=s.role, offset=s.offset, shape=list(s.shape)) for s in self.slots.values()]


class StateStep:
    """One signature's reads and writes of the packed state; the variable is read at the first :meth:`read`."""

    def __init__(self, store: PackedState):
        self.store = store
        self._flat: tf.Tensor | None = None
        self._new: dict[str, tuple[tf.Tensor, bool]] = {}  # key -> (new basis, read later by the backward)

    def read(self, key: str) -> tf.Tensor:
        slot = self.store.slots[key]
        if self._flat is None:
            self._flat = self.store.variable.read_value()
        return tf.reshape(self._flat[slot.offset:slot.offset + slot.size], slot.shape)

    def write(self, key: str, value: tf.Tensor, read_later: bool = False) -> None:
        """``value`` is ``key``'s new basis; ``read_later`` when the backward pass still reads it (asi's factors)."""
        self._new[key] = (value, read_later)

    def assign(self, after: tf.Tensor) -> list:
        """The write of every basis this step updated (and the others as read), or nothing to write.

        A basis the backward pass still reads is flattened once ``after`` (the step's last gradient) exists:
        flattened where it was made, it was copied there and the copy kept beside it through the loss."""
        if not self._new:
            return []
        parts = []
        for key in self.store.slots:
            value, late = self._new[key] if key in self._new else (self.read(key), False)
            parts.append(tf.reshape(depend(value, after) if late else value, [-1]))
        return [self.store.variable.assign(tf.concat(parts, 0))]
