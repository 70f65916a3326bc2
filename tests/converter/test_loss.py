"""The classifiers users build: cross-entropy on logits (``from_logits=True``), the compiled loss of a ``.keras``
model picked by ``--loss auto``, and ``auto`` refusing to guess."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from converter import cli, losses
from converter.convert import convert
from converter.errors import ConversionError
from device_app.bundle import Bundle
from device_app.steps import train_step

LR = 1.0  # large, so the weight delta is far above float32 rounding of the weights themselves
BATCH = 4
CLASSES = 3


def logits_classifier(seed: int = 0, head_activation: str | None = None) -> keras.Model:
    """Conv2D -> ReLU -> GAP -> Dense of logits: Keras' usual classifier trained with ``from_logits=True``."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 2))
    h = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(inp, layers.Dense(CLASSES, activation=head_activation, name="head")(h), name="logits")


def batch(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((BATCH, 6, 6, 2)).astype(np.float32), rng.integers(0, CLASSES, BATCH).astype(np.int32)


@pytest.mark.parametrize("loss", ["sparse_categorical_crossentropy", "categorical_crossentropy"])
def test_logits_classifier_trains_like_from_logits_tape(tmp_path, loss):
    """One ``train`` step on the device runtime moves every weight as SGD on Keras' from_logits loss does, and
    ``infer`` returns probabilities although the model has no softmax."""
    model = logits_classifier()
    x, y = batch()
    manifest = convert(model, tmp_path, train_last=2, compression="none", batch_sizes=(BATCH,), learning_rate=LR,
                       loss=loss, measure_memory=False)
    assert (manifest.task, manifest.loss) == ("classification", "sparse_categorical_crossentropy")
    with tf.GradientTape() as tape:
        logits = model(x, training=False)
        if loss == "categorical_crossentropy":
            ref_loss = keras.losses.categorical_crossentropy(tf.one_hot(y, CLASSES), logits, from_logits=True)
        else:
            ref_loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        ref_loss = tf.reduce_mean(ref_loss)
    grads = dict(zip([v.path for v in model.trainable_variables],
                     tape.gradient(ref_loss, model.trainable_variables), strict=True))

    bundle = Bundle(tmp_path)
    probs = bundle.runner("infer")(x=x)["output"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, tf.nn.softmax(logits).numpy(), atol=1e-5)
    before = bundle.get_weights()
    step_loss, _ = train_step(bundle, x, y, "whole", BATCH)
    after = bundle.get_weights()
    assert step_loss == pytest.approx(float(ref_loss), rel=1e-5)
    trained = [w for w in manifest.weights if w.trainable]
    assert len(trained) == len(grads) == 4
    for spec in trained:
        expected = before[spec.name] - LR * grads[f"{spec.layer}/{spec.role}"].numpy()
        rel = np.linalg.norm(after[spec.name] - expected) / np.linalg.norm(expected)
        step_rel = (np.linalg.norm((before[spec.name] - after[spec.name]) / LR - grads[f"{spec.layer}/{spec.role}"])
                    / np.linalg.norm(grads[f"{spec.layer}/{spec.role}"]))
        assert rel <= 1e-4 and step_rel <= 1e-4, f"{spec.name}: weights {rel:.1e}, step {step_rel:.1e}"



def test_compiled_loss_is_used_by_auto(tmp_path):
    """A ``.keras`` file compiled with SparseCategoricalCrossentropy(from_logits=True) converts as a classifier,
    and one compiled with ``mse`` as a regression, both with the default ``--loss auto`` through the CLI."""
    classifier = logits_classifier()
    classifier.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    classifier.save(tmp_path / "classifier.keras")
    regressor = logits_classifier(seed=2)
    regressor.compile(optimizer="sgd", loss="mse")
    regressor.save(tmp_path / "regressor.keras")
    for name, task, loss in (("classifier", "classification", "sparse_categorical_crossentropy"),
                             ("regressor", "regression", "mse")):
        assert cli.main(["convert", str(tmp_path / f"{name}.keras"), "--out", str(tmp_path / name),
                         "--train-last", "1", "--compression", "none", "--batch-size", "4", "--no-measure"]) == 0
        manifest = Bundle(tmp_path / name).manifest
        assert (manifest.task, manifest.loss) == (task, loss)
    x, _ = batch()
    probs = Bundle(tmp_path / "classifier").runner("infer")(x=x)["output"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    outputs = Bundle(tmp_path / "regressor").runner("infer")(x=x)["output"]
    np.testing.assert_allclose(outputs, regressor(x).numpy(), atol=1e-5)  # regression output stays raw


def test_auto_without_a_hint_is_an_error_naming_loss(tmp_path, capsys):
    model = logits_classifier()
    with pytest.raises(ConversionError, match=r"--loss auto cannot tell the loss.*pass --loss"):
        convert(model, tmp_path / "direct", train_last=1, measure_memory=False)
    model.save(tmp_path / "uncompiled.keras")
    assert cli.main(["convert", str(tmp_path / "uncompiled.keras"), "--out", str(tmp_path / "b"),
                     "--train-last", "1", "--no-measure"]) == 2
    assert "pass --loss sparse_categorical_crossentropy" in capsys.readouterr().err


@pytest.mark.parametrize(("compiled", "head", "message"), [
    ("binary_crossentropy", None, r"compiled with loss 'binary_crossentropy'.*pass --loss"),
    (keras.losses.SparseCategoricalCrossentropy(), None, r"from_logits=False\) but does not end in a softmax"),
    (keras.losses.SparseCategoricalCrossentropy(from_logits=True), "softmax", "applied softmax twice"),
    (keras.losses.CategoricalCrossentropy(label_smoothing=0.1), "softmax", "label_smoothing"),
    ("mse", "softmax", "mse through a final softmax"),
])
def test_compiled_loss_that_cannot_be_trained_is_named(tmp_path, compiled, head, message):
    model = logits_classifier(head_activation=head)
    model.compile(loss=compiled)
    with pytest.raises(ConversionError, match=message):
        convert(model, tmp_path, train_last=1, measure_memory=False)


def test_cli_offers_the_losses_the_converter_knows():
    assert cli.CHOICES == losses.CHOICES
