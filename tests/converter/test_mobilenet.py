"""A model at the paper's scale: MobileNetV2 (224², random weights), last 4 weighted layers, hosvd, batch 32,
calibrated on 32 random images.

Conversion time is a benchmark figure (README), not asserted here; this checks the result is right: builtin ops
only, the Keras weights and outputs, and per compressed layer the ε-ranks numpy finds on the same activations.
"""

from __future__ import annotations

import keras
import numpy as np
from ai_edge_litert.interpreter import Interpreter

from bench.archs import build_calibrated
from converter.convert import convert
from hosvd_contract import MODEL_FILE


def test_mobilenetv2_last4_hosvd_converts_with_builtins_and_keeps_the_weights(tmp_path):
    model, calibration = build_calibrated("mobilenetv2", 224, seed=0, calibration=32)
    # max_rank above every mode size: the static ranks follow the data, not the cap
    manifest = convert(model, tmp_path, train_last=4, compression="hosvd", epsilon=0.8, batch_sizes=(32,),
                       max_rank=1024, calibration_data=calibration, measure_memory=False)
    trained = [i.name for i in manifest.layers if i.trainable]
    assert trained == ["block_16_depthwise", "block_16_project", "Conv_1", "predictions"]
    assert not [op for op in manifest.op_census if "Flex" in op or op.startswith("CUSTOM")]
    compressed = {i.name: i for i in manifest.layers if i.compression == "hosvd"}
    assert list(compressed) == trained[:3]

    # the ε-ranks of each saved input, computed here from Keras' activations (σ² = eigenvalues of the Gram matrix)
    inputs = keras.Model(model.input, [model.get_layer(name).input for name in compressed])(calibration)
    for (name, info), act in zip(compressed.items(), inputs, strict=True):
        act = np.asarray(act, np.float64)
        expected = []
        for mode in range(4):
            unfolded = np.moveaxis(act, mode, 0).reshape(act.shape[mode], -1)
            sigma2 = np.linalg.eigvalsh(unfolded @ unfolded.T)[::-1]
            expected.append(int(np.argmax(np.cumsum(sigma2) / sigma2.sum() >= 0.8 - 1e-9)) + 1)
        assert info.calibrated_ranks == expected, name
        assert all(e <= r <= n for e, r, n in zip(expected, info.ranks, act.shape, strict=True)), (name, info.ranks)
        assert info.saved_bytes_compressed < info.saved_bytes_vanilla, name

    interpreter = Interpreter(model_path=str(tmp_path / MODEL_FILE), num_threads=2)
    weights = interpreter.get_signature_runner("get_weights")()
    np.testing.assert_array_equal(weights["Conv_1__kernel"], model.get_layer("Conv_1").get_weights()[0])
    x = np.random.default_rng(0).random((2, 224, 224, 3), dtype=np.float32)
    out = interpreter.get_signature_runner("infer")(x=x)["output"]
    np.testing.assert_allclose(out, model(x, training=False).numpy(), atol=1e-4)
