"""Run a ``tf.function`` the way a bundle runs: converted with TFLite builtins only, on ai-edge-litert."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter


def convert_builtin(fn: tf.types.experimental.GenericFunction) -> bytes:
    """``fn`` (with an ``input_signature``) converted with ``TFLITE_BUILTINS`` only: the flatbuffer."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


def run_builtin(fn: tf.types.experimental.GenericFunction, x: np.ndarray) -> list[np.ndarray]:
    """``fn`` (one input) converted by :func:`convert_builtin` and invoked on ``x``: its outputs, in the
    interpreter's output order."""
    interpreter = Interpreter(model_content=convert_builtin(fn))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
