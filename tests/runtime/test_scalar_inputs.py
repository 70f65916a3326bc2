"""Older (format 1) bundles had 0-d set_weights inputs: refused on aarch64 ai-edge-litert, which crashes on them."""

from __future__ import annotations

import pytest

from device_app.runtime import check_signature_inputs, load_interpreter, scalar_inputs
from hosvd_contract import BundleError
from tests.runtime.format1 import write_scalar_input_model


@pytest.fixture(scope="module")
def scalar_model(tmp_path_factory):
    """A model with one 0-d signature input, as format-1 bundles had (``optimizer__learning_rate``)."""
    return write_scalar_input_model(tmp_path_factory.mktemp("old") / "model.tflite")


@pytest.mark.needs_tf
def test_0d_inputs_are_refused_only_on_aarch64_ai_edge_litert(scalar_model):
    interpreter = load_interpreter(scalar_model)
    assert scalar_inputs(interpreter) == ["serving_default/optimizer__learning_rate"]
    with pytest.raises(BundleError, match=r"0-d.*convert the model again"):
        check_signature_inputs(interpreter, "old", runtime="ai-edge-litert 2.3.0", machine="aarch64")
    check_signature_inputs(interpreter, "old", runtime="ai-edge-litert 2.3.0", machine="x86_64")
    check_signature_inputs(interpreter, "old", runtime="tflite-runtime 2.14.0", machine="aarch64")


def test_a_current_bundle_has_no_0d_input(imu_bundle):
    assert scalar_inputs(load_interpreter(imu_bundle / "model.tflite")) == []
