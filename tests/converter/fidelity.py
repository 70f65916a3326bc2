"""Gradient fidelity against the paper's exact method: real activations of small models pre-trained on sklearn's
digits, the exact weight gradient (``tf.GradientTape``), the paper's truncated HOSVD (numpy SVD per unfolding, its
ε rank rule) and the bundle's own compressed update on the device runtime, over consecutive batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers
from sklearn.datasets import load_digits

from converter.compression.ranks import EpsRule, rank_from_energy, unfolding
from converter.convert import convert
from device_app.bundle import Bundle
from device_app.steps import train_step

COMPRESSED = (layers.Conv2D, layers.DepthwiseConv2D, layers.Conv1D)
BATCH = 32
LR = 0.01


def digits(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 real 8×8 digits, as images (N, 8, 8, 1) or as raster-scan sequences (N, 64, 1), in [0, 1]."""
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    return (x[..., None] if kind == "2d" else x.reshape(-1, 64, 1)), data.target.astype(np.int32)


def calibration(kind: str) -> np.ndarray:
    """64 training digits: the representative inputs a user passes as ``--calibration-data``."""
    return digits(kind)[0][:64]


def pretrained(kind: str, seed: int = 0, epochs: int = 4) -> keras.Model:
    """A small logits classifier, briefly trained, with Conv2D + DepthwiseConv2D (``2d``) or Conv1D (``1d``)
    layers whose activations (ReLU as separate layers) the compressed layers save."""
    keras.utils.set_random_seed(seed)
    x, y = digits(kind)
    if kind == "2d":
        stack = [layers.Conv2D(16, 3, padding="same", name="conv_a"), layers.ReLU(),
                 layers.Conv2D(24, 3, padding="same", name="conv_b"), layers.ReLU(),
                 layers.DepthwiseConv2D(3, padding="same", name="depthwise"), layers.ReLU(),
                 layers.Conv2D(32, 1, name="pointwise"), layers.ReLU(), layers.GlobalAveragePooling2D()]
    else:
        stack = [layers.Conv1D(16, 5, padding="same", name="conv_a"), layers.ReLU(), layers.MaxPooling1D(2),
                 layers.Conv1D(24, 3, padding="same", name="conv_b"), layers.ReLU(),
                 layers.Conv1D(32, 3, padding="same", name="conv_c"), layers.ReLU(), layers.GlobalAveragePooling1D()]
    model = keras.Sequential([keras.Input(x.shape[1:]), *stack, layers.Dense(10, name="head")], name=f"digits_{kind}")
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:1200], y[:1200], batch_size=64, epochs=epochs, verbose=0)
    return model


def exact_hosvd(x: np.ndarray, eps: float, rule: EpsRule = EpsRule.ENERGY) -> np.ndarray:
    """The paper's truncated HOSVD of ``x``, rebuilt: per mode of size > 1 the exact SVD of the unfolding, the
    smallest rank whose cumulative energy share is ≥ ε (of the energy ``rule`` says), projection on those
    singular vectors."""
    rebuilt = x.astype(np.float64)
    for mode in range(x.ndim):
        if x.shape[mode] == 1:
            continue
        u, s, _ = np.linalg.svd(unfolding(x, mode), full_matrices=False)
        u = u[:, :rank_from_energy(s**2, eps, rule)]
        rebuilt = np.moveaxis(np.tensordot(u @ u.T, np.moveaxis(rebuilt, mode, 0), axes=(1, 0)), 0, mode)
    return rebuilt.astype(np.float32)


def weight_gradient(layer: keras.layers.Layer, x: np.ndarray, dy: tf.Tensor) -> np.ndarray:
    """dL/dkernel of a linear layer whose input is ``x`` and output gradient ``dy``."""
    with tf.GradientTape() as tape:
        out = layer(x)
    return tape.gradient(out, layer.trainable_variables[0], output_gradients=dy).numpy()


@dataclass
class Errors:
    """Relative weight-gradient errors per compressed layer and batch: the bundle's and the exact HOSVD's."""

    bundle: dict[str, list[float]]
    paper: dict[str, list[float]]

    def mean(self, which: str) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in getattr(self, which).items()}


def measure(model: keras.Model, kind: str, bundle_dir: Path, eps: float, batches: int, **options) -> Errors:
    """Convert ``model`` (all weighted layers but the first trained, ``hosvd`` at ``eps``, plain SGD), take
    ``batches`` consecutive steps on the device runtime, and compare each compressed layer's update with the exact
    gradient at the same weights and with the paper's HOSVD gradient (at the bundle's ``eps_rule``)."""
    x_all, y_all = digits(kind)
    x_all, y_all = x_all[1200:], y_all[1200:]
    original = model.get_weights()
    try:
        return _measure(model, x_all, y_all, bundle_dir, eps, batches, options)
    finally:
        model.set_weights(original)


def _measure(model: keras.Model, x_all: np.ndarray, y_all: np.ndarray, bundle_dir: Path, eps: float, batches: int,
             options: dict) -> Errors:
    weighted = [layer for layer in model.layers if isinstance(layer, (*COMPRESSED, layers.Dense))]
    rule = EpsRule(options.get("eps_rule", "energy"))
    convert(model, bundle_dir, train_last=len(weighted) - 1, compression="hosvd", epsilon=eps, batch_sizes=(BATCH,),
            learning_rate=LR, loss="sparse_categorical_crossentropy", measure_memory=False, **options)
    bundle = Bundle(bundle_dir)
    names = {w.layer: w.name for w in bundle.manifest.weights if w.trainable and w.role in ("kernel",
                                                                                          "depthwise_kernel")}
    compressed = [layer for layer in weighted[1:] if isinstance(layer, COMPRESSED)]
    errors = Errors({layer.name: [] for layer in compressed}, {layer.name: [] for layer in compressed})
    for step in range(batches):
        x, y = x_all[step * BATCH:(step + 1) * BATCH], y_all[step * BATCH:(step + 1) * BATCH]
        before = bundle.get_weights()
        for layer in weighted[1:]:  # the Keras model at the bundle's current weights
            layer.set_weights([before[w.name] for w in bundle.manifest.weights
                               if w.trainable and w.layer == layer.name])
        train_step(bundle, x, y, "whole", BATCH)
        after = bundle.get_weights()
        inputs, outputs = {}, {}
        with tf.GradientTape() as tape:
            h = tf.constant(x)
            for layer in model.layers:
                if layer in compressed:
                    inputs[layer.name] = h.numpy()
                h = layer(h)
                if layer in compressed:
                    outputs[layer.name] = h
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, h, from_logits=True))
        dys = tape.gradient(loss, list(outputs.values()))
        for layer, dy in zip(compressed, dys, strict=True):
            exact = weight_gradient(layer, inputs[layer.name], dy)
            paper = weight_gradient(layer, exact_hosvd(inputs[layer.name], eps, rule), dy)
            ours = (before[names[layer.name]] - after[names[layer.name]]) / LR
            norm = np.linalg.norm(exact)
            errors.bundle[layer.name].append(float(np.linalg.norm(ours - exact) / norm))
            errors.paper[layer.name].append(float(np.linalg.norm(paper - exact) / norm))
    return errors
