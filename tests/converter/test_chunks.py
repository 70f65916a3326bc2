"""The train graph's sliced forward-pass work (``converter.ops.serial_chunks``) computes what the whole-tensor
version computes, on the device runtime, and really runs in slices."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema

from converter import ops
from converter.compression.factored import project
from converter.compression.hosvd import Hosvd, implicit_gram
from converter.compression.ranks import unfolding
from converter.layers.base import pack_mask, pack_mask_by_rows
from tests.converter.builtin import convert_builtin, run_builtin

SHAPE = (8, 12, 10, 24)  # 92 KiB: 16 KiB slices make 6 along the batch, 10 along the height


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(ops, "CHUNK_BYTES", 16 << 10)


def relu_batch() -> np.ndarray:
    return np.maximum(np.random.default_rng(3).standard_normal(SHAPE), 0).astype(np.float32)


def test_chunk_bounds_cover_the_axis_in_bounded_slices(small_slices):
    parts = ops.chunk_bounds(10, 100 << 10)
    assert parts[0][0] == 0 and parts[-1][1] == 10
    assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
    assert len(parts) == 7  # ceil(100 / 16)
    assert ops.chunk_bounds(3, 100 << 10) == [(0, 1), (1, 2), (2, 3)]  # at most one slice per index
    assert ops.chunk_bounds(10, 1 << 10) == [(0, 10)]


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_sliced_gram_equals_the_unfolding_gram_on_litert(small_slices, mode):
    x = relu_batch()

    @tf.function(input_signature=[tf.TensorSpec(SHAPE, tf.float32)], autograph=False)
    def gram(t):
        return {"g": ops.gram(t, mode), "total": ops.trace(ops.gram(t, mode))}

    outputs = {o.shape: o for o in run_builtin(gram, x)}
    a = unfolding(x, mode)
    np.testing.assert_allclose(outputs[(SHAPE[mode], SHAPE[mode])], a @ a.T, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(outputs[()], float((x.astype(np.float64) ** 2).sum()), rtol=1e-5)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_sliced_gram_times_equals_the_gram_times_the_basis_on_litert(small_slices, mode):
    x = relu_batch()
    v = np.random.default_rng(6).standard_normal((SHAPE[mode], 3)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec(SHAPE, tf.float32)], autograph=False)
    def gram_times(t):
        return {"gv": ops.gram_times(t, mode, tf.constant(v))}

    a = unfolding(x, mode)
    np.testing.assert_allclose(run_builtin(gram_times, x)[0], a @ (a.T @ v), rtol=1e-4, atol=1e-3)


def test_wide_channel_modes_never_make_their_gram_matrix():
    """At 256 channels and rank 8 + 4 the channel mode multiplies by the unfolding twice (no 256 × 256 tensor
    in the graph); the batch mode (its Gram is cheaper than its products) and the spatial modes make theirs."""
    shape = (4, 5, 5, 256)
    assert implicit_gram(shape, 3, 12, 1) and not implicit_gram(shape, 0, 3, 3)
    assert not implicit_gram(shape, 1, 3, 1) and not implicit_gram((4, 5, 5, 24), 3, 12, 1)
    compressor = Hosvd(shape, 0.8, [3, 3, 3, 8], 1, oversample=4, warm=False)

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)], autograph=False)
    def compress(t):
        return {"core": compressor.compress(t).core}

    graph = schema.ModelT.InitFromPackedBuf(convert_builtin(compress), 0).subgraphs[0]
    shapes = {tuple(t.shape) for t in graph.tensors if t.shape is not None}
    assert (256, 256) not in shapes
    assert {(4, 4), (5, 5)} <= shapes


def test_sliced_projection_equals_the_whole_one():
    x = relu_batch()
    rng = np.random.default_rng(4)
    factors = (None, None, tf.constant(rng.standard_normal((SHAPE[2], 3)), tf.float32),
               tf.constant(rng.standard_normal((SHAPE[3], 5)), tf.float32))
    whole = project(tf.constant(x), factors).core.numpy()
    ops.CHUNK_BYTES, saved = 16 << 10, ops.CHUNK_BYTES
    try:
        sliced = project(tf.constant(x), factors).core.numpy()
    finally:
        ops.CHUNK_BYTES = saved
    assert sliced.shape == (8, 12, 3, 5)
    np.testing.assert_allclose(sliced, whole, rtol=1e-5, atol=1e-5)


def test_masks_packed_by_slices_are_the_whole_mask_packed(small_slices):
    x = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec(SHAPE, tf.float32)], autograph=False)
    def packed(t):
        return {"mask": pack_mask_by_rows([t], lambda part: part > 0, int(np.prod(SHAPE[1:])))}

    got = run_builtin(packed, x)[0]
    expected = pack_mask(tf.constant(x > 0)).numpy()
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_the_slices_are_gathers_chained_one_after_another(small_slices):
    """Six batch slices of the channel Gram: six GATHERs, each but the first reading indices computed from the
    running sum (an ADD of the sum's first element's zero), not six independent slices of the input."""
    @tf.function(input_signature=[tf.TensorSpec(SHAPE, tf.float32)], autograph=False)
    def gram(t):
        return {"g": ops.gram(t, 3)}

    model = schema.ModelT.InitFromPackedBuf(convert_builtin(gram), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    ops_run = [names[model.operatorCodes[op.opcodeIndex].builtinCode] for op in model.subgraphs[0].operators]
    assert ops_run.count("GATHER") == 6
    graph = model.subgraphs[0]
    constant = {i for i, t in enumerate(graph.tensors) if model.buffers[t.buffer].data is not None}
    gathers = [op for op, name in zip(graph.operators, ops_run, strict=True) if name == "GATHER"]
    assert sum(op.inputs[1] in constant for op in gathers) == 1  # only the first slice's indices are constant


def test_weight_gradient_products_are_summed_over_row_blocks_each_after_the_gradient(monkeypatch):
    """``aᵀb`` above ``MATMUL_CHUNK_BYTES`` (16 KiB here: 400 rows × 24 columns make 3 blocks) equals the whole
    product on the device runtime, and every block's rows, the first included, are a GATHER at indices computed
    from ``b`` or the running sum: none of ``a`` is taken before the gradient exists. Below it: one matmul."""
    x = np.random.default_rng(7).standard_normal((400, 24)).astype(np.float32)

    def product() -> tf.types.experimental.GenericFunction:
        # traced anew for each limit: a tf.function keeps the graph of its first trace
        @tf.function(input_signature=[tf.TensorSpec(x.shape, tf.float32)], autograph=False)
        def fn(t):
            return {"g": ops.matmul_tn(t[:, :10], tf.nn.relu(t[:, 10:]))}
        return fn

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    monkeypatch.setattr(ops, "MATMUL_CHUNK_BYTES", 1 << 20)
    whole = schema.ModelT.InitFromPackedBuf(convert_builtin(product()), 0)
    assert [names[whole.operatorCodes[op.opcodeIndex].builtinCode]
            for op in whole.subgraphs[0].operators].count("BATCH_MATMUL") == 1

    monkeypatch.setattr(ops, "MATMUL_CHUNK_BYTES", 16 << 10)
    np.testing.assert_allclose(run_builtin(product(), x)[0], x[:, :10].T @ np.maximum(x[:, 10:], 0),
                               rtol=1e-5, atol=1e-4)
    model = schema.ModelT.InitFromPackedBuf(convert_builtin(product()), 0)
    graph = model.subgraphs[0]
    run = [names[model.operatorCodes[op.opcodeIndex].builtinCode] for op in graph.operators]
    gathers = [op for op, name in zip(graph.operators, run, strict=True) if name == "GATHER"]
    constant = {i for i, t in enumerate(graph.tensors) if model.buffers[t.buffer].data is not None}
    assert run.count("BATCH_MATMUL") == 3 and len(gathers) == 6  # a and b, per block
    assert not any(op.inputs[1] in constant for op in gathers)
