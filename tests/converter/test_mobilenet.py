"""A model at the paper's scale: MobileNetV2 (224², random weights), last 4 weighted layers, hosvd, batch 32.

Conversion time is a benchmark figure (README), not asserted here; this checks the result is right.
"""

from __future__ import annotations

import keras
import numpy as np
from ai_edge_litert.interpreter import Interpreter

from converter.convert import convert
from hosvd_contract import MODEL_FILE


def test_mobilenetv2_last4_hosvd_converts_with_builtins_and_keeps_the_weights(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    manifest = convert(model, tmp_path, train_last=4, compression="hosvd", epsilon=0.8, batch_sizes=(32,),
                       measure_memory=False)
    trained = [i.name for i in manifest.layers if i.trainable]
    assert trained == ["block_16_depthwise", "block_16_project", "Conv_1", "predictions"]
    assert not [op for op in manifest.op_census if "Flex" in op or op.startswith("CUSTOM")]
    compressed = [i for i in manifest.layers if i.compression == "hosvd"]
    assert len(compressed) == 3
    assert all(i.saved_bytes_compressed < i.saved_bytes_vanilla / 4 for i in compressed)  # static ranks 32x7x7x32

    interpreter = Interpreter(model_path=str(tmp_path / MODEL_FILE), num_threads=2)
    weights = interpreter.get_signature_runner("get_weights")()
    np.testing.assert_array_equal(weights["Conv_1__kernel"], model.get_layer("Conv_1").get_weights()[0])
    x = np.random.default_rng(0).random((2, 224, 224, 3), dtype=np.float32)
    out = interpreter.get_signature_runner("infer")(x=x)["output"]
    np.testing.assert_allclose(out, model(x, training=False).numpy(), atol=1e-4)
