"""A model shaped like format-1 bundles: a 0-d signature input (``optimizer__learning_rate``). Needs TensorFlow."""

from __future__ import annotations

from pathlib import Path


def write_scalar_input_model(path: Path) -> Path:
    """Convert a one-signature model whose only input has shape ``[]`` and write it to ``path``."""
    import tensorflow as tf

    class Module(tf.Module):
        def __init__(self):
            super().__init__()
            self.lr = tf.Variable(0.01)

        @tf.function(input_signature=[tf.TensorSpec([], tf.float32, name="optimizer__learning_rate")])
        def set_weights(self, lr):
            self.lr.assign(lr)
            return {"ok": tf.constant(1, tf.int32)}

    module = Module()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.set_weights.get_concrete_function()], module)
    converter.experimental_enable_resource_variables = True
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(converter.convert())
    return path
