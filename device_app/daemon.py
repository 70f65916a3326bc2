"""The device daemon: wires config, store, sources, MQTT and training children, and answers requests.

Threads: paho's network thread only queues requests; one dispatcher thread validates and answers them in
order; each source has a thread (:mod:`device_app.collector`); a child job (train/evaluate/probe) runs from a
worker thread (:mod:`device_app.jobrunner`); the systemd watchdog has its own, and pings only while the main
loop goes round. The main thread publishes state changes until a signal, then runs the one shutdown path: stop
sources, stop the job, publish ``offline``, disconnect, close the store.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from device_app import checkpoint
from device_app.bundle import resolve_bundle
from device_app.collector import Collector
from device_app.config import Config
from device_app.homeassistant import Discovery
from device_app.jobrunner import Busy, JobRunner
from device_app.jobs import Job, JobKind
from device_app.mqtt_link import MqttLink
from device_app.plan import PlanError, choose_plan
from device_app.requests import (
    CollectRequest,
    EvaluateRequest,
    LabelRequest,
    ReloadRequest,
    Request,
    RequestError,
    TrainRequest,
    parse_request,
    transaction_of,
)
from device_app.snapshot import Snapshot
from device_app.sources.base import SourceContext
from device_app.store import Store
from device_app.systemd_notify import Notifier, start_watchdog_thread, watchdog_interval
from device_app.trainer import ChildError, run_job
from device_app.windowing import check_sources_fit
from hosvd_contract import BundleError, Manifest, load_manifest

log = logging.getLogger(__name__)
MAIN_LOOP_PERIOD_S = 0.5


class CommandError(RuntimeError):
    """A valid request that cannot be carried out now; the message goes back in the error response."""


class Deferred:
    """Returned by a handler whose response is sent later (when its child job ends)."""


DEFERRED = Deferred()


class Daemon:
    """The long-running service.

    Args:
        cfg: the validated configuration.
        notifier: systemd notifier (a no-op outside systemd).
    """

    def __init__(self, cfg: Config, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self.requests: queue.Queue[tuple[str, bytes, Any] | None] = queue.Queue(maxsize=100)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        cfg.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(cfg.db_path, cfg.store.max_samples, cfg.store.val_fraction)
        self.snapshot = Snapshot(cfg.state_dir)  # for `hosvd-device status`
        self.jobs = JobRunner(cfg.training.rss_poll_s, self.publish_status)
        self.link = MqttLink(cfg.mqtt, cfg.device.id, cfg.mqtt_password(), self.store, self._enqueue,
                             self._on_samples, self._on_connected)
        self.bundle_name = cfg.model.bundle
        self.bundle_path: Path | None = None
        self.manifest: Manifest | None = None
        self.bundle_error: str | None = None
        self.probe: dict[str, Any] = {}
        self.collector: Collector | None = None
        self.ready_sent = False
        self.heartbeat: float | None = None  # when the main loop last went round (None: not started yet)
        self.stuck_after_s = float("inf")
        self.published_state: str | None = None
        self.homeassistant = Discovery(cfg, self.link, self.publish_status) if cfg.homeassistant.enabled else None
        self.handlers = {
            "train": self.cmd_train, "stop": self.cmd_stop, "evaluate": self.cmd_evaluate,
            "status": self.cmd_status, "label": self.cmd_label, "collect": self.cmd_collect,
            "rollback": self.cmd_rollback, "reload": self.cmd_reload,
        }

    # --- bundle --------------------------------------------------------------------------------------------

    def load_bundle(self, name: str) -> None:
        """Validate bundle ``name``, probe it in a child, and switch to it (sources are rebuilt).

        Raises:
            BundleError: invalid bundle, or one whose input a configured source cannot feed.
            ChildError: the runtime cannot load the model.
        """
        path = resolve_bundle(self.cfg.bundles_dir, name)
        manifest = load_manifest(path)
        check_sources_fit(self.cfg.sources, manifest.input, name)
        probe = run_job(self._job("probe", path))
        if self.collector is not None:
            self.collector.stop()
        self.bundle_name, self.bundle_path, self.manifest, self.probe = name, path, manifest, probe
        self.bundle_error = None
        dropped = self.store.invalidate_features(manifest.sha256)
        ckpt_dir = checkpoint.bundle_dir(self.cfg.checkpoints_dir, manifest.sha256)
        for tmp in checkpoint.remove_stale_temp(ckpt_dir):
            log.warning("Removed %s, a checkpoint whose writing was interrupted", tmp.name)
        log.info("Loaded bundle %s (%s, sha256 %s…, %s; child base RSS %.1f MiB, checkpoint step %d; "
                 "%d stale cached features dropped)", name, manifest.model_name, manifest.sha256[:12],
                 probe.get("runtime", "?"), probe["base_rss"] / 2**20, probe["global_step"], dropped)
        self.collector = Collector(self.cfg.sources, SourceContext.for_input(manifest.input),
                                   manifest.input.shape[0], self.store, self.link.topic("samples"))

    def _job(self, kind: JobKind, path: Path | None = None, **kwargs: Any) -> Job:
        t = self.cfg.training
        return Job(kind=kind, bundle_dir=str(path or self.bundle_path), db_path=str(self.cfg.db_path),
                   checkpoints_root=str(self.cfg.checkpoints_dir), threads=self.cfg.model.threads,
                   checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
                   progress_every=t.progress_every, rollback_tolerance=t.rollback_tolerance,
                   feature_cache=self.cfg.store.feature_cache, seed=t.seed, **kwargs)

    def _need_bundle(self) -> Manifest:
        if self.manifest is None:
            raise CommandError(f"no bundle loaded ({self.bundle_error}); send reload with a valid bundle")
        return self.manifest

    # --- status --------------------------------------------------------------------------------------------

    def state(self) -> str:
        if self.jobs.kind == "train":
            return "training"
        if self.manifest is None:
            return "error"
        if self.collector is not None and self.collector.active():
            return "collecting"
        return "idle"

    def status(self) -> dict[str, Any]:
        m = self.manifest
        newest = checkpoint.listing(checkpoint.bundle_dir(self.cfg.checkpoints_dir, m.sha256)) if m else []
        return {
            "state": self.state(), "device_id": self.cfg.device.id, "bundle": self.bundle_name,
            "model_name": m.model_name if m else None, "sha256": m.sha256 if m else None,
            "labels": m.labels if m else [], "error": self.bundle_error,
            "global_step": newest[0][0] if newest else 0, "samples": self.store.counts(),
            "collecting": self.collector.active() if self.collector else [], "job": self.jobs.kind,
            "collect_label": self.collector.session.label if self.collector else None,
            "runtime": self.probe.get("runtime"), "ram_ceiling_mb": self.cfg.training.ram_ceiling_mb,
            "daemon_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1), "time": time.time(),
        }

    def publish_status(self) -> None:
        status = self.status()
        self.published_state = status["state"]
        if self.homeassistant is not None:  # the config first: Home Assistant then reads the states
            self.homeassistant.announce(status)
        self.link.set_status(status)
        self.snapshot.update(status=status)
        self.notifier.status(f"{status['state']}; bundle {self.bundle_name}; step {status['global_step']}; "
                             f"{status['samples']['total']} windows")

    # --- MQTT callbacks (network thread: queue only) -------------------------------------------------------

    def _enqueue(self, command: str, payload: bytes, props: Any) -> None:
        try:
            self.requests.put_nowait((command, payload, props))
        except queue.Full:
            log.warning("request queue full: dropped %s", command)

    def _on_samples(self, name: str, payload: bytes) -> None:
        if len(payload) > self.cfg.mqtt.max_payload_bytes:
            log.warning("samples for %s: %d bytes is over the limit; dropped", name, len(payload))
        elif self.collector is not None:
            self.collector.feed(name, payload)

    def _on_connected(self) -> None:
        if self.homeassistant is not None:
            self.homeassistant.connected()
        if not self.ready_sent:
            self.ready_sent = True
            self.notifier.ready()
        threading.Thread(target=self.publish_status, name="status", daemon=True).start()

    # --- request handling (dispatcher thread) --------------------------------------------------------------

    def dispatch(self, command: str, payload: bytes, props: Any) -> None:
        """Validate and carry out one request, answering it (now, or when its job ends)."""
        transaction = transaction_of(payload)
        try:
            request = parse_request(command, payload, self.cfg.mqtt.max_payload_bytes)
            transaction = request.transaction
            data = self.handlers[command](request, props)
        except (RequestError, CommandError, Busy, PlanError, BundleError, ChildError) as err:
            log.warning("request %s (transaction %r) refused: %s", command, transaction, err)
            self.link.respond(command, props,
                              {"transaction": transaction, "status": "error", "error": str(err)})
            return
        except Exception as err:  # a bug must not kill the dispatcher; the requester still gets an answer
            log.exception("request %s failed", command)
            self.link.respond(command, props, {"transaction": transaction, "status": "error",
                                               "error": f"internal error: {type(err).__name__}: {err}"})
            return
        if data is not DEFERRED:
            self.link.respond(command, props, {"transaction": transaction, "status": "ok", "data": data})

    def _dispatch_loop(self) -> None:
        while True:
            item = self.requests.get()
            if item is None:
                return
            self.dispatch(*item)

    # --- commands ------------------------------------------------------------------------------------------

    def cmd_train(self, req: TrainRequest, props: Any) -> dict[str, Any]:
        manifest = self._need_bundle()
        t = self.cfg.training
        has_features = bool(self.probe.get("has_features"))
        plan = choose_plan(manifest, ceiling_mb=t.ram_ceiling_mb,
                           daemon_bytes=psutil.Process().memory_info().rss,
                           child_base_bytes=int(self.probe["base_rss"]), margin_mb=t.safety_margin_mb,
                           batch_size=req.batch_size or t.batch_size,
                           streamed_ok=has_features and self.cfg.store.feature_cache)
        steps = req.steps or t.steps
        lr = req.learning_rate if req.learning_rate is not None else t.learning_rate
        job = self._job("train", plan=plan, steps=steps, learning_rate=lr, transaction=req.transaction)
        started = time.time()

        def progress(event: dict[str, Any]) -> None:
            if event.get("event") == "progress":
                self.link.publish("progress", {"transaction": req.transaction, **event}, qos=0)
                self.snapshot.progress(event)

        def done(result: dict[str, Any] | None, error: str | None) -> None:
            report = {"transaction": req.transaction, "device_id": self.cfg.device.id,
                      "bundle": self.bundle_name, "sha256": manifest.sha256, "started": started,
                      "finished": time.time(),
                      "ram_ceiling_mb": t.ram_ceiling_mb, **(result or {"status": "error", "error": error})}
            self.link.publish_reliably("report", report, retain=True)
            self.snapshot.update(report=report, job=None, progress=None)

        self.jobs.submit(job, plan.child_limit_bytes, progress, done)
        self.snapshot.update(job={"transaction": req.transaction, "steps": steps, "plan": plan.to_dict(),
                                  "started": started}, progress=None)
        log.info("Training %d steps with %s", steps, plan)
        return {"accepted": True, "steps": steps, "plan": plan.to_dict()}

    def cmd_stop(self, req: Request, props: Any) -> dict[str, Any]:
        if not self.jobs.stop():
            raise CommandError("nothing to stop: no training is running")
        return {"stopping": True}

    def cmd_evaluate(self, req: EvaluateRequest, props: Any) -> Deferred:
        self._need_bundle()

        def done(result: dict[str, Any] | None, error: str | None) -> None:
            body = ({"transaction": req.transaction, "status": "ok", "data": result} if error is None
                    else {"transaction": req.transaction, "status": "error", "error": error})
            self.link.respond("evaluate", props, body)

        self.jobs.submit(self._job("evaluate", split=req.split, transaction=req.transaction), 0,
                         lambda event: None, done)
        return DEFERRED

    def cmd_status(self, req: Request, props: Any) -> dict[str, Any]:
        return self.status()

    def cmd_label(self, req: LabelRequest, props: Any) -> dict[str, Any]:
        manifest = self._need_bundle()
        if req.label not in manifest.labels:
            raise CommandError(f"label {req.label!r} is not one of the bundle's labels {manifest.labels}")
        return {"updated": self.store.relabel(req.ids, req.last, req.label), "samples": self.store.counts()}

    def cmd_collect(self, req: CollectRequest, props: Any) -> dict[str, Any]:
        manifest = self._need_bundle()
        assert self.collector is not None
        unknown = self.collector.unknown(req.sources or [])
        if unknown:
            raise CommandError(f"unknown sources {unknown}; configured: {sorted(self.collector.options)}")
        if req.action == "stop":
            active = self.collector.stop(req.sources)
        else:
            if req.label is not None and req.label not in manifest.labels:
                raise CommandError(f"label {req.label!r} is not one of the bundle's labels {manifest.labels}")
            if not self.collector.options:
                raise CommandError("no [[sources]] are configured")
            active = self.collector.start(req.sources, req.label, req.split, req.windows)
        self.publish_status()
        return {"collecting": active}

    def cmd_rollback(self, req: Request, props: Any) -> dict[str, Any]:
        manifest = self._need_bundle()
        if self.jobs.kind is not None:
            raise CommandError(f"busy: cannot roll back while a {self.jobs.kind} job runs")
        directory = checkpoint.bundle_dir(self.cfg.checkpoints_dir, manifest.sha256)
        discarded = checkpoint.discard_latest(directory)
        if discarded is None:
            raise CommandError("no checkpoint to roll back: the bundle's initial weights are in use")
        newest = checkpoint.listing(directory)
        self.publish_status()
        return {"discarded": discarded.name, "global_step": newest[0][0] if newest else 0}

    def cmd_reload(self, req: ReloadRequest, props: Any) -> dict[str, Any]:
        if self.jobs.kind is not None:
            raise CommandError(f"busy: cannot reload while a {self.jobs.kind} job runs")
        self.load_bundle(req.bundle)
        assert self.collector is not None and self.manifest is not None
        self.collector.autostart()
        self.publish_status()
        return {"bundle": req.bundle, "sha256": self.manifest.sha256,
                "global_step": self.probe.get("global_step", 0)}

    # --- lifecycle -----------------------------------------------------------------------------------------

    def main_loop_alive(self) -> bool:
        """The watchdog's liveness check: the main loop went round within the last ``stuck_after_s`` (start-up,
        before the loop runs, counts as alive: systemd's TimeoutStartSec= covers it)."""
        return self.heartbeat is None or time.monotonic() - self.heartbeat < self.stuck_after_s

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.stop_event.set())
        interval = watchdog_interval()
        # A main loop stuck for a whole watchdog interval withholds the pings, so systemd restarts the daemon;
        # the loop goes round at least 4 times per interval.
        period = MAIN_LOOP_PERIOD_S if interval is None else min(MAIN_LOOP_PERIOD_S, interval / 4)
        if interval is not None:
            self.stuck_after_s = interval
        watchdog = start_watchdog_thread(self.notifier, self.stop_event, interval=interval,
                                         alive=self.main_loop_alive)
        try:
            self.load_bundle(self.bundle_name)
        except (BundleError, ChildError) as err:
            self.bundle_error = str(err)
            log.error("bundle %s not usable: %s", self.bundle_name, err)
        dispatcher = threading.Thread(target=self._dispatch_loop, name="dispatcher", daemon=True)
        dispatcher.start()
        self.link.set_status(self.status())
        self.link.start()
        if self.collector is not None:
            self.collector.autostart()
        self.heartbeat = time.monotonic()
        while not self.stop_event.wait(period):
            self.heartbeat = time.monotonic()
            # against what was last published, not last polled: a collection that starts and ends between two
            # polls (a short clip) must still be followed by a status that says it ended
            if self.state() != self.published_state:
                self.publish_status()
        self.shutdown(dispatcher)
        if watchdog is not None:
            watchdog.join(1)
        return 0

    def shutdown(self, dispatcher: threading.Thread) -> None:
        """The one ordered shutdown path."""
        log.info("Shutting down")
        self.notifier.stopping()
        if self.collector is not None:
            self.collector.stop()
        self.requests.put(None)
        dispatcher.join(5)
        self.jobs.shutdown()
        final = {**self.status(), "state": "offline"}
        self.link.stop(final)
        self.snapshot.update(status=final)
        self.store.close()
        log.info("Stopped")
