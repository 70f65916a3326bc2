"""One training step on the device runtime: the only implementation of it.

The device's training loop (:mod:`device_app.training`), the converter's memory measurement (``python -m
device_app.measure``, spawned by ``converter/measure.py``) and the benchmarks (``bench/child.py``) all step through
:func:`train_step`, so the peak the converter records in the manifest is the peak of the code the device runs.

A step follows one of the manifest's plan modes (``MemoryPlanEntry.mode``):

- ``whole``: ``train(x, y)`` pushes the whole batch through the whole model (the official TFLite recipe's way);
- ``streamed``: ``features`` on micro-batches of ``micro_batch`` windows, then ``train_features`` on the whole
  batch, so only the trainable suffix ever holds the whole batch. With prefix features already at hand (the
  feature cache) only the second half runs: :func:`train_step_on_features`.
"""

from __future__ import annotations

import numpy as np

from device_app.bundle import Bundle

MODES = ("whole", "streamed")


def train_step(bundle: Bundle, x: np.ndarray, y: np.ndarray, mode: str, micro_batch: int) -> tuple[float, float]:
    """One optimizer step on raw windows ``x`` (a batch size the bundle has a train signature for).

    Returns:
        ``(loss, correct)`` of the batch before the update.

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode == "whole":
        return bundle.train_step(x, y)
    if mode == "streamed":
        return train_step_on_features(bundle, bundle.features(x, micro_batch), y)
    raise ValueError(f"unknown plan mode {mode!r}; expected one of {MODES}")


def train_step_on_features(bundle: Bundle, features: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The ``streamed`` step's second half on prefix features already computed (or cached)."""
    return bundle.train_step(features, y, from_features=True)


def evaluate(bundle: Bundle, x: np.ndarray, y: np.ndarray, mode: str, micro_batch: int) -> dict[str, float]:
    """Mean loss and accuracy over raw windows ``x`` through the signatures ``mode`` uses for training."""
    if mode == "whole":
        return bundle.evaluate(x, y)
    return bundle.evaluate(bundle.features(x, micro_batch) if len(x) else x, y, from_features=True)
