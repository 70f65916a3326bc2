"""Calibration: the spectra of the activations each compressed layer would save, on ALL the samples given.

The forward runs eagerly in micro-batches (bounded memory: one train batch of saved inputs at a time, never the
whole data set). Per compressed layer and mode it keeps:

- for the height, width and channel modes: the Gram matrix of the mode-n unfolding summed over every sample
  (the unfolding of all N samples together is the concatenation of the per-batch ones, so its Gram matrix is the
  sum of theirs); its eigenvalues are the σ² of the whole calibration set;
- for the batch mode: the σ² of each full train batch separately (the device decomposes one batch at a time), and
  the ε-rank reported is the largest over the batches.

The first full batch is also kept whole for ``asi`` (its rank choice and warm-start bases).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from converter.compression.ranks import EpsRule, rank_from_energy
from converter.engine import COMPRESSIBLE, frozen_params, run_nodes, saved_shape
from converter.graph import Graph, Split
from converter.layers.base import INFERENCE, ForwardContext, Node

MICRO_BATCH = 8  # samples per eager forward during calibration


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


@dataclass
class LayerSpectra:
    """σ² of one layer's saved input: per full batch for mode 0, pooled over all samples for modes 1–3."""

    shape: tuple[int, ...]  # the saved input at the train batch (B, H, W, C)
    batch_spectra: list[np.ndarray] = field(default_factory=list)
    grams: list[np.ndarray | None] = field(default_factory=list)  # modes 1..3, None for size-1 modes

    def eps_ranks(self, eps: float, modes: tuple[int, ...], rule: EpsRule = EpsRule.ENERGY) -> list[int | None]:
        """The ε-rank per mode under ``rule`` (``None`` for modes not decomposed or of size 1)."""
        ranks: list[int | None] = []
        for mode, size in enumerate(self.shape):
            if mode not in modes or size == 1:
                ranks.append(None)
            elif mode == 0:
                ranks.append(max(rank_from_energy(s, eps, rule) for s in self.batch_spectra))
            else:
                spectrum = np.clip(np.linalg.eigvalsh(self.grams[mode - 1]), 0, None)
                ranks.append(rank_from_energy(spectrum, eps, rule))
        return ranks


@dataclass
class Calibration:
    """What calibration measured: spectra per compressed layer, and the first batch of saved inputs (``asi``)."""

    samples: int
    batches: int
    layers: dict[str, LayerSpectra]
    first_batch: dict[str, np.ndarray]


def _mode_gram(act: np.ndarray, mode: int) -> np.ndarray:
    unfolded = np.moveaxis(act, mode, 0).reshape(act.shape[mode], -1).astype(np.float64)
    return unfolded @ unfolded.T


def _saved_inputs(graph: Graph, nodes: list[Node], chunk: np.ndarray, micro_batch: int) -> dict[str, np.ndarray]:
    """The saved input of every node in ``nodes`` for the samples ``chunk``, forward in micro-batches."""
    buffers = {n.name: np.empty((len(chunk), *saved_shape(n, 1)[1:]), np.float32) for n in nodes}
    offset = 0

    def record(node: Node, t: tf.Tensor) -> None:
        buffers[node.name][offset:offset + t.shape[0]] = t.numpy().reshape(t.shape[0], *saved_shape(node, 1)[1:])

    recorder = ForwardContext(training=True, compress=record)
    for offset in range(0, len(chunk), micro_batch):
        run_nodes(graph.nodes, {graph.input_id: tf.constant(chunk[offset:offset + micro_batch])}, frozen_params,
                  lambda node: recorder if node.name in buffers else INFERENCE)
    return buffers


def calibrate(graph: Graph, split: Split, x: np.ndarray, batch: int, micro_batch: int = MICRO_BATCH) -> Calibration:
    """Run the model forward (eagerly, frozen weights) over every sample of ``x`` and collect the spectra of the
    saved input of every trainable compressible layer.

    Args:
        graph, split: the parsed model and its trainable part.
        x: calibration inputs ``(N, ...)``, ``N >= batch``.
        batch: the default train batch (the batch mode is measured per batch of this size).
        micro_batch: samples per eager forward.

    Raises:
        ValueError: fewer samples than one train batch.
    """
    if len(x) < batch:
        raise ValueError(f"--calibration-data has {len(x)} samples, fewer than the train batch {batch}: the "
                         "batch-mode rank needs at least one whole batch of representative samples")
    nodes = [n for n in split.trainable if n.keras_type in COMPRESSIBLE]
    spectra = {n.name: LayerSpectra(saved_shape(n, batch)) for n in nodes}
    first_batch: dict[str, np.ndarray] = {}
    for start in range(0, len(x), batch):
        buffers = _saved_inputs(graph, nodes, x[start:start + batch], micro_batch)
        for name, act in buffers.items():
            layer = spectra[name]
            if not layer.grams:
                layer.grams = [None if act.shape[m] == 1 else np.zeros((act.shape[m],) * 2) for m in (1, 2, 3)]
            for m in (1, 2, 3):
                if layer.grams[m - 1] is not None:
                    layer.grams[m - 1] += _mode_gram(act, m)
            if len(act) == batch:
                layer.batch_spectra.append(np.clip(np.linalg.eigvalsh(_mode_gram(act, 0)), 0, None))
                if name not in first_batch:
                    first_batch[name] = act
    return Calibration(len(x), len(x) // batch, spectra, first_batch)
