"""Losses with their gradient with respect to the model output, written out (no GradientTape)."""

from __future__ import annotations

from enum import StrEnum

import tensorflow as tf


class Loss(StrEnum):
    CROSSENTROPY = "sparse_categorical_crossentropy"
    MSE = "mse"


def _batch(t: tf.Tensor) -> tf.Tensor:
    """Batch size as float32: static when known, else read at run time (dynamic-batch signatures)."""
    if t.shape[0] is not None:
        return tf.constant(float(t.shape[0]))
    return tf.cast(tf.shape(t)[0], tf.float32)


def crossentropy(logits: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Softmax cross-entropy on logits (B, K) and int32 labels (B,).

    Returns:
        ``(mean loss, dL/dlogits (B, K), number correct)``; the gradient is ``(softmax - onehot) / B``.
    """
    shifted = logits - tf.reduce_max(logits, axis=-1, keepdims=True)
    exp = tf.exp(shifted)
    total = tf.reduce_sum(exp, axis=-1, keepdims=True)
    log_probs = shifted - tf.math.log(total)
    onehot = tf.one_hot(labels, logits.shape[-1], dtype=tf.float32)
    batch = _batch(logits)
    loss = -tf.reduce_sum(onehot * log_probs) / batch
    grad = (exp / total - onehot) / batch
    correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels), tf.float32))
    return loss, grad, correct


def mse(outputs: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Mean squared error over every element (Keras' ``mse`` averaged over the batch); ``correct`` is 0."""
    diff = outputs - targets
    count = _batch(outputs) * float(outputs.shape[1:].num_elements())
    return tf.reduce_sum(diff * diff) / count, 2.0 * diff / count, tf.constant(0.0)


LOSSES = {Loss.CROSSENTROPY: crossentropy, Loss.MSE: mse}
