"""Names of the signatures in ``model.tflite`` and of their inputs and outputs.

Shapes (``B`` is the batch, ``...`` the per-sample input shape from the manifest):

- ``infer(x: (B, ...)) -> {output: (B, K)}`` — probabilities for classification, raw output for regression.
  Batch is dynamic: the runtime resizes it.
- ``evaluate(x, y) -> {loss: (), correct: ()}`` — mean loss over the batch, number of correct predictions
  (always 0 for regression). Dynamic batch.
- ``train(x: (B, ...), y: (B,)) -> {loss, correct}`` — one optimizer step on a batch of exactly the size the
  manifest's ``train_signatures`` entry gives (static shapes). ``y`` is int32 class indices for classification
  and float32 targets of the output's shape for regression.
- ``features(x) -> {features: (B, ...)}`` — the frozen prefix; dynamic batch, so the device can stream it in
  micro-batches and cache the result per stored sample.
- ``train_features(features, y)`` / ``evaluate_features(features, y)`` — as ``train``/``evaluate`` but starting
  from the prefix output.
- ``get_weights() -> {name: tensor}`` / ``set_weights(**{name: tensor}) -> {ok: ()}`` — every variable: trainable
  weights, optimizer slots and hyper-parameters (``learning_rate``), compression state (warm-start bases).
"""

from __future__ import annotations


class Sig:
    """Signature keys and their tensor names."""

    INFER = "infer"
    EVALUATE = "evaluate"
    TRAIN = "train"
    FEATURES = "features"
    TRAIN_FEATURES = "train_features"
    EVALUATE_FEATURES = "evaluate_features"
    GET_WEIGHTS = "get_weights"
    SET_WEIGHTS = "set_weights"

    # tensor names
    X = "x"
    Y = "y"
    FEATURES_IN = "features"
    OUTPUT = "output"
    LOSS = "loss"
    CORRECT = "correct"
    OK = "ok"

    @staticmethod
    def train_name(batch_size: int, default_batch: int, from_features: bool = False) -> str:
        """Signature key of the train step for ``batch_size``: the default batch has the plain name."""
        base = Sig.TRAIN_FEATURES if from_features else Sig.TRAIN
        return base if batch_size == default_batch else f"{base}_b{batch_size}"
