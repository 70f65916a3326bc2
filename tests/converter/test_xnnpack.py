"""The measuring instruments of the step-speed work: ``bench.xnnpack`` tells which kernel (XNNPACK or built-in)
runs each op of a signature, from the interpreter's delegated node list, and its op census counts MACs from the
shapes (WHILE bodies times their trip count)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from bench import xnnpack
from bench.layers import LayerCase, layer_model


def test_census_counts_macs_and_sees_variable_convolutions_on_builtin_kernels():
    case = LayerCase("c", "Conv2D", {"filters": 8, "kernel_size": 3, "padding": "same", "use_bias": False},
                     (6, 6, 4), batch=2)
    content = layer_model(case)
    forward_macs = 2 * 6 * 6 * 9 * 4 * 8
    assert sum(xnnpack.signature_macs(content, "forward").values()) == forward_macs
    assert sum(xnnpack.signature_macs(content, "reference").values()) == forward_macs
    # the weight gradient's 9 taps run in a WHILE loop, whose body counts 9 times: a (4, 8) matmul over the 72
    # positions, and the MUL that places it in the (9, 4, 8) stack; plus the SGD update's MUL of (3, 3, 4, 8)
    wgrad = sum(xnnpack.signature_macs(content, "weights").values()) - forward_macs
    assert wgrad == 9 * (72 * 4 * 8 + 9 * 4 * 8) + 9 * 4 * 8
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
