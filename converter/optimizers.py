"""SGD (momentum, decoupled weight decay) and Adam as variable updates, matching Keras 3's update rules.

State lives in variables so ``get_weights`` returns it and a checkpoint is complete: per weight slots
(``optimizer:momentum``, ``optimizer:m``, ``optimizer:v``) and shared scalars (``optimizer:learning_rate``,
``optimizer:step``). The learning rate is a variable so the device can change it with ``set_weights``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import tensorflow as tf


class OptimizerName(StrEnum):
    SGD = "sgd"
    ADAM = "adam"


@dataclass(frozen=True)
class OptimizerConfig:
    name: OptimizerName = OptimizerName.SGD
    learning_rate: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7

    def slots(self) -> tuple[str, ...]:
        """Per-weight state variables this optimizer keeps."""
        if self.name == OptimizerName.ADAM:
            return ("m", "v")
        return ("momentum",) if self.momentum else ()

    def to_manifest(self) -> dict:
        fields = {"name": self.name.value, "learning_rate": self.learning_rate, "weight_decay": self.weight_decay}
        if self.name == OptimizerName.ADAM:
            fields |= {"beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon}
        else:
            fields["momentum"] = self.momentum
        return fields


def apply(cfg: OptimizerConfig, var: tf.Variable, grad: tf.Tensor, slots: dict[str, tf.Variable],
          lr: tf.Tensor, step: tf.Tensor) -> list:
    """Update ops for one weight. ``step`` is the 1-based step number of this update (float32)."""
    updates = []
    if cfg.weight_decay:
        updates.append(var.assign_sub(var * (lr * cfg.weight_decay)))
    if cfg.name == OptimizerName.ADAM:
        m, v = slots["m"], slots["v"]
        m_new = m + (grad - m) * (1.0 - cfg.beta_1)
        v_new = v + (grad * grad - v) * (1.0 - cfg.beta_2)
        alpha = lr * tf.sqrt(1.0 - tf.pow(cfg.beta_2, step)) / (1.0 - tf.pow(cfg.beta_1, step))
        with tf.control_dependencies(updates):
            updates += [m.assign(m_new), v.assign(v_new),
                        var.assign_sub(alpha * m_new / (tf.sqrt(v_new) + cfg.epsilon))]
    elif cfg.momentum:
        velocity = slots["momentum"]
        v_new = cfg.momentum * velocity - lr * grad
        with tf.control_dependencies(updates):
            updates += [velocity.assign(v_new), var.assign_add(v_new)]
    else:
        with tf.control_dependencies(updates):
            updates.append(var.assign_sub(lr * grad))
    return updates
