"""Fleet learning against the real engine: a Flower SuperLink and three SuperNodes as processes on localhost,
each node a device with its own state directory and a different user's real digits (``conftest.py``)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np

from device_app import checkpoint
from device_app.bundle import Bundle
from device_app.config import load_config
from fleet import weights
from hosvd_contract import load_manifest
from tests.device.conftest import Broker, Client, wait_until
from tests.fleet.conftest import RAM_CEILING_MB, Federation, FleetData, write_device

ROUNDS = 3
LOCAL_STEPS = 25


def accuracy(bundle: Bundle, full: weights.Arrays, data: FleetData) -> list[float]:
    """Accuracy of the model ``full`` on each user's held-out windows."""
    bundle.set_weights(full)
    return [bundle.evaluate(u.holdout.x, u.holdout.y)["accuracy"] for u in data.users]


def train_alone(root: Path, bundle_dir: Path, data: FleetData, steps: int) -> dict[str, weights.Arrays]:
    """Each device training by itself from the factory weights for ``steps`` steps: ``hosvd-device train`` on a
    fresh copy of its state directory (the same planner, ceiling and child)."""
    trained = {}
    for user in data.users:
        config = write_device(root, user.name, bundle_dir, user, steps)
        done = subprocess.run([sys.executable, "-m", "device_app", "train", "--config", str(config), "--steps",
                               str(steps)], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        cfg = load_config(config)
        newest = checkpoint.latest(checkpoint.bundle_dir(cfg.checkpoints_dir, load_manifest(bundle_dir).sha256))
        assert newest is not None and newest.step == steps
        trained[user.name] = newest.weights
    return trained


def test_three_devices_learn_one_model_without_sharing_windows(
        federation: Federation, fleet_data: FleetData, fleet_bundle: Path, tmp_path: Path, broker: Broker) -> None:
    """anna's daemon runs (so her rounds go through it and show on MQTT); ben and chen have none."""
    for user in fleet_data.users:
        config = write_device(tmp_path / "devices", user.name, fleet_bundle, user, LOCAL_STEPS, broker.port)
        if user.name == "anna":
            mqtt = Client(broker.port, "hosvd-edge/anna")
            federation.start_daemon("anna", config)
            mqtt.wait("status", lambda p: isinstance(p, dict) and p.get("state") == "idle", timeout=90)
        # ben's fleet.toml names the bundle (the same one) instead of leaving it to his device config
        bundle = fleet_bundle.name if user.name == "ben" else None
        federation.start_node(user.name, federation.node_config(user.name, config, bundle))
    out = tmp_path / "out"
    federation.run(fleet_bundle, out, timeout=300, rounds=ROUNDS, min_nodes=3, local_steps=LOCAL_STEPS)
    assert federation.procs["anna-daemon"].proc.poll() is None  # the daemon kept running beside the rounds
    mqtt.wait("report", lambda p: str(p.get("transaction")).startswith(f"fleet-round-{ROUNDS}-"), timeout=30)
    reports = [r for r in mqtt.all("report") if str(r.get("transaction")).startswith("fleet-round-")]
    assert [(r["transaction"].split("-")[2], r["status"], r["steps_done"]) for r in reports] == [
        (str(r), "ok", LOCAL_STEPS) for r in range(1, ROUNDS + 1)]
    assert all(r["peak_rss_mb"] <= RAM_CEILING_MB for r in reports)
    progress = [p for p in mqtt.all("progress") if str(p.get("transaction")).startswith("fleet-round-")]
    assert {p["transaction"] for p in progress} == {r["transaction"] for r in reports}
    assert max(p["step"] for p in progress) == LOCAL_STEPS
    mqtt.close()

    manifest = load_manifest(fleet_bundle)
    trainable = {name: {"shape": shape, "dtype": dtype} for name, (shape, dtype) in
                 weights.trainable_specs(manifest).items()}
    assert 0 < len(trainable) < len(manifest.weights)  # optimizer slots and a frozen prefix exist, and stayed home
    received = json.loads((out / "received.json").read_text())
    train = [e for e in received if e["phase"] == "train"]
    assert [e for e in received if "error" in e] == []
    assert sorted((e["round"], e["device_id"]) for e in train) == sorted(
        (r, u.name) for r in range(1, ROUNDS + 1) for u in fleet_data.users)
    for entry in train:
        assert entry["arrays"] == {"arrays": trainable}, entry["device_id"]  # nothing but the trainable weights
        payload = weights.nbytes({k: np.zeros(v["shape"], v["dtype"]) for k, v in trainable.items()})
        assert payload <= entry["bytes"] <= payload + 256 * len(trainable)  # the arrays and their .npy headers
        m = entry["metrics"]
        assert m["num-examples"] > 0 and m["steps"] == LOCAL_STEPS
        assert m["ram-ceiling-mb"] == RAM_CEILING_MB
        assert 0 < m["peak-rss-mb"] <= RAM_CEILING_MB and m["watched-peak-rss-mb"] <= RAM_CEILING_MB
    rows = json.loads((out / "rounds.json").read_text())
    assert {(r["round"], r["device_id"]) for r in rows if r["phase"] == "evaluate"} == {
        (r, u.name) for r in range(1, ROUNDS + 1) for u in fleet_data.users}
    assert (out / "rounds.csv").read_text().startswith("round,device_id,phase,")
    assert (out / "rounds.png").stat().st_size > 10_000

    newest = checkpoint.listing(out / "checkpoints")
    assert [step for step, _ in newest] == list(range(ROUNDS, 0, -1))
    final = checkpoint.read(newest[0][1])
    assert set(final.weights) == {w.name for w in manifest.weights}  # a whole device checkpoint

    # the final global weights went back to every device as its newest checkpoint (anna's through her daemon)
    assert json.loads((out / "result.json").read_text())["installed_on"] == sorted(u.name for u in fleet_data.users)
    for user in fleet_data.users:
        device = load_config(tmp_path / "devices" / f"{user.name}.toml")
        mine = checkpoint.latest(checkpoint.bundle_dir(device.checkpoints_dir, manifest.sha256))
        assert mine is not None and mine.step == ROUNDS * LOCAL_STEPS + 1 and mine.meta["source"] == "fleet"
        for name in trainable:
            np.testing.assert_array_equal(mine.weights[name], final.weights[name])

    bundle = Bundle(fleet_bundle, num_threads=1)
    initial = bundle.get_weights()
    factory = accuracy(bundle, initial, fleet_data)
    fleet = accuracy(bundle, final.weights, fleet_data)
    alone = {name: accuracy(bundle, w, fleet_data)
             for name, w in train_alone(tmp_path / "alone", fleet_bundle, fleet_data, ROUNDS * LOCAL_STEPS).items()}
    own = [alone[u.name][i] for i, u in enumerate(fleet_data.users)]
    print(f"held-out accuracy per device {[u.name for u in fleet_data.users]}: factory {np.round(factory, 3)}, "
          f"fleet {np.round(fleet, 3)}, alone (each on all) {({k: np.round(v, 3).tolist() for k, v in alone.items()})}"
          f", alone on own {np.round(own, 3)}")
    assert np.mean(fleet) >= np.mean(factory) + 0.05
    assert np.mean(fleet) >= np.mean([np.mean(v) for v in alone.values()])


def _store_state(db: Path) -> tuple[str, list[tuple]]:
    with sqlite3.connect(db) as conn:
        return (conn.execute("PRAGMA integrity_check").fetchone()[0],
                conn.execute("SELECT id, label, split, length(x) FROM samples ORDER BY id").fetchall())


def test_a_node_killed_mid_round_does_not_stop_the_federation_and_rejoins(
        federation: Federation, fleet_data: FleetData, fleet_bundle: Path, tmp_path: Path) -> None:
    """Two rounds of FedAdam, min nodes 2; chen is SIGKILLed when round 1 reaches it and started again."""
    configs = {}
    for user in fleet_data.users:
        configs[user.name] = write_device(tmp_path / "devices", user.name, fleet_bundle, user, LOCAL_STEPS)
        federation.start_node(user.name, federation.node_config(user.name, configs[user.name]))
    victim = load_config(configs["chen"])
    store_before = _store_state(victim.db_path)
    out = tmp_path / "out"
    run = federation.start_run(fleet_bundle, out, rounds=2, min_nodes=2, local_steps=LOCAL_STEPS, strategy="fedadam",
                               fraction_evaluate=0, round_timeout=45)
    started = victim.state_dir / "fleet" / "global.npz"  # written when a round reaches the node, before training
    wait_until(started.exists, timeout=120, what="round 1 reaching chen", detail=federation.logs)
    killed = federation.procs["chen"].kill()
    assert len(killed) >= 2  # the SuperNode and the ClientApp it started (and a training child if one ran)
    assert _store_state(victim.db_path) == store_before  # SIGKILL mid-round: the store is whole and unchanged
    ckpt_dir = checkpoint.bundle_dir(victim.checkpoints_dir, load_manifest(fleet_bundle).sha256)
    for _, path in checkpoint.listing(ckpt_dir):
        checkpoint.read(path)  # every checkpoint left reads back completely
    federation.start_node("chen", federation.node_config("chen-again", configs["chen"]))
    federation.finish(run, timeout=240)

    received = [e for e in json.loads((out / "received.json").read_text()) if e["phase"] == "train"]
    ok = {(e["round"], e["device_id"]) for e in received if "error" not in e}
    assert {(1, "anna"), (1, "ben"), (2, "anna"), (2, "ben")} <= ok
    assert (1, "chen") not in ok  # killed before it could reply
    assert (2, "chen") in ok  # back for the next round, on the same store and checkpoints
    assert [step for step, _ in checkpoint.listing(out / "checkpoints")] == [2, 1]
    # FedAdam (server-side Adam on the averaged update) moved the global model, to finite values
    assert json.loads((out / "result.json").read_text())["strategy"] == "fedadam"
    first, last = (checkpoint.read(p).weights for _, p in sorted(checkpoint.listing(out / "checkpoints")))
    names = weights.trainable_specs(load_manifest(fleet_bundle))
    assert all(np.isfinite(last[k]).all() for k in names)
    assert any(not np.array_equal(first[k], last[k]) for k in names)
    assert _store_state(victim.db_path) == store_before
    newest = checkpoint.latest(ckpt_dir)
    assert newest is not None and newest.meta["bundle_sha256"] == load_manifest(fleet_bundle).sha256
