"""Calibration: the activations each compressed layer would save, computed on representative data."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from converter.engine import COMPRESSIBLE, frozen_params, run_nodes, saved_shape
from converter.graph import Graph, Split
from converter.layers.base import INFERENCE, ForwardContext, Node


def load_calibration(path: str) -> np.ndarray:
    """Input samples from an ``.npz`` (array ``x``, or its only array) or ``.npy`` file, as float32.

    Raises:
        ValueError: the file holds no usable array.
    """
    data = np.load(path)
    if isinstance(data, np.ndarray):
        return data.astype(np.float32)
    keys = list(data.keys())
    if "x" in keys:
        return data["x"].astype(np.float32)
    if len(keys) == 1:
        return data[keys[0]].astype(np.float32)
    raise ValueError(f"calibration file {path} has arrays {keys}; name the input array 'x'")


def saved_activations(graph: Graph, split: Split, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """Run the model forward (eagerly, with the frozen weights) on ``batch`` samples of ``x`` and record the
    4-D input of every trainable compressible layer, keyed by node name."""
    if len(x) < batch:
        x = np.concatenate([x] * (-(-batch // len(x))))[:batch]
    recorded: dict[str, np.ndarray] = {}
    compressible = {n.name for n in split.trainable if n.keras_type in COMPRESSIBLE}

    def record(node: Node, t: tf.Tensor):
        if node.name in compressible:
            recorded[node.name] = t.numpy().reshape(saved_shape(node, batch))
        return None

    ctx = ForwardContext(training=True, compress=record)
    run_nodes(graph.nodes, {graph.input_id: tf.constant(x[:batch])}, frozen_params,
              lambda node: ctx if node.name in compressible else INFERENCE)
    return recorded
