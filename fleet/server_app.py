"""The ServerApp on the workstation: Flower's FedAvg or FedAdam over the devices' trainable weights.

Run config (``[tool.flwr.app.config]`` of ``fleet/app/pyproject.toml``, or ``flwr run --run-config`` /
``hosvd-fleet run`` options): ``bundle`` (the bundle directory; the global model starts from its weights),
``rounds``, ``strategy`` (``fedavg`` or ``fedadam``), ``fraction-train``, ``fraction-evaluate`` (0: no federated
evaluation; each train reply still carries the received global model's validation accuracy), ``min-nodes``,
``local-steps``,
``learning-rate`` (0: each device's ``[training]`` setting), ``server-learning-rate`` (FedAdam's ``eta``),
``round-timeout`` (seconds a round waits for replies), ``install`` (after the last round, send the final global
weights to every connected node, which makes them its newest checkpoint) and ``out-dir``.

After every round ``out-dir`` gets the global model as a device checkpoint
(``checkpoints/ckpt-<round>.npz``: every variable of the bundle, its trainable ones the global weights, loadable
by ``hosvd-convert export-keras`` and by a device as its starting checkpoint), ``rounds.csv``/``rounds.json``
(per round and device: training loss, the global model's accuracy on the device's validation windows, peak RSS),
``received.json`` (the names, shapes and dtypes of every array a node sent, and its metric keys) and
``rounds.png``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg

from device_app import checkpoint
from device_app.bundle import Bundle
from fleet import weights
from fleet.client_app import from_record, to_record
from hosvd_contract import BundleError, Manifest

log = logging.getLogger(__name__)
app = ServerApp()
STRATEGIES = {"fedavg": FedAvg, "fedadam": FedAdam}


@dataclass(frozen=True)
class Settings:
    """A federation's settings, from the run config (keys with ``-`` for ``_``)."""

    bundle: str
    out_dir: str
    rounds: int = 3
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2
    local_steps: int = 0
    learning_rate: float = 0.0
    server_learning_rate: float = 0.1
    round_timeout: float = 600.0
    install: bool = True

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> Settings:
        """Parse and check the run config.

        Raises:
            ValueError: a missing bundle or out-dir, an unknown strategy, or a value out of range.
        """
        known = {f.name: f for f in fields(cls)}
        values = {k.replace("-", "_"): v for k, v in run_config.items() if k.replace("-", "_") in known}
        for name in ("bundle", "out_dir"):
            if not values.get(name):
                raise ValueError(f"run config {name.replace('_', '-')!r} is required (hosvd-fleet run "
                                 f"--{name.replace('_', '-')} ...)")
        try:
            typed = {k: str(v) if k in ("bundle", "out_dir", "strategy") else
                     _boolean(v) if k == "install" else type(known[k].default)(v) for k, v in values.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"run config has a value of the wrong type: {err}") from err
        settings = cls(**typed)
        if settings.strategy not in STRATEGIES:
            raise ValueError(f"strategy {settings.strategy!r} is not one of {sorted(STRATEGIES)}")
        if settings.rounds < 1 or settings.min_nodes < 1 or not 0 < settings.fraction_train <= 1 \
                or not 0 <= settings.fraction_evaluate <= 1:
            raise ValueError(f"need rounds >= 1, min-nodes >= 1, 0 < fraction-train <= 1 and 0 <= fraction-evaluate "
                             f"<= 1, got {settings}")
        return settings


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"install must be true or false, got {value!r}")


def push_final(grid: Grid, arrays: ArrayRecord, timeout: float) -> list[Message]:
    """Send the final global weights to every connected node as ``query.install``; return the replies."""
    messages = [Message(content=RecordDict({"arrays": arrays}), message_type="query.install", dst_node_id=node)
                for node in grid.get_node_ids()]
    return list(grid.send_and_receive(messages, timeout=timeout))


class Recorder:
    """Writes what each round received and produced into ``out_dir``."""

    def __init__(self, settings: Settings, manifest: Manifest, initial: weights.Arrays) -> None:
        self.out = Path(settings.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.manifest = manifest
        self.initial = initial
        self.received: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []
        (self.out / "settings.json").write_text(json.dumps(asdict(settings), indent=2))

    @staticmethod
    def _node(msg: Message) -> dict[str, Any]:
        node = msg.content.config_records.get("node", ConfigRecord())
        return {"node_id": int(msg.metadata.src_node_id), "device_id": str(node.get("device-id", "")),
                "status": str(node.get("status", ""))}

    def train_replies(self, server_round: int, replies: list[Message]) -> None:
        """Record every array and metric key a node sent this round (and who failed)."""
        for msg in replies:
            entry: dict[str, Any] = {"round": server_round, "phase": "train", "node_id": int(msg.metadata.src_node_id)}
            if msg.has_error():
                entry["error"] = msg.error.reason
            else:
                entry.update(self._node(msg))
                entry["arrays"] = {key: {name: {"shape": list(a.shape), "dtype": a.dtype}
                                         for name, a in rec.items()}
                                   for key, rec in msg.content.array_records.items()}
                entry["bytes"] = sum(len(a.data) for rec in msg.content.array_records.values() for a in rec.values())
                metrics = msg.content.metric_records.get("metrics", MetricRecord())
                entry["metrics"] = dict(metrics)
                self.rows.append({"round": server_round, "device_id": entry["device_id"], "phase": "train",
                                  **{k: metrics[k] for k in sorted(metrics)}})
            self.received.append(entry)
        self._write()

    def evaluate_replies(self, server_round: int, replies: list[Message]) -> None:
        """Record each device's accuracy of the new global model on its validation windows."""
        for msg in replies:
            if msg.has_error():
                self.received.append({"round": server_round, "phase": "evaluate",
                                      "node_id": int(msg.metadata.src_node_id), "error": msg.error.reason})
                continue
            metrics = msg.content.metric_records.get("metrics", MetricRecord())
            self.rows.append({"round": server_round, "device_id": self._node(msg)["device_id"], "phase": "evaluate",
                              **{k: metrics[k] for k in sorted(metrics)}})
        self._write()

    def installed(self, replies: list[Message]) -> list[str]:
        """Record the ``query.install`` replies; return the devices that installed the final weights."""
        done = []
        for msg in replies:
            entry: dict[str, Any] = {"round": self.settings.rounds, "phase": "install", **self._node(msg)} \
                if not msg.has_error() else {"round": self.settings.rounds, "phase": "install",
                                             "node_id": int(msg.metadata.src_node_id), "error": msg.error.reason}
            if not msg.has_error():
                entry["metrics"] = dict(msg.content.metric_records.get("metrics", MetricRecord()))
                done.append(entry["device_id"])
            self.received.append(entry)
        self._write()
        return sorted(done)

    def global_weights(self, server_round: int, arrays: ArrayRecord, nodes: int) -> Path:
        """Save the round's global model as a device checkpoint (every variable of the bundle)."""
        trained = weights.check(self.manifest, from_record(arrays), f"the global weights of round {server_round}")
        meta = {"bundle_sha256": self.manifest.sha256, "model_name": self.manifest.model_name,
                "round": server_round, "strategy": self.settings.strategy, "nodes": nodes, "time": time.time(),
                "loss": math.nan, "val": None}
        return checkpoint.save(self.out / "checkpoints", server_round, {**self.initial, **trained}, meta,
                               keep=self.settings.rounds + 1)

    def _write(self) -> None:
        (self.out / "received.json").write_text(json.dumps(self.received, indent=1))
        (self.out / "rounds.json").write_text(json.dumps(self.rows, indent=1))
        keys = sorted({k for row in self.rows for k in row} - {"round", "device_id", "phase"})
        with open(self.out / "rounds.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["round", "device_id", "phase", *keys])
            writer.writeheader()
            writer.writerows(self.rows)

    def plot(self) -> Path | None:
        """``rounds.png``: each device's global-model accuracy and training loss per round (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.warning("matplotlib is not installed: no rounds.png (the table is in rounds.csv)")
            return None
        fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 4))
        # the global model after round r (federated evaluation), else the one each node received in round r
        evaluated = any(r["phase"] == "evaluate" for r in self.rows)
        phase, key = ("evaluate", "eval-accuracy") if evaluated else ("train", "global-val-accuracy")
        for device in sorted({r["device_id"] for r in self.rows}):
            ev = [r for r in self.rows if r["device_id"] == device and r["phase"] == phase]
            tr = [r for r in self.rows if r["device_id"] == device and r["phase"] == "train"]
            acc.plot([r["round"] for r in ev], [r[key] for r in ev], marker="o", label=device)
            loss.plot([r["round"] for r in tr], [r["train-loss"] for r in tr], marker="o", label=device)
        acc.set(title="global model " + ("after" if evaluated else "received in") + " round: accuracy on "
                "each device's validation windows", xlabel="round", ylabel="accuracy")
        loss.set(title="local training loss", xlabel="round", ylabel="loss")
        acc.legend()
        fig.tight_layout()
        path = self.out / "rounds.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


class _Recording:
    """Mixed into a Flower strategy: hands every reply and each round's global weights to a :class:`Recorder`."""

    recorder: Recorder

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.recorder.train_replies(server_round, replies)
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:
            self.recorder.global_weights(server_round, arrays, sum(not m.has_error() for m in replies))
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.recorder.evaluate_replies(server_round, replies)
        return super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]


def make_strategy(settings: Settings, recorder: Recorder) -> FedAvg:
    """Flower's strategy ``settings.strategy`` with the recorder mixed in."""
    base = STRATEGIES[settings.strategy]
    kwargs: dict[str, Any] = dict(fraction_train=settings.fraction_train,
                                  fraction_evaluate=settings.fraction_evaluate,
                                  min_train_nodes=settings.min_nodes, min_evaluate_nodes=settings.min_nodes,
                                  min_available_nodes=settings.min_nodes)
    if base is FedAdam:
        kwargs["eta"] = settings.server_learning_rate
    strategy = type(f"Recording{base.__name__}", (_Recording, base), {})(**kwargs)
    strategy.recorder = recorder
    return strategy


def initial_weights(bundle_dir: str | Path) -> tuple[Manifest, weights.Arrays]:
    """The bundle's manifest and every variable as it ships (loads its interpreter once)."""
    bundle = Bundle(bundle_dir, num_threads=1)
    return bundle.manifest, bundle.get_weights()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation the run config describes and write its outputs."""
    settings = Settings.from_run_config(dict(context.run_config))
    manifest, initial = initial_weights(settings.bundle)
    if not weights.trainable_specs(manifest):
        raise BundleError(f"bundle {settings.bundle} has no trainable weights to federate")
    recorder = Recorder(settings, manifest, initial)
    strategy = make_strategy(settings, recorder)
    train_config = ConfigRecord({"local-steps": settings.local_steps, "learning-rate": settings.learning_rate,
                                 "round-timeout": settings.round_timeout})
    start = to_record(weights.trainable(manifest, initial))
    log.info("Federating %d trainable arrays (%d bytes) of %s for %d rounds with %s", len(start),
             weights.nbytes(weights.trainable(manifest, initial)), manifest.model_name, settings.rounds,
             settings.strategy)
    result = strategy.start(grid=grid, initial_arrays=start, num_rounds=settings.rounds,
                            timeout=settings.round_timeout, train_config=train_config,
                            evaluate_config=ConfigRecord({"round-timeout": settings.round_timeout}))
    installed = recorder.installed(push_final(grid, result.arrays, settings.round_timeout)) \
        if settings.install and len(result.arrays) else []
    saved = checkpoint.listing(recorder.out / "checkpoints")
    (recorder.out / "result.json").write_text(json.dumps({
        "rounds": settings.rounds, "rounds_aggregated": sorted(step for step, _ in saved),
        "strategy": settings.strategy, "final_checkpoint": str(saved[0][1]) if saved else None,
        "installed_on": installed,
        "trainable_bytes": weights.nbytes(weights.trainable(manifest, initial)),
        "train_metrics": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate_metrics": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()}}, indent=1,
        default=lambda v: float(v) if isinstance(v, np.floating) else str(v)))
    recorder.plot()
