"""The bundle contract's shape rules, read off converted models (not off the converter's own bookkeeping)."""

from __future__ import annotations

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from converter.convert import convert
from hosvd_contract import FORMAT_VERSION, MODEL_FILE, load_manifest
from tests.converter.test_convert import small_cnn


@pytest.mark.parametrize(("compression", "optimizer"), [("none", "adam"), ("svd", "sgd"), ("hosvd", "sgd"),
                                                         ("asi", "adam")])
def test_no_signature_has_a_0d_input(tmp_path, compression, optimizer):
    """ai-edge-litert on aarch64 segfaults resizing a 0-d input: every input of every signature has rank >= 1,
    and the scalar variables (learning rate, step) round-trip through set_weights/get_weights as shape [1]."""
    calib = np.random.default_rng(0).random((8, 8, 8, 1), dtype=np.float32)
    convert(small_cnn(), tmp_path, train_last=2, compression=compression, optimizer=optimizer, batch_sizes=(4, 2),
            calibration_data=calib, measure_memory=False)
    assert load_manifest(tmp_path).format_version == FORMAT_VERSION == 2
    interpreter = Interpreter(model_path=str(tmp_path / MODEL_FILE))
    signatures = interpreter.get_signature_list()
    assert {"set_weights", "train", "train_b2", "train_features"} <= set(signatures)
    ranks = {f"{key}/{name}": len(detail["shape"])
             for key in signatures
             for name, detail in interpreter.get_signature_runner(key).get_input_details().items()}
    assert ranks and min(ranks.values()) >= 1, {k: r for k, r in ranks.items() if r == 0}
    weights = interpreter.get_signature_runner("get_weights")()
    assert weights["optimizer__learning_rate"].shape == (1,)
    assert weights["optimizer__step"].shape == (1,)
    weights["optimizer__learning_rate"] = np.array([0.5], np.float32)
    interpreter.get_signature_runner("set_weights")(**weights)
    x = np.random.default_rng(1).random((4, 8, 8, 1), dtype=np.float32)
    interpreter.get_signature_runner("train")(x=x, y=np.array([0, 1, 2, 0], np.int32))
    after = interpreter.get_signature_runner("get_weights")()
    assert after["optimizer__learning_rate"].tolist() == [0.5]
    assert after["optimizer__step"].tolist() == [1.0]
