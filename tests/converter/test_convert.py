"""convert(): errors that name the problem, the ASI method, optimizers against Keras, CLI and the Keras round trip."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from keras import layers

from converter.cli import main
from converter.convert import convert
from converter.errors import ConversionError
from hosvd_contract import MODEL_FILE, load_manifest
from tests.converter.models import every_layer_1d, weighted_count
from tests.converter.test_gradients import reference_gradients


def small_cnn(seed: int = 0, extra=None) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1))
    h = layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
    if extra is not None:
        h = extra(h)
    h = layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="c2")(h)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    out = layers.Dense(3, activation="softmax", name="head")(h)
    return keras.Model(inp, out, name="small_cnn")


def runner(bundle, key):
    interpreter = Interpreter(model_path=str(bundle / MODEL_FILE))
    return interpreter, interpreter.get_signature_runner(key)


def test_unsupported_layer_in_trainable_part_is_named(tmp_path):
    model = small_cnn(extra=layers.LayerNormalization(name="norm"))
    with pytest.raises(ConversionError, match=r"layer 'norm' \(LayerNormalization\) is in the trainable part"):
        convert(model, tmp_path, train_last=3, measure_memory=False)


def test_unsupported_layer_in_frozen_prefix_runs_through_keras(tmp_path):
    model = small_cnn(extra=layers.Activation("tanh", name="squash"))
    manifest = convert(model, tmp_path, train_last=2, compression="none", batch_sizes=(4,), measure_memory=False)
    x = np.random.default_rng(0).random((3, 8, 8, 1), dtype=np.float32)
    _, infer = runner(tmp_path, "infer")
    np.testing.assert_allclose(infer(x=x)["output"], model(x).numpy(), atol=1e-5)
    assert [info.name for info in manifest.layers if info.trainable] == ["c2", "head"]


def test_train_last_out_of_range(tmp_path):
    with pytest.raises(ConversionError, match="--train-last must be between 1 and 3"):
        convert(small_cnn(), tmp_path, train_last=4, measure_memory=False)


def test_select_tf_op_is_a_conversion_error_listing_it(tmp_path):
    """A frozen layer whose op has no builtin kernel (QR is Flex-only) fails loudly instead of shipping Flex."""
    qr = layers.Lambda(lambda t: t + 1e-6 * tf.reduce_sum(tf.linalg.qr(tf.reshape(t, [-1, 16, 16]))[0]),
                       output_shape=(8, 8, 4), name="qr")
    model = small_cnn(extra=qr)
    with pytest.raises(ConversionError, match="builtin ops only"):
        convert(model, tmp_path, train_last=2, compression="none", measure_memory=False)


def test_asi_ranks_fit_the_budget_and_bases_are_warm_started(tmp_path):
    model = small_cnn()
    rng = np.random.default_rng(0)
    calib = rng.random((16, 8, 8, 1), dtype=np.float32)
    budget_mb = 0.004
    manifest = convert(model, tmp_path, train_last=3, compression="asi", epsilon=0.95, batch_sizes=(8,),
                       calibration_data=calib, ram_budget_mb=budget_mb, measure_memory=False)
    compressed = [i for i in manifest.layers if i.compression == "asi"]
    assert sum(i.saved_bytes_compressed for i in compressed) <= budget_mb * 2**20
    assert manifest.compression["epsilon_used"] < 0.95
    [state] = [w for w in manifest.weights if w.role == "compression:state"]
    bases = manifest.compression["state"]
    assert {b["layer"] for b in bases} == {"c1", "c2"}
    assert sum(math.prod(b["shape"]) for b in bases) == math.prod(state.shape)
    interpreter = Interpreter(model_path=str(tmp_path / MODEL_FILE))
    get = interpreter.get_signature_runner("get_weights")
    train = interpreter.get_signature_runner("train")
    x, y = calib[:8], rng.integers(0, 3, 8).astype(np.int32)
    before = get()
    losses = [float(train(x=x, y=y)["loss"]) for _ in range(15)]
    after = get()
    assert losses[-1] < losses[0]

    def unpack(flat):
        return [flat[b["offset"]:b["offset"] + math.prod(b["shape"])].reshape(b["shape"]) for b in bases]

    moved = [i for i, (b0, b1) in enumerate(zip(unpack(before[state.name]), unpack(after[state.name]), strict=True))
             if not np.allclose(b0, b1, atol=1e-6)]
    assert moved, "the warm-start bases are refined by each step"
    for b in unpack(after[state.name]):  # bases stay orthonormal
        np.testing.assert_allclose(b.T @ b, np.eye(b.shape[1]), atol=1e-4)


def test_asi_budget_below_rank_one_is_refused(tmp_path):
    calib = np.random.default_rng(0).random((8, 8, 8, 1), dtype=np.float32)
    with pytest.raises(ConversionError, match="below the smallest asi plan"):
        convert(small_cnn(), tmp_path, train_last=3, compression="asi", batch_sizes=(8,), calibration_data=calib,
                ram_budget_mb=1e-6, measure_memory=False)


@pytest.mark.parametrize("optimizer, options, keras_optimizer", [
    ("adam", {}, lambda: keras.optimizers.Adam(learning_rate=0.01)),
    ("sgd", {"momentum": 0.9, "weight_decay": 0.1},
     lambda: keras.optimizers.SGD(learning_rate=0.01, momentum=0.9, weight_decay=0.1)),
])
def test_optimizer_steps_match_keras(tmp_path, optimizer, options, keras_optimizer):
    """Three steps on LiteRT equal three Keras optimizer steps on the GradientTape gradients."""
    model = every_layer_1d()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 24, 3)).astype(np.float32)
    y = rng.integers(0, 3, 4).astype(np.int32)
    manifest = convert(model, tmp_path, train_last=weighted_count(model), compression="none", batch_sizes=(4,),
                       optimizer=optimizer, learning_rate=0.01, measure_memory=False, **options)
    interpreter = Interpreter(model_path=str(tmp_path / MODEL_FILE))
    train = interpreter.get_signature_runner("train")
    for _ in range(3):
        train(x=x, y=y)
    device = interpreter.get_signature_runner("get_weights")()
    opt = keras_optimizer()
    for _ in range(3):
        grads = reference_gradients(model, x, y)
        opt.apply([grads[tuple(v.path.split("/")[-2:])] for v in model.trainable_variables],
                  model.trainable_variables)
    for spec in (w for w in manifest.weights if w.trainable):
        keras_value = model.get_layer(spec.layer).get_weights()[0 if "kernel" in spec.role else 1]
        np.testing.assert_allclose(device[spec.name], keras_value, rtol=1e-4, atol=1e-6, err_msg=spec.name)
    assert device["optimizer__step"] == 3.0


def test_cli_convert_inspect_and_export_keras_round_trip(tmp_path, capsys):
    model = small_cnn()
    model.save(tmp_path / "model.keras")
    bundle = tmp_path / "bundle"
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).random((12, 8, 8, 1), dtype=np.float32))
    rc = main(["convert", str(tmp_path / "model.keras"), "--out", str(bundle), "--train-last", "2",
               "--compression", "hosvd", "--batch-size", "4,2", "--lr", "0.05", "--labels", "a,b,c",
               "--calibration-data", str(tmp_path / "calib.npz")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "c2" in out and "head" in out and "vanilla KiB" in out and "measured peak MiB" in out
    assert "none: peak MiB" in out
    manifest = load_manifest(bundle)
    assert [s.train for s in manifest.train_signatures] == ["train", "train_b2"]
    assert manifest.labels == ["a", "b", "c"]
    assert all(m.measured_peak_rss_bytes > m.measured_base_rss_bytes > 0 for m in manifest.memory_plan)
    assert all(m.vanilla_peak_rss_bytes > 0 and m.measured_anon_rss_bytes > 0 for m in manifest.memory_plan)
    assert not [op for op in manifest.op_census if "Flex" in op or op.startswith("CUSTOM")]

    assert main(["inspect", str(bundle)]) == 0
    assert "op census" in capsys.readouterr().out

    interpreter = Interpreter(model_path=str(bundle / MODEL_FILE))
    x = np.random.default_rng(0).random((4, 8, 8, 1), dtype=np.float32)
    for _ in range(3):
        interpreter.get_signature_runner("train")(x=x, y=np.array([0, 1, 2, 0], np.int32))
    weights = interpreter.get_signature_runner("get_weights")()
    np.savez(tmp_path / "trained.npz", **weights)
    assert main(["export-keras", str(bundle), str(tmp_path / "trained.npz"), "--out", str(tmp_path / "out.keras")]) == 0
    exported = keras.models.load_model(tmp_path / "out.keras")
    np.testing.assert_array_equal(exported.get_layer("c2").get_weights()[0], weights["c2__kernel"])
    infer = interpreter.get_signature_runner("infer")(x=x)["output"]
    np.testing.assert_allclose(exported(x).numpy(), infer, atol=1e-5)


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.keras"), "--out", str(tmp_path / "b"), "--train-last", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({"format_version": 99}))
    (tmp_path / "b" / "model.tflite").write_bytes(b"x")
    assert main(["inspect", str(tmp_path / "b")]) == 2
    assert "format_version must be one of [1, 2]" in capsys.readouterr().err


def planted_tucker(shape: tuple[int, ...], ranks: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A tensor of exactly multilinear rank ``ranks``: a Gaussian core times random orthonormal factors."""
    x = rng.standard_normal(ranks)
    for mode, (size, rank) in enumerate(zip(shape, ranks, strict=True)):
        factor, _ = np.linalg.qr(rng.standard_normal((size, rank)))
        x = np.moveaxis(np.tensordot(factor, np.moveaxis(x, mode, 0), axes=(1, 0)), 0, mode)
    return x.astype(np.float32)


def test_hosvd_recovers_planted_ranks_and_trains_exactly_on_them(tmp_path):
    """The first trainable conv saves the model input itself: on a batch of exact multilinear rank (3, 2, 3, 2)
    calibration finds those ranks, the static tensors hold them in less memory than the activation, and since
    nothing is lost the hosvd bundle's training steps equal the uncompressed bundle's."""
    def model() -> keras.Model:
        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 4))
        h = layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
        h = layers.GlobalAveragePooling2D()(h)
        return keras.Model(inp, layers.Dense(3, activation="softmax", name="head")(h))

    rng = np.random.default_rng(0)
    planted = (3, 2, 3, 2)
    x = planted_tucker((8, 8, 8, 4), planted, rng)
    y = rng.integers(0, 3, 8).astype(np.int32)
    weights = {}
    for method in ("none", "hosvd"):
        out = tmp_path / method
        manifest = convert(model(), out, train_last=2, compression=method, epsilon=0.99, batch_sizes=(8,),
                           learning_rate=0.5, calibration_data=x, measure_memory=False)
        interpreter = Interpreter(model_path=str(out / MODEL_FILE))
        before = interpreter.get_signature_runner("get_weights")()
        train = interpreter.get_signature_runner("train")
        for _ in range(3):
            train(x=x, y=y)
        weights[method] = interpreter.get_signature_runner("get_weights")()
    conv = next(i for i in manifest.layers if i.name == "conv")
    assert conv.compression == "hosvd"
    assert conv.calibrated_ranks == list(planted)
    assert all(p <= r <= n for p, r, n in zip(planted, conv.ranks, (8, 8, 8, 4), strict=True)), conv.ranks
    assert conv.saved_bytes_compressed < conv.saved_bytes_vanilla
    moved = np.abs(weights["none"]["conv__kernel"] - before["conv__kernel"]).max()
    for name, exact in weights["none"].items():
        np.testing.assert_allclose(weights["hosvd"][name], exact, rtol=0, atol=1e-5 * moved, err_msg=name)


def test_an_overlapping_max_pool_in_the_frozen_prefix_converts(tmp_path):
    """A 3×3/2 max pool in the frozen prefix needs no backward: the bundle infers what Keras does."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    h = layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    h = layers.MaxPooling2D(3, strides=2, padding="same", name="overlapping_pool")(h)
    h = layers.Conv2D(12, 3, padding="same", activation="relu", name="body")(h)
    h = layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, layers.Dense(3, activation="softmax", name="head")(h))
    calib = np.random.default_rng(0).random((16, 16, 16, 3), dtype=np.float32)
    manifest = convert(model, tmp_path, train_last=2, compression="hosvd", epsilon=0.8, batch_sizes=(8,),
                       calibration_data=calib, measure_memory=False)
    assert next(i.name for i in manifest.layers if i.trainable) == "body"
    _, infer = runner(tmp_path, "infer")
    np.testing.assert_allclose(infer(x=calib[:4])["output"], model(calib[:4]).numpy(), atol=1e-5)
