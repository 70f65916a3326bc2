"""Which kernels run the training step: every trainable-layer matmul and convolution that XNNPACK can run with a
variable weight must reach it (``bench.xnnpack`` reads the interpreter's delegated node list), the gradients of the
lowered ops still match ``tf.GradientTape``, and the op census counts MACs from the shapes."""

from __future__ import annotations

import json
from dataclasses import replace

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from bench import xnnpack
from bench.layers import CASES, COMPUTE_OPS, LayerCase, layer_model
from converter.convert import convert
from hosvd_contract import MODEL_FILE
from tests.converter.models import weighted_count
from tests.converter.test_gradients import reference_gradients, tflite_step

BATCH = 4
# XNNPACK takes these only with constant weights; a trainable layer must never leave one on the built-in kernels
# (DEPTHWISE_CONV_2D has no XNNPACK form with a variable filter: see converter/layers/depthwise.py).
REFUSED = ("CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED")


def mobilenet_like() -> keras.Model:
    """The layer types of MobileNetV2's trainable tail (1×1 expand/project, 3×3 depthwise with multiplier 1,
    frozen BN, ReLU6, Dense head) plus a 3×3 conv, strided 1×1 and depthwise layers."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((10, 10, 3))
    h = layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv3x3")(inp)
    h = layers.ReLU(6.0, name="relu6_a")(layers.BatchNormalization(name="bn_a")(h))
    h = layers.Conv2D(16, 1, use_bias=False, name="expand")(h)
    h = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="depthwise")(h)
    h = layers.ReLU(6.0, name="relu6_b")(h)
    h = layers.Conv2D(8, 1, strides=2, name="project_s2")(h)  # 10 -> 5
    h = layers.DepthwiseConv2D(3, strides=2, name="depthwise_s2")(h)  # 5 -> 2
    h = layers.Conv2D(12, 1, use_bias=False, name="conv_1")(h)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    out = layers.Dense(5, activation="softmax", name="head")(h)  # (4, 5): no square output like a Gram's
    return keras.Model(inp, out, name="mobilenet_like")


def _build(method: str, out) -> tuple[str, keras.Model, object]:
    """``none`` at learning rate 1 (the step is the gradient); ``hosvd`` and ``asi`` at ε 0.8 on calibration data, so
    their layers really are saved factored (at ε 1 the full-rank form is not smaller and is saved whole)."""
    model = mobilenet_like()
    calibration = np.random.default_rng(3).standard_normal((4 * BATCH, 10, 10, 3)).astype(np.float32)
    convert(model, out, train_last=weighted_count(model), compression=method, max_rank=32, subspace_iters=1,
            batch_sizes=(BATCH,), learning_rate=1.0, measure_memory=False,
            **({} if method == "none" else dict(epsilon=0.8, calibration_data=calibration)))
    return method, model, out


@pytest.fixture(scope="module", params=["none", "hosvd", "asi"])
def bundle(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory.mktemp(request.param))


def test_no_trainable_layer_op_falls_back_to_builtin_kernels(bundle):
    """``none``: no CONV_2D, TRANSPOSE_CONV or FULLY_CONNECTED on the built-in kernels in ``train_features`` or
    ``infer`` (a frozen layer's constant filter is delegated). ``hosvd``: the layers' convolutions neither; the
    compression's own small products (Gram matrices, subspace iteration, mode products: ``ops.mode_dot`` /
    ``ops.gram``) may stay FULLY_CONNECTED. DEPTHWISE_CONV_2D has no XNNPACK path with a variable filter."""
    method, _, path = bundle
    content = (path / MODEL_FILE).read_bytes()
    trained = [layer for layer in json.loads((path / "manifest.json").read_text())["layers"] if layer["trainable"]]
    assert method in {layer["compression"] for layer in trained}  # the compressed path is the one checked
    refused = REFUSED if method == "none" else ("CONV_2D", "TRANSPOSE_CONV")
    for signature in ("train_features", "infer"):
        found = xnnpack.placements(content, signature)
        matmuls = [p for p in found if p.op == "BATCH_MATMUL"]
        assert matmuls and all(p.delegated for p in matmuls), (method, signature)
        # the trained 3×3 conv runs as one BATCH_MATMUL per tap (ops.tap_chain_conv), in both signatures; it is
        # the first layer, so it has no input gradient
        assert not xnnpack.builtin_ops(found, refused), (signature, xnnpack.builtin_ops(found, refused))


@pytest.mark.parametrize("case", [c for c in CASES if c.keras_type != "DepthwiseConv2D"], ids=lambda c: c.name)
def test_benchmark_layers_run_on_xnnpack(case):
    """The layers ``bench.layers`` times that are lowered (MobileNetV2's trained 1×1 convs and head, a 3×3 Conv2D
    and a Conv1D, whose forward and input gradient are per-tap matmuls), at a small batch: every compute op of
    the training step is delegated. (A depthwise layer's DEPTHWISE_CONV_2D has no XNNPACK form with a variable
    filter.)"""
    content = layer_model(replace(case, batch=2))
    for signature in ("forward", "step"):
        found = xnnpack.placements(content, signature)
        assert not xnnpack.builtin_ops(found, COMPUTE_OPS), (signature, xnnpack.builtin_ops(found, COMPUTE_OPS))


def test_lowered_step_matches_gradient_tape(tmp_path):
    """The lowered products are the exact gradient (``none``: nothing compressed; the Tucker algebra of the
    compressed forms is checked at full rank in test_gradients.py)."""
    _, model, path = _build("none", tmp_path)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((BATCH, 10, 10, 3)).astype(np.float32)
    y = rng.integers(0, 4, BATCH).astype(np.int32)
    before, after, _ = tflite_step(path, x, y)
    reference = reference_gradients(model, x, y)
    checked = 0
    for (layer, role), ref in reference.items():
        if layer.startswith("bn"):
            continue
        name = f"{layer}__{'depthwise_kernel' if 'depthwise' in layer and role == 'kernel' else role}"
        step = before[name] - after[name]  # learning rate 1
        rel = np.linalg.norm(step - ref) / np.linalg.norm(ref)
        assert rel <= 1e-4, f"{name}: relative error {rel:.2e}"
        checked += 1
    assert checked == 10


def test_census_counts_macs_and_sees_variable_convolutions_on_builtin_kernels():
    case = LayerCase("c", "Conv2D", {"filters": 8, "kernel_size": 3, "padding": "same", "use_bias": False},
                     (6, 6, 4), batch=2)
    content = layer_model(case)
    forward_macs = 2 * 6 * 6 * 9 * 4 * 8
    assert sum(xnnpack.signature_macs(content, "forward").values()) == forward_macs
    assert sum(xnnpack.signature_macs(content, "reference").values()) == forward_macs
    # the weight gradient's 9 taps, each a (4, 8) matmul over the 72 positions (stacked: no multiply-adds), plus
    # the SGD update's MUL of (3, 3, 4, 8)
    wgrad = sum(xnnpack.signature_macs(content, "weights").values()) - forward_macs
    assert wgrad == 9 * 72 * 4 * 8 + 9 * 4 * 8
    reference = xnnpack.placements(content, "reference")
    assert [p.delegated for p in reference if p.op == "CONV_2D"] == [True]  # constant filter: XNNPACK

    holder = tf.Module()
    holder.k = tf.Variable(np.ones((3, 3, 4, 8), np.float32))

    def variable_conv(x):
        with tf.control_dependencies([holder.k.assign_add(tf.zeros_like(holder.k))]):
            return {"y": tf.nn.conv2d(x, holder.k, 1, "SAME")}

    fn = tf.function(variable_conv, input_signature=[tf.TensorSpec([2, 6, 6, 4], tf.float32, name="x")])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], holder)
    converter.experimental_enable_resource_variables = True
    found = xnnpack.placements(converter.convert(), "serving_default")
    assert [p.delegated for p in found if p.op == "CONV_2D"] == [False]  # variable filter: built-in kernel


def test_small_work_runs_in_a_loop_body_and_large_work_inline():
    """``ops.undelegated`` on (8, 4) tensors: the main subgraph holds a WHILE where ``fn``'s ops were (the device
    delegates no loop body), the body holds them (not hoisted out), and the outputs are ``fn``'s on the device
    runtime. Above ``UNDELEGATED_BYTES`` it is ``fn`` inline."""
    from tensorflow.lite.python import schema_py_generated as schema

    from converter import ops
    from tests.converter.builtin import convert_builtin, run_builtin

    def fn(a: tf.Tensor, b: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.sqrt(a * a + b), tf.reduce_sum(a * b, axis=0)

    def traced(shape: tuple[int, int]) -> tf.types.experimental.GenericFunction:
        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)], autograph=False)
        def f(x):
            a, b = ops.undelegated(fn, tf.nn.relu(x), tf.abs(x))
            return {"a": a, "b": b}
        return f

    def op_lists(shape: tuple[int, int]) -> list[list[str]]:
        model = schema.ModelT.InitFromPackedBuf(convert_builtin(traced(shape)), 0)
        names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        return [[names[model.operatorCodes[op.opcodeIndex].builtinCode] for op in sub.operators]
                for sub in model.subgraphs]

    x = np.random.default_rng(8).standard_normal((8, 4)).astype(np.float32)
    outputs = {o.shape: o for o in run_builtin(traced(x.shape), x)}
    a, b = np.maximum(x, 0), np.abs(x)
    np.testing.assert_allclose(outputs[(8, 4)], np.sqrt(a * a + b), rtol=1e-6)
    np.testing.assert_allclose(outputs[(4,)], (a * b).sum(axis=0), rtol=1e-6)
    main, *bodies = op_lists(x.shape)
    assert "WHILE" in main and "SQRT" not in main and "SUM" not in main
    assert any({"SQRT", "SUM", "MUL"} <= set(body) for body in bodies)
    main, *bodies = op_lists((64, 32))  # 8 KiB each
    assert "WHILE" not in main and {"SQRT", "SUM"} <= set(main)
