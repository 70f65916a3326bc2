"""The device runtime delegates only what a process runs: renamed subgraphs still run (on the builtin kernels) and
give the same numbers; the prefix's interpreter is gone when ``features`` returns."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from device_app import runtime
from device_app.bundle import Bundle, mode_signatures
from device_app.measure import sample_batch
from device_app.runtime import delegate_only, load_interpreter
from hosvd_contract import BundleError, Sig


def _subgraph_names(model: bytes) -> dict[str, str]:
    """signature key -> name of its subgraph, read with the same flatbuffer helpers."""
    root = runtime._u32(model, 0)
    names = _all_subgraph_names(model)
    keyed = {}
    for sig in runtime._tables(model, runtime._field(model, root, runtime._MODEL_SIGNATURE_DEFS)):
        key = runtime._string(model, runtime._field(model, sig, runtime._SIGNATURE_KEY)).decode()
        index_at = runtime._field(model, sig, runtime._SIGNATURE_SUBGRAPH_INDEX)
        keyed[key] = names[runtime._u32(model, index_at) if index_at is not None else 0]
    return keyed


def _all_subgraph_names(model: bytes) -> list[str]:
    root = runtime._u32(model, 0)
    return [runtime._string(model, runtime._field(model, graph, runtime._SUBGRAPH_NAME)).decode()
            for graph in runtime._tables(model, runtime._field(model, root, runtime._MODEL_SUBGRAPHS))]


def test_only_the_kept_signatures_stay_delegable(imu_bundle):
    """The kept signatures' own subgraphs keep their names; every other one, the loop bodies the kept ones call
    included, is renamed so XNNPACK leaves it alone."""
    model = (imu_bundle / "model.tflite").read_bytes()
    manifest = Bundle(imu_bundle, 1).manifest
    keep = {manifest.train_signatures[0].train_features, Sig.GET_WEIGHTS}
    patched = delegate_only(model, keep)
    before, after = _subgraph_names(model), _subgraph_names(patched)
    assert set(after) == set(before) and len(after) > len(keep)
    for key, name in after.items():
        assert name == (before[key] if key in keep else "VALIDATION:" + before[key]), (key, name)
    everything = _all_subgraph_names(patched)
    bodies = [n for n in _all_subgraph_names(model) if n not in before.values()]
    assert bodies  # the hosvd bundle's Gram–Schmidt loops
    assert {n for n in everything if not n.startswith("VALIDATION:")} == {before[key] for key in keep}
    assert sorted(everything) == sorted(
        n if n in {before[key] for key in keep} else "VALIDATION:" + n for n in _all_subgraph_names(model))
    assert delegate_only(patched, keep) == patched  # already renamed: unchanged
    with pytest.raises(BundleError, match="TFL3"):
        delegate_only(b"\0" * 64, keep)


def test_a_subgraph_left_undelegated_computes_the_same(imu_bundle):
    """A renamed signature, and a kept one whose loop bodies were renamed (hosvd's train step), give the numbers
    of the interpreter that delegates everything."""
    manifest = Bundle(imu_bundle, 1).manifest
    x, y = sample_batch(manifest, 8, np.random.default_rng(0))
    plain = load_interpreter(imu_bundle / "model.tflite", 1).get_signature_runner(Sig.INFER)(x=x)
    only_features = load_interpreter(imu_bundle / "model.tflite", 1, {Sig.FEATURES})
    renamed = only_features.get_signature_runner(Sig.INFER)(x=x)
    for key in plain:
        np.testing.assert_allclose(renamed[key], plain[key], rtol=1e-5, atol=1e-6)
    train = next(s for s in manifest.train_signatures if s.batch_size == 8).train
    steps = []
    for interpreter in (load_interpreter(imu_bundle / "model.tflite", 1),
                        load_interpreter(imu_bundle / "model.tflite", 1, {train, Sig.GET_WEIGHTS})):
        loss = interpreter.get_signature_runner(train)(x=x, y=y)["loss"]
        steps.append((float(np.ravel(loss)[0]), interpreter.get_signature_runner(Sig.GET_WEIGHTS)()))
    assert steps[0][0] == pytest.approx(steps[1][0], rel=1e-5)
    for key, value in steps[0][1].items():
        np.testing.assert_allclose(steps[1][1][key], value, rtol=1e-4, atol=1e-5)


def test_plan_modes_name_their_signatures(imu_bundle):
    manifest = Bundle(imu_bundle, 1).manifest
    assert set(mode_signatures(manifest, "streamed")) >= {Sig.EVALUATE_FEATURES, Sig.GET_WEIGHTS, Sig.SET_WEIGHTS}
    assert Sig.FEATURES not in mode_signatures(manifest, "streamed")
    assert Sig.EVALUATE in mode_signatures(manifest, "whole")
    with pytest.raises(ValueError, match="plan mode"):
        mode_signatures(manifest, "bogus")


def test_features_run_on_an_interpreter_that_is_freed(imu_bundle, monkeypatch):
    bundle = Bundle(imu_bundle, 1, "streamed")
    made = []
    real = runtime.load_interpreter

    def spy(*args, **kwargs):
        interpreter = real(*args, **kwargs)
        made.append(weakref.ref(interpreter))
        return interpreter

    monkeypatch.setattr("device_app.bundle.load_interpreter", spy)
    x, y = sample_batch(bundle.manifest, 8, np.random.default_rng(1))
    features = bundle.features(x, 1)
    gc.collect()
    assert len(made) == 1 and made[0]() is None, "the prefix interpreter outlived features()"
    loss, _ = bundle.train_step(features, y, from_features=True)
    assert np.isfinite(loss)
