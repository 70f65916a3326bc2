"""Gradient fidelity: one ``train`` step on ai-edge-litert moves every trainable weight exactly as the same SGD
step computed with ``tf.GradientTape`` on the Keras model (the independent reference)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from converter import ops
from converter.compression import Method
from converter.compression.hosvd import Hosvd
from converter.compression.svd import BatchSvd
from converter.convert import convert
from converter.engine import CompressionSettings, TrainingModule, saved_shape
from converter.export import to_tflite
from converter.graph import parse_model, split
from converter.losses import Loss
from converter.optimizers import OptimizerConfig, OptimizerName
from hosvd_contract import MODEL_FILE
from tests.converter.models import every_layer_1d, every_layer_2d, weighted_count, zero_padded_2d

LR = 1.0  # large, so the weight delta is far above float32 rounding of the weights themselves
BATCH = 4
TOLERANCE = {"none": 1e-4, "svd": 1e-3, "hosvd": 1e-3}
_KERAS_ROLE = {"depthwise_kernel": "kernel"}


def reference_gradients(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    with tf.GradientTape() as tape:
        probs = model(x, training=False)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, probs))
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    return {tuple(v.path.split("/")[-2:]): g.numpy() for v, g in zip(variables, grads, strict=True)}


def full_rank_bundle(model: keras.Model, out, method: str) -> list:
    """A bundle whose every conv saves its input factored at full rank, ε = 1: the Tucker algebra of the weight
    gradients with nothing lost. ``convert()`` itself would save these layers uncompressed (a full-rank Tucker
    form allocates more than the activation), so the compressors are set here, on the engine directly.

    Returns:
        The bundle's weight specs.
    """
    graph = parse_model(model)
    settings = CompressionSettings(method=Method(method), epsilon=1.0, iters=2)
    module = TrainingModule(graph, split(graph, weighted_count(model)), Loss.CROSSENTROPY,
                            OptimizerConfig(name=OptimizerName.SGD, learning_rate=LR), settings, [BATCH])
    cls = {"svd": BatchSvd, "hosvd": Hosvd}[method]
    for node in module.split.trainable:
        key = f"{node.name}@{BATCH}"
        if key in module.compressors:
            shape = saved_shape(node, BATCH)
            ranks = [size if (m in cls.modes and size > 1) else None for m, size in enumerate(shape)]
            # hosvd cold: warm-start bases would be variables the module does not track, and change nothing at ε 1
            module.compressors[key] = cls(shape, 1.0, ranks, 2, **({"warm": False} if cls is Hosvd else {}))
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(to_tflite(module))
    return module.weight_specs


def tflite_step(bundle, x: np.ndarray, y: np.ndarray) -> tuple[dict, dict, float]:
    interpreter = Interpreter(model_path=str(bundle / MODEL_FILE))
    before = interpreter.get_signature_runner("get_weights")()
    loss = float(interpreter.get_signature_runner("train")(x=x, y=y)["loss"])
    after = interpreter.get_signature_runner("get_weights")()
    return before, after, loss


@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "sliced"])
@pytest.mark.parametrize("builder", [every_layer_2d, every_layer_1d, zero_padded_2d], ids=["2d", "1d", "padded"])
@pytest.mark.parametrize("method", ["none", "svd", "hosvd"])
def test_train_step_matches_gradient_tape(tmp_path, monkeypatch, builder, method, sliced):
    """``sliced``: every chunked computation (Grams and their products, projections, masks) runs on
    1 KiB slices, so the slices' sums are checked too (at these sizes they otherwise run whole)."""
    if sliced:
        monkeypatch.setattr(ops, "CHUNK_BYTES", 1 << 10)
    model = builder()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((BATCH, *model.input_shape[1:])).astype(np.float32)
    y = rng.integers(0, model.output_shape[-1], BATCH).astype(np.int32)
    if method == "none":
        weight_specs = convert(model, tmp_path, train_last=weighted_count(model), compression=method,
                               batch_sizes=(BATCH,), learning_rate=LR, measure_memory=False).weights
    else:
        weight_specs = full_rank_bundle(model, tmp_path, method)
    before, after, loss = tflite_step(tmp_path, x, y)
    reference = reference_gradients(model, x, y)

    probs = model(x, training=False).numpy()
    assert loss == pytest.approx(float(np.mean(-np.log(probs[np.arange(BATCH), y]))), rel=1e-5)
    trained = [w for w in weight_specs if w.trainable]
    weighted = {k: v for k, v in reference.items() if not k[0].startswith("bn")}  # BatchNorm stays frozen
    assert len(trained) == len(weighted), "every weighted layer's Keras weight is a bundle weight"
    for spec in trained:
        keras_value = model.get_layer(spec.layer).get_weights()[0 if "kernel" in spec.role else 1]
        np.testing.assert_array_equal(before[spec.name], keras_value, err_msg=f"{spec.name} initial value")
        step = (before[spec.name] - after[spec.name]) / LR
        ref = reference[(spec.layer, _KERAS_ROLE.get(spec.role, spec.role))]
        rel = np.linalg.norm(step - ref) / np.linalg.norm(ref)
        assert rel <= TOLERANCE[method], f"{spec.name}: relative error {rel:.2e} > {TOLERANCE[method]:.0e}"


def test_hosvd_below_one_compresses_and_stays_close(tmp_path):
    """At ε = 0.8 the step is an approximation: still a descent direction, not the exact gradient."""
    model = every_layer_2d()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((BATCH, 21, 21, 3)).astype(np.float32)
    y = rng.integers(0, 4, BATCH).astype(np.int32)
    convert(model, tmp_path, train_last=weighted_count(model), compression="hosvd", epsilon=0.8,
            batch_sizes=(BATCH,), learning_rate=LR, max_rank=32, measure_memory=False,
            calibration_data=rng.standard_normal((4 * BATCH, 21, 21, 3)).astype(np.float32))
    before, after, _ = tflite_step(tmp_path, x, y)
    reference = reference_gradients(model, x, y)
    name = "conv_1x1__kernel"
    step = (before[name] - after[name]) / LR
    ref = reference[("conv_1x1", "kernel")]
    cosine = float(np.sum(step * ref) / (np.linalg.norm(step) * np.linalg.norm(ref)))
    assert 0.5 < cosine < 0.99999, f"cosine {cosine}: compressed gradient should be close but not exact"


def test_zero_padding_read_by_one_convolution_is_part_of_its_padding():
    graph = parse_model(zero_padded_2d())
    kinds = {n.name: n for n in graph.nodes}
    assert "pad_s2" not in kinds and "pad_same" not in kinds and "pad_shared" in kinds
    depthwise, same = kinds["depthwise_s2"], kinds["conv_padded_same"]
    assert depthwise.in_shapes == [(12, 12, 8)] and depthwise.config["pads"] == ((0, 1), (0, 1))
    assert depthwise.config["out_hw"] == (6, 6)
    assert same.in_shapes == [(6, 6, 8)] and same.config["pads"] == ((3, 2), (2, 3))  # its own 1 + the layer's
    assert kinds["conv_after_shared"].in_shapes == [(11, 11, 6)]


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("kernel", [1, 2, 3, 5])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_strided_input_gradients_are_the_tapes(stride, kernel, padding):
    """The input gradient of a depthwise and of a one-tap convolution, strided per phase
    (``ops.input_grad_via_correlation``), is the tape's on odd and even sizes, including the phases that no tap
    reaches (kernel smaller than the stride) and a 'same' padding that differs before and after."""
    from converter.layers import conv2d, depthwise

    rng = np.random.default_rng(stride * 10 + kernel)
    for h, w in ((7, 8), (14, 15)):
        x = tf.constant(rng.standard_normal((2, h, w, 3)), tf.float32)
        pads = tuple(ops.same_pads(n, kernel, stride, 1) if padding == "same" else (0, 0) for n in (h, w))
        cfg = {"in_hw": (h, w), "pads": pads, "kernel_hw": (kernel, kernel), "strides": (stride, stride),
               "dilation": (1, 1)}
        cases = [(depthwise.input_grad, rng.standard_normal((kernel, kernel, 3, 2)),
                  lambda t, k: tf.nn.depthwise_conv2d(t, k, [1, stride, stride, 1], "VALID"))]
        if kernel == 1:
            cases.append((conv2d.input_grad, rng.standard_normal((1, 1, 3, 4)),
                          lambda t, k: tf.nn.conv2d(t, k, stride, "VALID")))
        for input_grad, kernel_value, forward in cases:
            k = tf.constant(kernel_value, tf.float32)
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = forward(ops.pad_hw(x, pads), k)
            dy = tf.constant(rng.standard_normal(y.shape), tf.float32)
            expected = tape.gradient(y, x, dy).numpy()
            got = input_grad(dy, k, cfg).numpy()
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
            assert np.abs(expected).max() > 0.5  # not a zero gradient matching a zero result
