"""Identical loop subgraphs are shared (``converter.subgraphs``): fewer subgraphs, every WHILE pointing at the
one copy of its shapes, and the same results on the device runtime."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from tensorflow.lite.python import schema_py_generated as schema

from converter.subgraphs import share_identical_subgraphs
from tests.converter.builtin import convert_builtin


def normalised_columns(y: tf.Tensor) -> tf.Tensor:
    """A WHILE over the columns of ``y``: a cond and a body subgraph per call, of ``y``'s shape."""
    def body(j: tf.Tensor, q: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        pick = tf.reshape(tf.one_hot(j, y.shape[1]), [y.shape[1], 1])
        v = tf.matmul(y, pick)
        return j + 1, q + tf.matmul(v / tf.sqrt(tf.reduce_sum(v * v)), pick, transpose_b=True)

    return tf.while_loop(lambda j, q: j < y.shape[1], body, (tf.constant(0), tf.zeros_like(y)),
                         maximum_iterations=y.shape[1])[1]


@tf.function(input_signature=[tf.TensorSpec((6, 3), tf.float32)], autograph=False)
def three_loops(x):
    # two loops of one shape, one of another
    return {"a": normalised_columns(x), "b": normalised_columns(tf.abs(x) + 1.0),
            "c": normalised_columns(tf.concat([x, x], axis=1))}


def run(model: bytes, x: np.ndarray) -> list[np.ndarray]:
    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def while_targets(model: bytes) -> list[tuple[int, int]]:
    parsed = schema.ModelT.InitFromPackedBuf(model, 0)
    return [(op.builtinOptions.condSubgraphIndex, op.builtinOptions.bodySubgraphIndex)
            for sub in parsed.subgraphs for op in sub.operators
            if op.builtinOptionsType == schema.BuiltinOptions.WhileOptions]


def test_identical_loops_share_one_cond_and_body_and_compute_the_same():
    original = convert_builtin(three_loops)
    shared = share_identical_subgraphs(original)
    count = lambda m: schema.Model.GetRootAs(m, 0).SubgraphsLength()  # noqa: E731
    assert count(original) == 7  # main + 3 × (cond, body)
    assert count(shared) == 5  # main + the (6, 3) pair + the (6, 6) pair
    targets = while_targets(shared)
    assert len(targets) == 3 and len(set(targets)) == 2
    assert all(0 < i < 5 for pair in targets for i in pair)
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    for got, want in zip(run(shared, x), run(original, x), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(np.linalg.norm(run(shared, x)[0], axis=0), 1.0, rtol=1e-5)


def test_a_model_without_repeats_is_returned_unchanged():
    @tf.function(input_signature=[tf.TensorSpec((6, 3), tf.float32)], autograph=False)
    def one_loop(x):
        return {"a": normalised_columns(x)}

    model = convert_builtin(one_loop)
    assert share_identical_subgraphs(model) == model
