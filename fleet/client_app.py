"""The ClientApp a SuperNode runs for one device: a fleet round is a training job like an MQTT ``train``.

Node config (``flower-supernode --node-config 'device-config="/etc/hosvd-edge/device.toml"'``): the device's
config file, which names its state directory (store, checkpoints, bundles), bundle and ``[training]`` settings;
optionally ``bundle="name"``, the bundle (inside the bundles directory) the fleet trains instead of ``[model]``'s.

On a ``train`` message the app writes the global trainable weights it received to
``<state_dir>/fleet/global.npz`` and takes the state directory's lock (so a round never runs beside a
``hosvd-device train`` or another round) to start :func:`device_app.jobs.start_training` from them: the same
bundle check, planner inside ``ram_ceiling_mb``, child process under the RSS watcher, and checkpoints. When the
device's daemon holds the lock, the round is a ``train`` request to the daemon instead (:mod:`fleet.daemon_link`):
the daemon runs it as its job (refusing while another runs) and it shows on MQTT with ``progress`` and ``report``.
It replies with the trained trainable weights only, the number of training windows and the run's metrics.
On an ``evaluate`` message it evaluates the received weights on the device's validation windows in a child; on
``query.install`` (after the last round) it makes them the device's newest checkpoint.
A failure (no data, no plan under the ceiling, the state directory busy) becomes Flower's error reply, which the
strategy counts as a failed node for that round.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from device_app import checkpoint
from device_app.bundle import resolve_bundle
from device_app.config import Config, load_config
from device_app.jobs import (
    TrainOptions,
    fleet_start_weights,
    install_fleet_weights,
    make_job,
    run_job,
    start_training,
)
from device_app.memory import rss_bytes
from device_app.statelock import StateDirBusy, StateLock
from fleet import daemon_link, weights
from hosvd_contract import load_manifest

log = logging.getLogger(__name__)
app = ClientApp()
LOCK_PURPOSE = "hosvd-fleet round"


def to_record(arrays: weights.Arrays) -> ArrayRecord:
    """An ``ArrayRecord`` of named numpy arrays."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def from_record(record: ArrayRecord) -> weights.Arrays:
    """Named numpy arrays out of an ``ArrayRecord``."""
    return {name: array.numpy() for name, array in record.items()}


def node_config(context: Context) -> Config:
    """The device's validated config from the node config's ``device-config`` path.

    Raises:
        ValueError: no ``device-config`` in the node config (the message says how to give one).
    """
    path = context.node_config.get("device-config")
    if not path:
        raise ValueError("this SuperNode has no node config 'device-config': start it with "
                         "--node-config 'device-config=\"/etc/hosvd-edge/device.toml\"'")
    return load_config(Path(str(path)))


@contextlib.contextmanager
def bare_main() -> Iterator[None]:
    """Start ``spawn`` children without this process's ``__main__``.

    A spawned child first re-imports its parent's ``__main__``; in a ClientApp that is Flower's ``flwr-clientapp``
    script, which imports all of Flower and adds about 100 MiB to every probe and training child (measured:
    148 MiB instead of 60 MiB). The children need only ``device_app``, so they get an empty ``__main__``.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class Round:
    """One message's work on one device: its config, bundle and the global weights it received.

    ``through_daemon``: the device's daemon holds the state directory, so the work is asked of the daemon over
    MQTT (:mod:`fleet.daemon_link`) instead of being started here.
    """

    def __init__(self, msg: Message, context: Context, through_daemon: bool = False) -> None:
        self.cfg = node_config(context)
        self.through_daemon = through_daemon
        self.config = msg.content.config_records.get("config", ConfigRecord())
        # the node config's bundle (fleet.toml `bundle`), else the device config's [model] bundle
        self.bundle_name = str(context.node_config.get("bundle") or self.cfg.model.bundle)
        self.bundle_path = resolve_bundle(self.cfg.bundles_dir, self.bundle_name)
        self.manifest = load_manifest(self.bundle_path)
        received = msg.content.array_records.get("arrays")
        if received is None:
            raise ValueError("the message carries no ArrayRecord 'arrays' (the global trainable weights)")
        self.arrays = weights.check(self.manifest, from_record(received), "the global weights received")
        self.start = weights.save_npz(fleet_start_weights(self.cfg), self.arrays)
        self.timeout = self.option("round-timeout", float, 3600.0)

    def option(self, key: str, cast: type, default: Any = None) -> Any:
        value = self.config.get(key)
        return default if value in (None, 0, "") else cast(value)

    def identity(self, status: str) -> ConfigRecord:
        return ConfigRecord({"device-id": self.cfg.device.id, "bundle-sha256": self.manifest.sha256,
                             "status": status})

    def train(self) -> RecordDict:
        options = TrainOptions(steps=self.option("local-steps", int), learning_rate=self.option("learning-rate", float),
                               batch_size=self.option("batch-size", int), start_weights=str(self.start),
                               transaction=f"fleet-round-{self.config.get('server-round', 0)}-{uuid.uuid4().hex[:8]}")
        if self.through_daemon:
            body = {"transaction": options.transaction, "fleet_round": True, "steps": options.steps,
                    "learning_rate": options.learning_rate, "batch_size": options.batch_size}
            report = daemon_link.request(self.cfg, "train", {k: v for k, v in body.items() if v is not None},
                                         self.timeout, report=True)
            if report.get("sha256") != self.manifest.sha256:
                raise RuntimeError(f"the daemon on {self.cfg.device.id} trained bundle {report.get('bundle')} "
                                   f"({str(report.get('sha256'))[:12]}…), not {self.bundle_name}: reload it")
        else:
            report = start_training(self.cfg, options, bundle_name=self.bundle_name,
                                    expected_sha256=self.manifest.sha256).wait()
        if report["status"] == "error":
            raise RuntimeError(f"training on {self.cfg.device.id} failed: {report['error']}")
        if report["status"] == "ok":
            ckpt_dir = checkpoint.bundle_dir(self.cfg.checkpoints_dir, self.manifest.sha256)
            trained = weights.trainable(self.manifest, checkpoint.read(ckpt_dir / report["checkpoint"]).weights)
        else:  # stopped early or rolled back: this node adds nothing new, so it returns the global weights
            log.warning("round ended %s (%s): replying with the global weights", report["status"], report["reason"])
            trained = self.arrays
        val, before = report.get("val_after") or {}, report.get("val_before") or {}
        metrics = MetricRecord({
            "num-examples": int(report["n_train"]),
            "train-loss": float(report["final_loss"] if report["final_loss"] is not None else np.nan),
            "val-accuracy": float(val.get("accuracy", np.nan)),
            "val-loss": float(val.get("loss", np.nan)),
            "global-val-accuracy": float(before.get("accuracy", np.nan)),  # the received model, before training
            "peak-rss-mb": float(report["peak_rss_mb"]),
            "watched-peak-rss-mb": float(report.get("watched_peak_rss_mb") or report["peak_rss_mb"]),
            "ram-ceiling-mb": float(report["ram_ceiling_mb"]),
            "steps": int(report["steps_done"]),
            "clientapp-rss-mb": round(rss_bytes() / 2**20, 1),
        })
        return RecordDict({"arrays": to_record(trained), "metrics": metrics,
                           "node": self.identity(report["status"])})

    def evaluate(self) -> RecordDict:
        if self.through_daemon:
            result = daemon_link.request(self.cfg, "evaluate", {"split": "val", "fleet_round": True}, self.timeout)
        else:
            ceiling = self.cfg.training.ram_ceiling_mb << 20
            limit = max(1, ceiling - rss_bytes()) if ceiling else 0
            job = make_job(self.cfg, "evaluate", self.bundle_path, split="val", start_weights=str(self.start),
                           eval_batch=self.manifest.default_batch_size, expected_sha256=self.manifest.sha256)
            result = run_job(job, limit, self.cfg.training.rss_poll_s)
        metrics = MetricRecord({"num-examples": int(result["n"]), "eval-loss": float(result["loss"]),
                                "eval-accuracy": float(result["accuracy"]),
                                "peak-rss-mb": float(result["peak_rss_mb"])})
        return RecordDict({"metrics": metrics, "node": self.identity("ok")})


    def install(self) -> RecordDict:
        if self.through_daemon:
            done = daemon_link.request(self.cfg, "install_fleet", {}, self.timeout)
            step = int(done["global_step"])
        else:
            step = int(install_fleet_weights(self.cfg, self.manifest).stem.split("-")[1])
        return RecordDict({"metrics": MetricRecord({"installed-step": step}), "node": self.identity("installed")})


def _handle(msg: Message, context: Context, work: str) -> Message:
    """Run ``work`` holding the state directory's lock, or through the daemon when the daemon holds it.

    Raises:
        StateDirBusy: another process than the daemon (``hosvd-device train``, another round) holds it.
    """
    cfg = node_config(context)
    lock = StateLock(cfg.state_dir, LOCK_PURPOSE)
    try:
        lock.acquire()
    except StateDirBusy:
        if not lock.holder().endswith(f"({daemon_link.DAEMON_PURPOSE})"):
            raise
        content = getattr(Round(msg, context, through_daemon=True), work)()
    else:
        try:
            with bare_main():
                content = getattr(Round(msg, context), work)()
        finally:
            lock.release()
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the device's bundle from the global weights on its own windows; reply with the trainable weights."""
    return _handle(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global weights on the device's validation windows; reply with loss and accuracy."""
    return _handle(msg, context, "evaluate")


@app.query("install")
def install(msg: Message, context: Context) -> Message:
    """Make the fleet's final global weights this device's newest checkpoint (personalisation continues from it)."""
    return _handle(msg, context, "install")
