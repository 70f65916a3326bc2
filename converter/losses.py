"""Losses with their gradient with respect to the model output, written out (no GradientTape), and the choice of
loss for a model (``--loss``).

Cross-entropy always trains on the logits: a final softmax is split off by :mod:`converter.graph` and the loss is
the numerically stable log-softmax form, so a model that ends in softmax and a model that ends in logits (Keras'
``from_logits=True``) train the same way; ``infer`` of a classifier returns probabilities either way.
"""

from __future__ import annotations

import json
import zipfile
from enum import StrEnum
from pathlib import Path

import tensorflow as tf

from converter.errors import ConversionError


class Loss(StrEnum):
    CROSSENTROPY = "sparse_categorical_crossentropy"
    MSE = "mse"


AUTO = "auto"
CATEGORICAL = "categorical_crossentropy"  # one-hot targets: the same function of the class index
CHOICES = (AUTO, Loss.CROSSENTROPY.value, CATEGORICAL, Loss.MSE.value)
_KERAS_NAMES = {"sparsecategoricalcrossentropy": Loss.CROSSENTROPY, "categoricalcrossentropy": Loss.CROSSENTROPY,
                "meansquarederror": Loss.MSE, "mse": Loss.MSE}


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


def saved_compile_loss(path: str | Path) -> object | None:
    """The ``loss`` of the compile configuration saved in a ``.keras`` (or Keras ``.h5``) file, None if it has none.

    Models are loaded with ``compile=False`` (their optimizer is not needed), so the loss is read from the file.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
        return (config.get("compile_config") or {}).get("loss")
    import h5py

    with h5py.File(path, "r") as f:
        training = f.attrs.get("training_config")
    if training is None:
        return None
    return json.loads(training.decode() if isinstance(training, bytes) else training).get("loss")


def _describe(loss: object) -> tuple[str, dict]:
    """A compiled Keras loss (a name, a serialized config, a function or a Loss object) as ``(name, config)``."""
    import keras

    if isinstance(loss, list | tuple) and len(loss) == 1:
        loss = loss[0]
    if isinstance(loss, dict) and "class_name" in loss:
        loss = keras.losses.deserialize(loss)
    if isinstance(loss, str):
        return loss, {}
    if isinstance(loss, keras.losses.Loss):
        fn = getattr(loss, "fn", None)  # LossFunctionWrapper subclasses name their function
        return (type(loss).__name__ if fn is None else fn.__name__), loss.get_config()
    return getattr(loss, "__name__", repr(loss)), {}


def _from_compiled(loss: object, final_softmax: bool) -> Loss:
    name, config = _describe(loss)
    kind = _KERAS_NAMES.get(name.lower().replace("_", ""))
    if kind is None:
        raise ConversionError(f"the model is compiled with loss {name!r}, which hosvd-edge cannot train; pass --loss "
                              f"({', '.join(CHOICES[1:])}) to choose one")
    unsupported = {k: v for k, v in config.items() if k in ("label_smoothing", "ignore_class") and v}
    if unsupported:
        raise ConversionError(f"the model's compiled loss {name!r} uses {unsupported}, which the bundle's loss does "
                              "not implement; pass --loss to train without it")
    if kind == Loss.CROSSENTROPY:
        from_logits = bool(config.get("from_logits", False))
        if from_logits and final_softmax:
            raise ConversionError(f"the model is compiled with {name}(from_logits=True) but ends in a softmax, so "
                                  "Keras applied softmax twice; pass --loss sparse_categorical_crossentropy to train "
                                  "its logits")
        if not from_logits and not final_softmax:
            raise ConversionError(f"the model is compiled with {name}(from_logits=False) but does not end in a "
                                  "softmax; if its outputs are logits pass --loss sparse_categorical_crossentropy")
    return kind


def choose_loss(requested: str, final_softmax: bool, compiled: object | None) -> Loss:
    """The loss to train with.

    Args:
        requested: ``--loss``: ``auto`` or one of :data:`CHOICES`.
        final_softmax: the model ends in a softmax (split off: the loss sees its logits).
        compiled: the loss the Keras model was compiled with (``model.loss`` or the saved compile config), or None.

    ``auto`` uses the compiled loss, else cross-entropy when the model ends in softmax, else refuses to guess.
    Cross-entropy on a model without a final softmax is Keras' ``from_logits=True``.

    Raises:
        ConversionError: an unknown or unsupported loss, ``auto`` without any hint, MSE through a final softmax.
    """
    if requested not in CHOICES:
        raise ConversionError(f"unknown --loss {requested!r}; choose one of: {', '.join(CHOICES)}")
    if requested == AUTO:
        if compiled is not None:
            kind = _from_compiled(compiled, final_softmax)
        elif final_softmax:
            kind = Loss.CROSSENTROPY
        else:
            raise ConversionError("--loss auto cannot tell the loss: the model is not compiled and does not end in "
                                  "softmax; pass --loss sparse_categorical_crossentropy (a classifier of logits) or "
                                  "--loss mse (regression)")
    else:
        kind = Loss.CROSSENTROPY if requested == CATEGORICAL else Loss(requested)
    if kind == Loss.MSE and final_softmax:
        raise ConversionError("mse through a final softmax is not supported (the bundle trains the logits before "
                              "it); use --loss sparse_categorical_crossentropy, or drop the softmax")
    return kind
