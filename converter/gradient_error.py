"""The weight-gradient error a truncation of the saved activations causes, measured on calibration data.

For ``asi``'s budget knapsack: the calibration batch runs forward through the trainable suffix and back, once with
every compressible layer's input saved whole (the exact gradient) and once per candidate plan with each input
replaced by its exact truncated HOSVD at that plan's ranks (numpy SVD per unfolding). A layer's output gradient
does not depend on what any layer saved, so one backward pass gives every layer's error at once. Calibration data
has no labels: cross-entropy takes the model's own predictions as targets, MSE a seeded Gaussian around the
outputs (both give an output gradient of the kind training produces).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from converter.compression import Method
from converter.compression.factored import Factored
from converter.compression.ranks import mode_basis
from converter.engine import CompressionSettings, TrainingModule
from converter.graph import Graph, Split
from converter.layers.base import Node
from converter.losses import Loss
from converter.optimizers import OptimizerConfig, OptimizerName
from hosvd_contract import Sig


def truncate(x: np.ndarray, ranks: list[int | None]) -> np.ndarray:
    """``x`` projected on the leading ``ranks[n]`` left singular vectors of each mode-n unfolding (``None``: the
    mode is kept whole): the reconstruction of the exact truncated HOSVD."""
    out = x.astype(np.float64)
    for mode, rank in enumerate(ranks):
        if rank is None or rank >= x.shape[mode]:
            continue
        u = mode_basis(x, mode, rank).astype(np.float64)
        out = np.moveaxis(np.tensordot(u @ u.T, np.moveaxis(out, mode, 0), axes=(1, 0)), 0, mode)
    return out.astype(np.float32)


def _kernel(grads: dict[str, tf.Tensor]) -> np.ndarray:
    return (grads["depthwise_kernel"] if "depthwise_kernel" in grads else grads["kernel"]).numpy()


def gradient_errors(graph: Graph, sp: Split, loss: Loss, x: np.ndarray, batch: int,
                    nodes: list[Node]) -> Callable[[list[list[int | None]]], list[float]]:
    """A function: ranks per node of ``nodes`` -> the relative error ‖dW̃ - dW‖/‖dW‖ of each node's kernel gradient
    on ``batch`` calibration samples of ``x`` when its saved input is truncated to those ranks."""
    if len(x) < batch:
        x = np.concatenate([x] * (-(-batch // len(x))))
    module = TrainingModule(graph, sp, loss, OptimizerConfig(name=OptimizerName.SGD, learning_rate=0.0),
                            CompressionSettings(method=Method.NONE), [batch])
    features = module.prefix(tf.constant(x[:batch], tf.float32))
    outputs = module.infer_from_features(features)[Sig.OUTPUT]
    if loss == Loss.CROSSENTROPY:
        y = tf.argmax(outputs, axis=-1, output_type=tf.int32)
    else:
        y = outputs + tf.constant(np.random.default_rng(0).standard_normal(outputs.shape), tf.float32)
    _, _, exact = module.gradients(features, y, lambda node, t: Factored.whole(t))
    exact_k = {n.name: _kernel(exact[n.name]) for n in nodes}

    def errors(ranks: list[list[int | None]]) -> list[float]:
        by_node = {n.name: r for n, r in zip(nodes, ranks, strict=True)}

        def truncated(node: Node, t: tf.Tensor) -> Factored:
            r = by_node.get(node.name)
            return Factored.whole(t if r is None else tf.constant(truncate(t.numpy(), r)))

        _, _, approx = module.gradients(features, y, truncated)
        return [float(np.linalg.norm(_kernel(approx[n.name]) - exact_k[n.name])
                      / max(np.linalg.norm(exact_k[n.name]), 1e-30)) for n in nodes]

    return errors
