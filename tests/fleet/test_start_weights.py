"""The device side of a fleet round without Flower: a job that starts from given trainable weights, the daemon's
``fleet_round``/``install_fleet`` refusals, and installing the fleet's weights as the newest checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from device_app import checkpoint
from device_app.config import load_config
from device_app.jobs import TrainOptions, fleet_start_weights, install_fleet_weights, make_job, run_job, start_training
from device_app.store import Store
from fleet import weights
from hosvd_contract import BundleError, load_manifest
from tests.device.conftest import class_signal, toml_dumps


@pytest.fixture
def device(tmp_path: Path, imu_bundle: Path):
    state = tmp_path / "state"
    shutil.copytree(imu_bundle, state / "bundles" / imu_bundle.name)
    manifest = load_manifest(imu_bundle)
    rng = np.random.default_rng(0)
    store = Store(state / "store.sqlite", val_fraction=0.25)
    store.add_many([class_signal(k, 32, 3, rng) for k in range(3) for _ in range(12)],
                   [manifest.labels[k] for k in range(3) for _ in range(12)], "test")
    store.close()
    config = tmp_path / "device.toml"
    config.write_text(toml_dumps({"device": {"id": "d", "state_dir": str(state)}, "model": {"bundle": imu_bundle.name},
                                  "training": {"ram_ceiling_mb": 0, "steps": 4, "batch_size": 8}}))
    # ceiling 0: these jobs start from the pytest process, whose RSS (TensorFlow after the converter tests) is no
    # device's; the ceiling is tested in test_federation.py, where real nodes train
    return load_config(config), manifest


def evaluate(cfg, start: str | None = None) -> dict:
    """An evaluate job on the validation windows (from the newest checkpoint, or ``start`` over it)."""
    return run_job(make_job(cfg, "evaluate", next(cfg.bundles_dir.iterdir()), split="val", start_weights=start,
                            eval_batch=8))


def test_a_job_starts_from_the_given_trainable_weights_and_keeps_the_rest(device) -> None:
    cfg, manifest = device
    report = start_training(cfg, TrainOptions(steps=4)).wait()
    ckpt = checkpoint.read(checkpoint.bundle_dir(cfg.checkpoints_dir, manifest.sha256) / report["checkpoint"])
    # zero trainable weights: the evaluation of the start must change, the stored checkpoint must not
    zeros = {k: np.zeros_like(v) for k, v in weights.trainable(manifest, ckpt.weights).items()}
    weights.save_npz(fleet_start_weights(cfg), zeros)
    from_ckpt, from_zeros = evaluate(cfg), evaluate(cfg, str(fleet_start_weights(cfg)))
    assert from_zeros["loss"] == pytest.approx(np.log(len(manifest.labels)), rel=1e-4)  # uniform softmax
    assert from_ckpt["loss"] != pytest.approx(from_zeros["loss"])
    run = start_training(cfg, TrainOptions(steps=4, start_weights=str(fleet_start_weights(cfg)))).wait()
    assert run["status"] in ("ok", "rolled_back") and run["val_before"]["loss"] == pytest.approx(from_zeros["loss"])

    bad = dict(zeros, **{next(w.name for w in manifest.weights if not w.trainable): np.zeros(1)})
    weights.save_npz(fleet_start_weights(cfg), bad)
    failed = start_training(cfg, TrainOptions(steps=1, start_weights=str(fleet_start_weights(cfg)))).wait()
    assert failed["status"] == "error" and "not trainable weights of this bundle" in failed["error"]


def test_installing_the_fleet_weights_makes_them_the_newest_checkpoint(device) -> None:
    cfg, manifest = device
    weights.save_npz(fleet_start_weights(cfg), {w.name: np.ones(w.shape, np.float32)
                                                for w in manifest.weights if w.trainable})
    with pytest.raises(BundleError, match="take part in a round first"):
        install_fleet_weights(cfg, manifest)
    before = start_training(cfg, TrainOptions(steps=4)).wait()
    path = install_fleet_weights(cfg, manifest)
    installed = checkpoint.latest(path.parent)
    assert installed.path == path and installed.step == before["global_step"] + 1
    old = checkpoint.read(path.parent / before["checkpoint"])
    for w in manifest.weights:
        expected = np.ones(w.shape) if w.trainable else old.weights[w.name]
        np.testing.assert_array_equal(installed.weights[w.name], expected)
    weights.save_npz(fleet_start_weights(cfg), {"nope": np.zeros(2)})
    with pytest.raises(BundleError, match="not this bundle's trainable weights"):
        install_fleet_weights(cfg, manifest)
