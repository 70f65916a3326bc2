"""The device daemon: wires config, store, sources, MQTT and training children, and answers requests.

Threads: paho's network thread only sorts requests (a retained one, one over ``max_payload_bytes`` and one that
finds the bounded queue full are answered at once with an error, never queued) and queues the rest; one
dispatcher thread validates and answers them in order and never runs long work itself (a ``reload``'s probe, an
``evaluate`` and training are child jobs, :mod:`device_app.jobs`, whose ends are answered from their worker
thread); each source has a thread (:mod:`device_app.collector`); the systemd watchdog has its own, and pings only
while the main loop goes round. The main thread publishes state changes and watches the loaded bundle's files
and the disk until a signal, then runs the one shutdown path: stop sources, stop the dispatcher, stop the job,
publish ``offline``, disconnect, close the store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
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
from device_app.jobs import (
    Busy,
    ChildError,
    JobRunner,
    TrainOptions,
    fleet_start_weights,
    install_fleet_weights,
    make_job,
    probe_bundle,
    start_training,
)
from device_app.mqtt_link import MqttLink
from device_app.plan import PlanError
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
from device_app.windowing import check_sources_fit
from hosvd_contract import MANIFEST_FILE, MODEL_FILE, BundleError, Manifest, file_sha256, load_manifest

log = logging.getLogger(__name__)
QUEUE_SIZE = 100
WATCH_PERIOD_S = 2.0  # how often the main loop looks at the bundle's files and the free space
DISK_OK_BYTES = 4 << 20  # free space at which a disk-full condition counts as over
MAIN_LOOP_PERIOD_S = 0.5


class CommandError(RuntimeError):
    """A valid request that cannot be carried out now; the message goes back in the error response."""


class Deferred:
    """Returned by a handler whose response is sent later (when its child job ends)."""


DEFERRED = Deferred()


@dataclasses.dataclass(frozen=True)
class LoadedBundle:
    """The bundle in use: where it is, its manifest, what the probe child measured, and its files' identity."""

    name: str
    path: Path
    manifest: Manifest
    probe: dict[str, Any]
    manifest_sha256: str
    stamp: tuple[tuple[int, int, int], ...]


def _stamp(path: Path) -> tuple[tuple[int, int, int], ...]:
    """``(inode, size, mtime_ns)`` of the bundle's two files: cheap to compare every few seconds."""
    out = []
    for name in (MODEL_FILE, MANIFEST_FILE):
        try:
            st = (path / name).stat()
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((0, -1, 0))
    return tuple(out)


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
        self.dispatch_stop = threading.Event()
        self.requests: queue.Queue[tuple[str, bytes, Any]] = queue.Queue(maxsize=QUEUE_SIZE)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        cfg.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(cfg.db_path, cfg.store.max_samples, cfg.store.val_fraction)
        self.snapshot = Snapshot(cfg.state_dir)  # for `hosvd-device status`
        self.jobs = JobRunner(cfg.training.rss_poll_s, self.publish_status)
        self.link = MqttLink(cfg.mqtt, cfg.device.id, cfg.mqtt_password(), self.store, self._on_request,
                             self._on_samples, self._on_connected)
        self.lock = threading.RLock()  # the loaded bundle and collector: swapped by reload, used by commands
        self.bundle_name = cfg.model.bundle
        self.loaded: LoadedBundle | None = None
        self.bundle_error: str | None = None  # why no bundle is loaded
        self.bundle_changed: str | None = None  # the loaded bundle's files changed on disk since
        self.disk_problem: str | None = None  # a report or checkpoint that failed for lack of space
        self.collector: Collector | None = None
        self.ready_sent = False
        self.heartbeat: float | None = None  # when the main loop last went round (None: not started yet)
        self.stuck_after_s = float("inf")
        self.published_state: str | None = None
        self.homeassistant = Discovery(cfg, self.link, self.publish_status) if cfg.homeassistant.enabled else None
        self.handlers = {
            "train": self.cmd_train, "stop": self.cmd_stop, "evaluate": self.cmd_evaluate,
            "status": self.cmd_status, "label": self.cmd_label, "collect": self.cmd_collect,
            "rollback": self.cmd_rollback, "reload": self.cmd_reload, "install_fleet": self.cmd_install_fleet,
        }

    @property
    def manifest(self) -> Manifest | None:
        return self.loaded.manifest if self.loaded else None

    # --- bundle --------------------------------------------------------------------------------------------

    def _prepare(self, name: str) -> tuple[Path, Manifest]:
        """Resolve and validate bundle ``name`` (format, sha256, fits the sources) without loading it.

        Raises:
            BundleError: invalid bundle, or one whose input a configured source cannot feed.
        """
        path = resolve_bundle(self.cfg.bundles_dir, name)
        manifest = load_manifest(path)
        check_sources_fit(self.cfg.sources, manifest.input, name)
        return path, manifest

    def load_bundle(self, name: str) -> None:
        """Validate bundle ``name``, probe it in a child (blocking), and switch to it. Used at start-up.

        Raises:
            BundleError: invalid bundle, or one whose input a configured source cannot feed.
            ChildError: the runtime cannot load the model.
        """
        path, manifest = self._prepare(name)
        self._switch(name, path, manifest, probe_bundle(self.cfg, path))

    def _switch(self, name: str, path: Path, manifest: Manifest, probe: dict[str, Any]) -> None:
        """Make the probed bundle the one in use; sources are rebuilt for it (they resume where they were)."""
        with self.lock:
            if self.collector is not None:
                self.collector.stop()
            self.loaded = LoadedBundle(name, path, manifest, probe, file_sha256(path / MANIFEST_FILE), _stamp(path))
            self.bundle_name = name
            self.bundle_error = self.bundle_changed = None
            dropped = self.store.invalidate_features(manifest.sha256)
            ckpt_dir = checkpoint.bundle_dir(self.cfg.checkpoints_dir, manifest.sha256)
            for tmp in checkpoint.remove_stale_temp(ckpt_dir):
                log.warning("Removed %s, a checkpoint whose writing was interrupted", tmp.name)
            log.info("Loaded bundle %s (%s, sha256 %s…, %s; child base RSS %.1f MiB, checkpoint step %d; "
                     "%d stale cached features dropped)", name, manifest.model_name, manifest.sha256[:12],
                     probe.get("runtime", "?"), probe["base_rss"] / 2**20, probe["global_step"], dropped)
            self.collector = Collector(self.cfg.sources, SourceContext.for_input(manifest.input),
                                       manifest.input.shape[0], self.store, self.link.topic("samples"),
                                       self.publish_status)

    def _need_bundle(self) -> LoadedBundle:
        if self.loaded is None:
            raise CommandError(f"no bundle loaded ({self.bundle_error}); send reload with a valid bundle")
        return self.loaded

    def verify_bundle(self) -> LoadedBundle:
        """Check that the loaded bundle's files still hold what was loaded (sha256 of both); before each job.

        Raises:
            CommandError: no bundle is loaded.
            BundleError: a file changed; the bundle is marked changed until a ``reload``.
        """
        loaded = self._need_bundle()
        try:
            manifest = load_manifest(loaded.path)
            if (manifest.sha256 != loaded.manifest.sha256
                    or file_sha256(loaded.path / MANIFEST_FILE) != loaded.manifest_sha256):
                raise BundleError(f"{loaded.path} now holds another model or manifest")
        except BundleError as err:
            self.bundle_changed = (f"bundle {loaded.name} changed on disk since it was loaded ({err}); push it "
                                   "again or send reload")
            raise BundleError(self.bundle_changed) from err
        return loaded

    def _watch_bundle(self) -> None:
        """Notice a bundle modified while running (cheap stat; the hashes only when something changed)."""
        loaded = self.loaded
        if loaded is None or self.bundle_changed is not None or _stamp(loaded.path) == loaded.stamp:
            return
        try:
            self.verify_bundle()
        except BundleError as err:
            log.error("%s", err)
            self.publish_status()
            return
        with self.lock:  # touched but the same content
            if self.loaded is loaded:
                self.loaded = dataclasses.replace(loaded, stamp=_stamp(loaded.path))

    # --- disk ----------------------------------------------------------------------------------------------

    def disk_full(self) -> str | None:
        """Why the state directory cannot take writes now, or ``None``."""
        paused = self.collector.paused if self.collector is not None else None
        return self.store.disk_full or paused or self.disk_problem

    def _watch_disk(self) -> None:
        if self.disk_problem is None:
            return
        try:
            st = os.statvfs(self.cfg.state_dir)
        except OSError:
            return
        if st.f_bavail * st.f_frsize >= DISK_OK_BYTES:
            log.info("Space is back in %s", self.cfg.state_dir)
            self.disk_problem = None
            self.publish_status()

    # --- status --------------------------------------------------------------------------------------------

    def state(self) -> str:
        if self.jobs.kind == "train":
            return "training"
        if self.loaded is None or self.bundle_changed or self.disk_full():
            return "error"
        if self.collector is not None and self.collector.active():
            return "collecting"
        return "idle"

    def status(self) -> dict[str, Any]:
        loaded = self.loaded
        m = loaded.manifest if loaded else None
        newest = checkpoint.listing(checkpoint.bundle_dir(self.cfg.checkpoints_dir, m.sha256)) if m else []
        return {
            "state": self.state(), "device_id": self.cfg.device.id, "bundle": self.bundle_name,
            "model_name": m.model_name if m else None, "sha256": m.sha256 if m else None,
            "labels": m.labels if m else [], "error": self.bundle_error or self.bundle_changed or self.disk_full(),
            "global_step": newest[0][0] if newest else 0, "samples": self.store.counts(),
            "collecting": self.collector.active() if self.collector else [],
            "collect_label": self.collector.session.label if self.collector else None, "job": self.jobs.kind,
            "runtime": loaded.probe.get("runtime") if loaded else None,
            "ram_ceiling_mb": self.cfg.training.ram_ceiling_mb,
            "daemon_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1), "time": time.time(),
        }

    def publish_status(self) -> None:
        try:
            status = self.status()
        except Exception:  # a status that cannot be built (store gone at shutdown) must not break a caller
            log.exception("could not build the status")
            return
        self.published_state = status["state"]
        if self.homeassistant is not None:  # the config first: Home Assistant then reads the states
            self.homeassistant.announce(status)
        self.link.set_status(status)
        self.snapshot.update(status=status)
        self.notifier.status(f"{status['state']}; bundle {self.bundle_name}; step {status['global_step']}; "
                             f"{status['samples']['total']} windows")

    # --- MQTT callbacks (network thread: sort and queue only) ----------------------------------------------

    def _refuse(self, command: str, props: Any, transaction: Any, error: str) -> None:
        log.warning("request %s (transaction %r) refused: %s", command, transaction, error)
        try:
            self.link.respond(command, props, {"transaction": transaction, "status": "error", "error": error})
        except Exception:  # the network thread must survive any response
            log.exception("could not answer request %s", command)

    def _on_request(self, command: str, payload: bytes, props: Any, retained: bool) -> None:
        limit = self.cfg.mqtt.max_payload_bytes
        if len(payload) > limit:  # never parsed, never queued
            self._refuse(command, props, None, f"payload is {len(payload)} bytes, the limit is {limit} "
                         "([mqtt] max_payload_bytes)")
            return
        if retained:
            topic = self.link.topic(f"request/{command}")
            cleared = self.link.clear_retained(topic)
            self._refuse(command, props, transaction_of(payload),
                         f"request/{command} arrived as a retained message: retained requests are never executed "
                         "(they would run again on every connection); publish it without retain. "
                         + ("The retained copy was cleared." if cleared else
                            f"Clear it with: mosquitto_pub -r -n -t '{topic}'"))
            return
        try:
            self.requests.put_nowait((command, payload, props))
        except queue.Full:
            self._refuse(command, props, transaction_of(payload),
                         f"busy: {QUEUE_SIZE} requests are already waiting; send it again later")

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
        """Validate and carry out one request, answering it (now, or when its job ends); never raises."""
        transaction = None
        try:
            transaction = transaction_of(payload)
            request = parse_request(command, payload, self.cfg.mqtt.max_payload_bytes)
            transaction = request.transaction
            with self.lock:
                data = self.handlers[command](request, props)
        except (RequestError, CommandError, Busy, PlanError, BundleError, ChildError) as err:
            self._refuse(command, props, transaction, str(err))
            return
        except Exception as err:  # a bug must not kill the dispatcher; the requester still gets an answer
            log.exception("request %s failed", command)
            self._refuse(command, props, transaction, f"internal error: {type(err).__name__}: {err}")
            return
        if data is not DEFERRED:
            self._answer(command, props, transaction, data)

    def _answer(self, command: str, props: Any, transaction: Any, data: Any) -> None:
        try:
            self.link.respond(command, props, {"transaction": transaction, "status": "ok", "data": data})
        except Exception:
            log.exception("could not answer request %s", command)

    def _dispatch_loop(self) -> None:
        while not self.dispatch_stop.is_set():
            try:
                item = self.requests.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.dispatch(*item)
            except Exception:  # dispatch answers everything itself; this is the last line
                log.exception("the dispatcher caught an error")

    # --- commands ------------------------------------------------------------------------------------------

    def cmd_train(self, req: TrainRequest, props: Any) -> dict[str, Any]:
        loaded = self.verify_bundle()
        options = TrainOptions(steps=req.steps, batch_size=req.batch_size, learning_rate=req.learning_rate,
                               transaction=req.transaction, start_weights=self._fleet_start(req.fleet_round))

        def progress(event: dict[str, Any]) -> None:
            self.link.publish("progress", {"transaction": req.transaction, **event}, qos=0)
            self.snapshot.progress(event)

        try:
            run = start_training(self.cfg, options, bundle_name=loaded.name, probe=loaded.probe,
                                 expected_sha256=loaded.manifest.sha256, runner=self.jobs, on_progress=progress,
                                 on_report=self._report)
        except BundleError as err:
            self.bundle_changed = str(err)
            raise
        self.snapshot.update(job={"transaction": req.transaction, "steps": run.job.steps, "plan": run.plan.to_dict(),
                                  "started": run.started}, progress=None)
        return {"accepted": True, "steps": run.job.steps, "plan": run.plan.to_dict()}

    def _fleet_start(self, fleet_round: bool) -> str | None:
        """The fleet round's global weights file for a request with ``fleet_round`` (``None`` without)."""
        if not fleet_round:
            return None
        path = fleet_start_weights(self.cfg)
        if not path.is_file():
            raise CommandError(f"fleet_round: no global weights at {path} (the fleet ClientApp writes them)")
        return str(path)

    def _report(self, report: dict[str, Any]) -> None:
        self.snapshot.update(report=report, job=None, progress=None)
        if "disk full" in (report.get("error") or ""):
            self.disk_problem = f"disk full in the state directory {self.cfg.state_dir}: {report['error']}"
        if not self.link.publish_reliably("report", report, retain=True):
            self.disk_problem = self.disk_problem or self.store.disk_full

    def cmd_stop(self, req: Request, props: Any) -> dict[str, Any]:
        if not self.jobs.stop():
            raise CommandError("nothing to stop: no training is running")
        return {"stopping": True}

    def cmd_evaluate(self, req: EvaluateRequest, props: Any) -> Deferred:
        loaded = self.verify_bundle()
        ceiling = self.cfg.training.ram_ceiling_mb << 20
        limit = max(1, ceiling - psutil.Process().memory_info().rss) if ceiling else 0

        def done(result: dict[str, Any] | None, error: str | None) -> None:
            if error is None:
                self._answer("evaluate", props, req.transaction, result)
            else:
                self._refuse("evaluate", props, req.transaction, error)

        job = make_job(self.cfg, "evaluate", loaded.path, split=req.split, transaction=req.transaction,
                       eval_batch=loaded.manifest.default_batch_size, expected_sha256=loaded.manifest.sha256,
                       start_weights=self._fleet_start(req.fleet_round))
        self.jobs.submit(job, limit, lambda event: None, done)
        return DEFERRED

    def cmd_status(self, req: Request, props: Any) -> dict[str, Any]:
        return self.status()

    def cmd_label(self, req: LabelRequest, props: Any) -> dict[str, Any]:
        manifest = self._need_bundle().manifest
        if req.label not in manifest.labels:
            raise CommandError(f"label {req.label!r} is not one of the bundle's labels {manifest.labels}")
        return {"updated": self.store.relabel(req.ids, req.last, req.label), "samples": self.store.counts()}

    def cmd_collect(self, req: CollectRequest, props: Any) -> dict[str, Any]:
        manifest = self._need_bundle().manifest
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
            active = self.collector.start(req.sources, req.label, req.split, req.windows, req.replay)
        self.publish_status()
        return {"collecting": active}

    def cmd_rollback(self, req: Request, props: Any) -> dict[str, Any]:
        manifest = self._need_bundle().manifest
        if self.jobs.kind is not None:
            raise CommandError(f"busy: cannot roll back while a {self.jobs.kind} job runs")
        directory = checkpoint.bundle_dir(self.cfg.checkpoints_dir, manifest.sha256)
        discarded = checkpoint.discard_latest(directory)
        if discarded is None:
            raise CommandError("no checkpoint to roll back: the bundle's initial weights are in use")
        newest = checkpoint.listing(directory)
        self.publish_status()
        return {"discarded": discarded.name, "global_step": newest[0][0] if newest else 0}

    def cmd_install_fleet(self, req: Request, props: Any) -> dict[str, Any]:
        """Make the fleet's final global weights (left by the fleet ClientApp) the newest checkpoint."""
        manifest = self._need_bundle().manifest
        if self.jobs.kind is not None:
            raise CommandError(f"busy: cannot install the fleet's weights while a {self.jobs.kind} job runs")
        path = install_fleet_weights(self.cfg, manifest)
        self.publish_status()
        return {"checkpoint": path.name, "global_step": int(path.stem.split("-")[1])}

    def cmd_reload(self, req: ReloadRequest, props: Any) -> Deferred:
        if self.jobs.kind is not None:
            raise CommandError(f"busy: cannot reload while a {self.jobs.kind} job runs")
        path, manifest = self._prepare(req.bundle)

        def done(probe: dict[str, Any] | None, error: str | None) -> None:
            if probe is None:
                self._refuse("reload", props, req.transaction, f"bundle {req.bundle} cannot be loaded: {error}")
                return
            self._switch(req.bundle, path, manifest, probe)
            assert self.collector is not None
            self.collector.autostart()
            self.publish_status()
            self._answer("reload", props, req.transaction, {"bundle": req.bundle, "sha256": manifest.sha256,
                                                            "global_step": probe.get("global_step", 0)})

        self.jobs.submit(make_job(self.cfg, "probe", path, transaction=req.transaction), 0, lambda event: None,
                         done)
        return DEFERRED

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
        last_watch = self.heartbeat = time.monotonic()
        while not self.stop_event.wait(period):
            self.heartbeat = time.monotonic()
            if time.monotonic() - last_watch >= WATCH_PERIOD_S:
                last_watch = time.monotonic()
                self._watch_bundle()
                self._watch_disk()
            # against what was last published, not last polled: a collection that starts and ends between two
            # polls (a short clip) must still be followed by a status that says it ended
            if self.state() != self.published_state:
                self.publish_status()
        self.shutdown(dispatcher)
        if watchdog is not None:
            watchdog.join(1)
        return 0

    def shutdown(self, dispatcher: threading.Thread) -> None:
        """The one ordered shutdown path; every step is bounded in time."""
        log.info("Shutting down")
        self.notifier.stopping()
        if self.collector is not None:
            self.collector.stop()
        self.dispatch_stop.set()
        dispatcher.join(5)
        self.jobs.shutdown()
        final = {**self.status(), "state": "offline"}
        self.link.stop(final)
        self.snapshot.update(status=final)
        self.store.close()
        log.info("Stopped")
