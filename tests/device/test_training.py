"""Plan arithmetic, atomic checkpoints, and training runs on a real interpreter: loss goes down, a non-finite
loss and a validation drop both roll back, the local CLI run shows a progress bar."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import class_signal

from device_app import bundle as bundle_module
from device_app import checkpoint
from device_app.bundle import Bundle
from device_app.cli import main
from device_app.jobs import Job
from device_app.plan import MIB, PlanError, choose_plan, data_buffer_bytes
from device_app.store import Store
from device_app.training import run_training
from hosvd_contract import Manifest, MemoryPlanEntry


def _with_plan(manifest: Manifest, entries: list[MemoryPlanEntry]) -> Manifest:
    return dataclasses.replace(manifest, memory_plan=entries)


def _entry(batch: int, mode: str, peak_mb: int, base_mb: int = 50, micro: int = 2) -> MemoryPlanEntry:
    return MemoryPlanEntry(batch, mode, micro if mode == "streamed" else batch, 1, peak_mb * MIB, base_mb * MIB)


def test_plan_picks_the_largest_batch_that_fits(imu_manifest: Manifest) -> None:
    batches = sorted(s.batch_size for s in imu_manifest.train_signatures)
    small, big = batches[0], batches[-1]
    m = _with_plan(imu_manifest, [_entry(big, "whole", 150), _entry(big, "streamed", 90),
                                  _entry(small, "whole", 70)])
    # need = daemon 40 + child base 45 + evaluation + (peak - base) + data buffers + margin 10
    data_big = data_buffer_bytes(m, big, 1000)
    data_small = data_buffer_bytes(m, small, 1000)
    assert data_big - data_small == 4 * (big - small) * 4 * (32 * 3 + np.prod(m.features_shape))
    common = dict(daemon_bytes=40 * MIB, child_base_bytes=45 * MIB, margin_mb=10, max_windows=1000,
                  eval_bytes={"whole": 3 * MIB, "streamed": 1 * MIB})
    plan = choose_plan(m, ceiling_mb=400, **common)
    assert (plan.batch_size, plan.mode) == (big, "streamed")
    assert plan.need_bytes == (40 + 45 + 1 + 40 + 10) * MIB + data_big and plan.data_bytes == data_big
    plan = choose_plan(m, ceiling_mb=400, streamed_ok=False, **common)
    assert (plan.batch_size, plan.mode) == (big, "whole")
    assert plan.need_bytes == (40 + 45 + 3 + 100 + 10) * MIB + data_big and plan.eval_bytes == 3 * MIB
    plan = choose_plan(m, ceiling_mb=125, streamed_ok=False, **common)
    assert (plan.batch_size, plan.mode) == (small, "whole") and plan.child_limit_bytes == 85 * MIB
    # the data buffers grow with max_samples (the store's bound), never with what is stored now
    assert data_buffer_bytes(m, big, 10_000) - data_big == 9000 * 28
    with pytest.raises(PlanError) as info:
        choose_plan(m, ceiling_mb=100, **common)
    message = str(info.value)
    assert "no training plan fits ram_ceiling_mb = 100" in message
    assert f"batch {big} streamed (micro-batch 2): {(136 * MIB + data_big) / MIB:.1f} MiB" in message
    assert f"batch {small} whole: {(118 * MIB + data_small) / MIB:.1f} MiB" in message
    with pytest.raises(PlanError, match="batch_size 3 is not in the bundle"):
        choose_plan(m, ceiling_mb=0, daemon_bytes=0, child_base_bytes=0, batch_size=3)


def test_checkpoints_are_atomic_pruned_and_skip_unreadable(tmp_path: Path) -> None:
    w = {"k": np.arange(6, dtype=np.float32).reshape(2, 3), "lr": np.float32(0.1)}
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, step, {k: v + step for k, v in w.items()}, {"loss": 1.0 / step}, keep=3)
    assert [s for s, _ in checkpoint.listing(tmp_path)] == [40, 30, 20]
    (tmp_path / "ckpt-000000040.npz").write_bytes(b"PK\x03\x04 torn")  # a torn newest file
    newest = checkpoint.latest(tmp_path, {"k", "lr"})
    assert newest is not None and newest.step == 30 and newest.meta["loss"] == pytest.approx(1 / 30)
    np.testing.assert_array_equal(newest.weights["k"], w["k"] + 30)
    assert checkpoint.latest(tmp_path, {"other"}) is None
    assert checkpoint.discard_latest(tmp_path).name.startswith("ckpt-000000040.npz.")
    assert checkpoint.listing(tmp_path)[0][0] == 30
    (tmp_path / ".ckpt-000000050.npz.999999999.tmp").write_bytes(b"partial")
    assert [p.name for p in checkpoint.remove_stale_temp(tmp_path)] == [".ckpt-000000050.npz.999999999.tmp"]


def _fill(store: Store, manifest: Manifest, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    length, channels = manifest.input.shape
    for k, label in enumerate(manifest.labels):
        data = class_signal(k, length * per_class, channels, rng)
        for i in range(per_class):
            store.add(data[i * length:(i + 1) * length], label, "test")


def _job(tmp_path: Path, bundle: Path, manifest: Manifest, steps: int, **kw: object) -> Job:
    plan = choose_plan(manifest, ceiling_mb=0, daemon_bytes=0, child_base_bytes=0, streamed_ok=False)
    return Job("train", str(bundle), str(tmp_path / "s.sqlite"), str(tmp_path / "ck"), threads=1, plan=plan,
               steps=steps, checkpoint_every=10, progress_every=5, **kw)


def test_training_lowers_the_loss_and_checkpoints(tmp_path: Path, imu_bundle: Path, imu_manifest: Manifest) -> None:
    store = Store(tmp_path / "s.sqlite", val_fraction=0.25)
    _fill(store, imu_manifest, 16)
    events: list[dict] = []
    bundle = Bundle(imu_bundle, 1)
    result = run_training(bundle, store, _job(tmp_path, imu_bundle, imu_manifest, 30, learning_rate=0.05),
                          events.append, threading.Event(), lambda: 1)
    assert result["status"] == "ok" and result["steps_done"] == 30 and result["global_step"] == 30
    assert result["final_loss"] < result["first_loss"]
    assert [e["step"] for e in events] == [1, 5, 10, 15, 20, 25, 30]
    assert [s for s, _ in checkpoint.listing(tmp_path / "ck" / imu_manifest.sha256[:16])] == [30, 20, 10]


def test_windows_deleted_during_a_run_are_replaced_not_fatal(tmp_path: Path, imu_bundle: Path,
                                                            imu_manifest: Manifest) -> None:
    from device_app.dataset import BatchReader

    store = Store(tmp_path / "s.sqlite", val_fraction=0.25)
    _fill(store, imu_manifest, 8)
    train = store.split_index("train", imu_manifest.labels)
    gone = [int(i) for i in train.ids[:3]]
    with sqlite3.connect(tmp_path / "s.sqlite") as db:  # what retention does while the daemon collects
        db.execute(f"DELETE FROM samples WHERE id IN ({','.join(map(str, gone))})")
    reader = BatchReader(Bundle(imu_bundle, 1), store, from_features=True, micro_batch=1, cache=True)
    loss, _ = reader.train_step(train.ids[:8], train.y[:8], "streamed")
    assert np.isfinite(loss) and reader.vanished == 3
    assert reader.evaluate(train, 8)["n"] == len(train) - 3
    with pytest.raises(LookupError, match="is stored any more"):
        reader.train_step(np.array(gone * 3)[:8], train.y[:8], "streamed")


def test_non_finite_loss_restores_the_last_good_weights(tmp_path: Path, imu_bundle: Path,
                                                        imu_manifest: Manifest) -> None:
    store = Store(tmp_path / "s.sqlite", val_fraction=0.25)
    _fill(store, imu_manifest, 8)
    bundle = Bundle(imu_bundle, 1)
    first = run_training(bundle, store, _job(tmp_path, imu_bundle, imu_manifest, 10, learning_rate=0.05),
                         lambda e: None, threading.Event(), lambda: 1)
    assert first["status"] == "ok" and first["global_step"] == 10
    good = bundle.get_weights()
    # a learning rate of NaN makes the next step's weights, and so the loss after it, NaN
    result = run_training(bundle, store, _job(tmp_path, imu_bundle, imu_manifest, 50,
                                              learning_rate=float("nan")),
                          lambda e: None, threading.Event(), lambda: 1)
    assert result["status"] == "rolled_back" and "non-finite" in result["reason"]
    assert result["global_step"] == 10
    after = bundle.get_weights()
    lr = bundle.learning_rate_name()
    assert all(np.array_equal(good[k], after[k]) for k in good if k != lr)


def test_validation_drop_rolls_the_run_back(tmp_path: Path, imu_bundle: Path, imu_manifest: Manifest) -> None:
    store = Store(tmp_path / "s.sqlite", val_fraction=0.25)
    _fill(store, imu_manifest, 16)
    bundle = Bundle(imu_bundle, 1)
    good = run_training(bundle, store, _job(tmp_path, imu_bundle, imu_manifest, 60, learning_rate=0.05),
                        lambda e: None, threading.Event(), lambda: 1)
    assert good["status"] == "ok" and good["val_after"]["accuracy"] >= 0.45
    with sqlite3.connect(tmp_path / "s.sqlite") as db:  # poison the training split: everything is class 0
        db.execute("UPDATE samples SET label = ? WHERE split = 'train'", [imu_manifest.labels[0]])
    bad = run_training(Bundle(imu_bundle, 1), store,
                       _job(tmp_path, imu_bundle, imu_manifest, 60, learning_rate=0.05, rollback_tolerance=0.1),
                       lambda e: None, threading.Event(), lambda: 1)
    assert bad["status"] == "rolled_back" and "validation accuracy fell" in bad["reason"]
    assert bad["val_after"]["accuracy"] < bad["val_before"]["accuracy"] - 0.1
    assert bad["global_step"] == 60  # the run's checkpoints were discarded
    restored = checkpoint.latest(tmp_path / "ck" / imu_manifest.sha256[:16])
    assert restored is not None and restored.step == 60


def test_train_step_casts_labels_and_names_a_wrong_window_shape(imu_bundle: Path, imu_manifest: Manifest) -> None:
    from device_app.bundle import InputError

    batch = imu_manifest.default_batch_size
    x = class_signal(0, 32 * batch, 3, np.random.default_rng(0)).reshape(batch, 32, 3)
    y = np.arange(batch) % 3
    as_int32 = Bundle(imu_bundle, 1).train_step(x, y.astype(np.int32))
    assert Bundle(imu_bundle, 1).train_step(x, y.astype(np.int64)) == as_int32  # int64 labels cast, same step
    assert Bundle(imu_bundle, 1).train_step(x, y.astype(np.float64)) == as_int32  # whole-number floats too
    bundle = Bundle(imu_bundle, 1)
    with pytest.raises(InputError, match=r"windows of shape \[32\] \(batch \[8, 32\]\), the bundle's input shape "
                                         r"is \[32, 3\]"):
        bundle.train_step(x[..., 0], y)  # the channel axis is missing
    with pytest.raises(InputError, match="labels must be class indices"):
        bundle.train_step(x, y + 0.5)
    with pytest.raises(InputError, match=r"\[32, 3\]"):
        bundle.evaluate(x[:, :16], y)


def test_local_train_cli_shows_progress(tmp_path: Path, imu_bundle: Path, imu_manifest: Manifest,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import toml_dumps, write_csvs

    state = tmp_path / "state"
    (state / "bundles").mkdir(parents=True)
    shutil.copytree(imu_bundle, state / "bundles" / "imu")
    csv_dir = write_csvs(tmp_path / "csv", imu_manifest, 8)
    config = tmp_path / "device.toml"
    config.write_text(toml_dumps({
        "device": {"id": "local", "state_dir": str(state)}, "model": {"bundle": "imu", "threads": 1},
        "training": {"steps": 20, "learning_rate": 0.05},
        "sources": [{"type": "csv", "path": str(csv_dir), "pacing": "fast"}],
    }))
    assert main(["train", "--config", str(config), "--collect-seconds", "10"]) == 0
    captured = capsys.readouterr()
    assert "20/20" in captured.err and "loss=" in captured.err
    assert captured.out.startswith("ok: 20 steps, loss ")
    assert "checkpoint ckpt-000000020.npz" in captured.out
    assert main(["train", "--config", str(config), "--steps", "5"]) == 0
    assert "checkpoint ckpt-000000025.npz" in capsys.readouterr().out


@pytest.mark.parametrize("steps", [2, 40])
def test_a_streamed_run_caches_its_windows_features_before_the_first_step(tmp_path: Path, imu_bundle: Path,
                                                                           imu_manifest: Manifest,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           steps: int) -> None:
    """The prefix runs (on its own interpreter) only before the first train step: a short run for the batches it
    draws, a long one for the whole training split, plus validation either way; the steps then read the cache."""
    store = Store(tmp_path / "s.sqlite", val_fraction=0.25)
    _fill(store, imu_manifest, 16)
    train, val = store.split_index("train", imu_manifest.labels), store.split_index("val", imu_manifest.labels)
    bundle = Bundle(imu_bundle, 1, "streamed")
    plan = choose_plan(imu_manifest, ceiling_mb=0, daemon_bytes=0, child_base_bytes=0, streamed_ok=True)
    assert plan.mode == "streamed"
    calls: list[str] = []
    real_step, real_prefix = Bundle.train_step, Bundle.prefix
    monkeypatch.setattr(Bundle, "train_step", lambda self, *a, **k: calls.append("step") or real_step(self, *a, **k))
    monkeypatch.setattr(Bundle, "prefix", lambda self, *a, **k: calls.append("prefix") or real_prefix(self, *a, **k))
    job = Job("train", str(imu_bundle), str(tmp_path / "s.sqlite"), str(tmp_path / "ck"), threads=1, plan=plan,
              steps=steps, checkpoint_every=100, feature_cache=True)
    result = run_training(bundle, store, job, lambda e: None, threading.Event(), lambda: 1)
    assert result["status"] == "ok" and result["steps_done"] == steps
    assert calls.count("prefix") == 1 and calls.index("prefix") < calls.index("step"), calls
    whole_split = steps * plan.batch_size >= len(train)
    assert (result["features_computed"] == len(train) + len(val)) == whole_split, result["features_computed"]
    assert result["features_cached"] > 0


def test_a_streamed_run_pushes_a_few_windows_at_a_time_through_the_prefix(tmp_path: Path, imu_bundle: Path,
                                                                          imu_manifest: Manifest,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefetch reads and pushes :meth:`Bundle.prefix_chunk` windows at a time (a multiple of the
    micro-batch within ``PREFIX_CHUNK_BYTES``), not a whole batch: the batch of raw 224² images was the largest
    thing alive while the prefix ran."""
    store = Store(tmp_path / "s.sqlite", val_fraction=0.25)
    _fill(store, imu_manifest, 16)
    bundle = Bundle(imu_bundle, 1, "streamed")
    plan = choose_plan(imu_manifest, ceiling_mb=0, daemon_bytes=0, child_base_bytes=0, streamed_ok=True)
    window = 4 * int(np.prod(imu_manifest.input.shape))
    monkeypatch.setattr(bundle_module, "PREFIX_CHUNK_BYTES", 3 * plan.micro_batch * window + window // 2)
    assert bundle.prefix_chunk(plan.micro_batch) == 3 * plan.micro_batch < plan.batch_size
    monkeypatch.setattr(bundle_module, "PREFIX_CHUNK_BYTES", 1)  # one micro-batch is the least
    assert bundle.prefix_chunk(plan.micro_batch) == plan.micro_batch
    monkeypatch.setattr(bundle_module, "PREFIX_CHUNK_BYTES", 3 * plan.micro_batch * window)
    sizes: list[int] = []
    real_prefix = Bundle.prefix

    @contextmanager
    def recording(self: Bundle, micro_batch: int):
        with real_prefix(self, micro_batch) as run:
            yield lambda x: sizes.append(len(x)) or run(x)

    monkeypatch.setattr(Bundle, "prefix", recording)
    job = Job("train", str(imu_bundle), str(tmp_path / "s.sqlite"), str(tmp_path / "ck"), threads=1, plan=plan,
              steps=40, checkpoint_every=100, feature_cache=True)
    result = run_training(bundle, store, job, lambda e: None, threading.Event(), lambda: 1)
    assert result["status"] == "ok"
    assert sum(sizes) == result["features_computed"] > 3 * plan.micro_batch
    assert max(sizes) == 3 * plan.micro_batch, sizes
