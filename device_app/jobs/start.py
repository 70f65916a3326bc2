"""Building jobs from the configuration, and :func:`start_training`: the one way a training run starts (the daemon's
``train`` request, ``hosvd-device train``, a fleet round).

A training run is always the same thing: the bundle is checked (format, sha256), a probe child measures what the
loaded bundle costs (unless the caller has that measurement), :func:`~device_app.plan.choose_plan` picks a plan
inside ``ram_ceiling_mb`` (or refuses), and a child process trains with that plan under the RSS watcher,
restoring the newest checkpoint and writing new ones. Its report says where work resumes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_app import checkpoint
from device_app.bundle import resolve_bundle
from device_app.config import Config
from device_app.jobs.runner import JobRunner
from device_app.jobs.spec import Job, JobKind
from device_app.jobs.watch import ChildRun, run_job
from device_app.memory import rss_bytes
from device_app.plan import Plan, choose_plan
from hosvd_contract import BundleError, Manifest, load_manifest

log = logging.getLogger(__name__)
Report = dict[str, Any]


FLEET_START = "fleet/global.npz"


def fleet_start_weights(cfg: Config) -> Path:
    """Where a fleet ClientApp leaves the round's global trainable weights: ``<state_dir>/fleet/global.npz``.

    A ``train`` or ``evaluate`` request with ``fleet_round`` starts from this file (the daemon's side of a fleet
    round, when the daemon holds the state directory).
    """
    return cfg.state_dir / FLEET_START


def install_fleet_weights(cfg: Config, manifest: Manifest) -> Path:
    """Make the fleet's global weights (:func:`fleet_start_weights`) the bundle's newest checkpoint: every variable
    of the newest checkpoint, its trainable weights replaced, written one step after it (so training and
    personalisation continue from the fleet's model).

    Raises:
        BundleError: no checkpoint of this bundle yet (the node has not trained a round), or the file does not
            hold exactly the bundle's trainable weights.
    """
    directory = checkpoint.bundle_dir(cfg.checkpoints_dir, manifest.sha256)
    newest = checkpoint.latest(directory, {w.name for w in manifest.weights})
    if newest is None:
        raise BundleError(f"no checkpoint of bundle {manifest.model_name} ({manifest.sha256[:12]}…) yet to install "
                          "the fleet's weights into: take part in a round first")
    with np.load(fleet_start_weights(cfg), allow_pickle=False) as data:
        given = {k: np.array(data[k]) for k in data.files}
    specs = {w.name: w for w in manifest.weights if w.trainable}
    wrong = sorted(set(given) ^ set(specs)) + [k for k in set(given) & set(specs)
                                                if list(given[k].shape) != specs[k].shape]
    if wrong:
        raise BundleError(f"{fleet_start_weights(cfg)} is not this bundle's trainable weights: {wrong}")
    meta = {**newest.meta, "source": "fleet", "installed": time.time()}
    return checkpoint.save(directory, newest.step + 1, {**newest.weights, **given}, meta, cfg.training.keep_checkpoints)


def make_job(cfg: Config, kind: JobKind, bundle_dir: str | Path, **fields: Any) -> Job:
    """A job of ``kind`` on ``bundle_dir`` with the configuration's paths and ``[training]`` settings.

    Args:
        cfg: the validated configuration.
        kind: ``probe``, ``train`` or ``evaluate``.
        bundle_dir: the bundle directory (already resolved inside the bundles directory).
        **fields: the other :class:`~device_app.jobs.spec.Job` fields (plan, steps, split, transaction, ...).
    """
    t = cfg.training
    defaults: dict[str, Any] = dict(
        threads=cfg.model.threads, checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
        progress_every=t.progress_every, rollback_tolerance=t.rollback_tolerance,
        feature_cache=cfg.store.feature_cache, seed=t.seed)
    return Job(kind=kind, bundle_dir=str(bundle_dir), db_path=str(cfg.db_path),
               checkpoints_root=str(cfg.checkpoints_dir), **{**defaults, **fields})


def probe_bundle(cfg: Config, bundle_dir: str | Path) -> dict[str, Any]:
    """Load the bundle in a probe child and return what it measured.

    Returns:
        ``{"base_rss": bytes, "global_step", "runtime", "has_features", "sha256", "peak_rss_mb", ...}``.

    Raises:
        ChildError: the runtime cannot load the model (the message says why).
    """
    return run_job(make_job(cfg, "probe", bundle_dir), poll_s=cfg.training.rss_poll_s)


def resume_point(cfg: Config, sha256: str) -> tuple[int, str | None]:
    """``(global step, checkpoint file name)`` the next run of the bundle ``sha256`` starts from (0, None: initial)."""
    newest = checkpoint.listing(checkpoint.bundle_dir(cfg.checkpoints_dir, sha256))
    return (newest[0][0], newest[0][1].name) if newest else (0, None)


@dataclass(frozen=True)
class TrainOptions:
    """What one request may change about a training run (``None``: the ``[training]`` setting)."""

    steps: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    progress_every: int | None = None
    transaction: str | int | None = None
    start_weights: str | None = None  # an .npz of trainable weights to start from (a fleet round's global model)


class TrainingRun:
    """A started training job: its plan and job, :meth:`wait` for the report, :meth:`stop` to end it early."""

    def __init__(self, cfg: Config, bundle_name: str, manifest: Manifest, plan: Plan, job: Job) -> None:
        self.cfg = cfg
        self.bundle_name = bundle_name
        self.manifest = manifest
        self.plan = plan
        self.job = job
        self.started = time.time()
        self.report: Report | None = None
        self.child: ChildRun | None = None
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Report:
        """Block until the run ends; return its report.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"training ({self.job.steps} steps) still running after {timeout} s")
        assert self.report is not None
        return self.report

    def stop(self) -> None:
        """Ask the child to stop after its current step (it still checkpoints and reports ``stopped``)."""
        if self.child is not None:
            self.child.request_stop()

    def _finish(self, result: dict[str, Any] | None, error: str | None) -> Report:
        step, name = resume_point(self.cfg, self.manifest.sha256)
        base = {"transaction": self.job.transaction, "device_id": self.cfg.device.id, "bundle": self.bundle_name,
                "sha256": self.manifest.sha256, "started": self.started, "finished": time.time(),
                "ram_ceiling_mb": self.cfg.training.ram_ceiling_mb, "plan": self.plan.to_dict()}
        if result is not None:
            report = {**base, **result}
        else:
            progress = self.child.last_progress if self.child is not None else None
            where = f"step {step} ({name})" if name else "the bundle's initial weights (no checkpoint yet)"
            report = {**base, "status": "error", "reason": "", "error": f"{error}; work resumes from {where}",
                      "steps_done": int(progress["step"]) if progress else 0, "global_step": step,
                      "checkpoint": name, "watched_peak_rss_mb": round(self.child.peak_rss / 2**20, 1)
                      if self.child is not None else None}
        self.report = report
        return report


def start_training(
    cfg: Config,
    options: TrainOptions | None = None,
    *,
    bundle_name: str | None = None,
    probe: dict[str, Any] | None = None,
    expected_sha256: str | None = None,
    runner: JobRunner | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_report: Callable[[Report], None] | None = None,
) -> TrainingRun:
    """Plan and start one training run in a child process; return at once with its handle.

    The same for every caller (the daemon's ``train`` request, ``hosvd-device train``, a fleet round): the
    bundle's format and sha256 are checked, the plan is chosen inside ``[training] ram_ceiling_mb`` from the
    bundle's memory plan, the probe's base RSS, this process's RSS now and the data buffers, and the child trains
    under the RSS watcher, restoring the newest checkpoint of the bundle and writing new ones atomically.

    Args:
        cfg: the validated configuration (paths, ``[training]``, ``[store]``, ``[model]``).
        options: per-run overrides (steps, batch size, learning rate, progress interval, transaction).
        bundle_name: the bundle inside the bundles directory; default ``[model] bundle``.
        probe: the result of :func:`probe_bundle` for this bundle when the caller has one (the daemon keeps it
            from loading); otherwise a probe child runs first (about a second).
        expected_sha256: refuse (``BundleError``) when the bundle's model hash is no longer this one: the bundle
            changed on disk since the caller loaded it.
        runner: the :class:`~device_app.jobs.runner.JobRunner` that serialises the caller's jobs (a new one if
            omitted); raises ``Busy`` when it already runs a job.
        on_progress: called in the job thread with each ``progress`` event ``{"event", "step", "total",
            "global_step", "loss", "accuracy", "rss_mb", "elapsed"}``.
        on_report: called in the job thread with the final report when the run ends (also after a failure).

    Returns:
        The :class:`TrainingRun`; ``.plan`` is the plan, ``.wait()`` returns the report: ``{"status": "ok" |
        "stopped" | "rolled_back" | "error", "reason", "error", "steps_done", "global_step", "checkpoint",
        "first_loss", "final_loss", "final_accuracy", "val_before", "val_after", "n_train", "n_val",
        "from_features", "plan", "peak_rss_mb", "watched_peak_rss_mb", "elapsed_s", "transaction", "device_id",
        "bundle", "sha256", "started", "finished", "ram_ceiling_mb"}``. ``global_step`` and ``checkpoint`` always
        name where the next run resumes (after an error too, whose message says so).

    Raises:
        BundleError: missing, invalid or modified bundle.
        ChildError: the probe child could not load it.
        PlanError: no plan fits the ceiling (the message lists every candidate's need), or a batch size the bundle
            does not export.
        Busy: ``runner`` is running another job.
    """
    options = options or TrainOptions()
    t = cfg.training
    name = bundle_name or cfg.model.bundle
    path = resolve_bundle(cfg.bundles_dir, name)
    manifest = load_manifest(path)
    if expected_sha256 is not None and manifest.sha256 != expected_sha256:
        raise BundleError(f"bundle {name} changed on disk since it was loaded (model sha256 now "
                          f"{manifest.sha256[:12]}…, loaded {expected_sha256[:12]}…); send reload to use it")
    cfg.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    probe = probe if probe is not None else probe_bundle(cfg, path)
    plan = choose_plan(manifest, ceiling_mb=t.ram_ceiling_mb, daemon_bytes=rss_bytes(),
                       child_base_bytes=int(probe["base_rss"]), margin_mb=t.safety_margin_mb,
                       batch_size=options.batch_size or t.batch_size,
                       streamed_ok=bool(probe.get("has_features")) and cfg.store.feature_cache,
                       max_windows=cfg.store.max_samples, eval_bytes=probe.get("eval_bytes"))
    job = make_job(cfg, "train", path, plan=plan, steps=options.steps or t.steps,
                   learning_rate=options.learning_rate if options.learning_rate is not None else t.learning_rate,
                   progress_every=options.progress_every or t.progress_every, transaction=options.transaction,
                   eval_batch=plan.batch_size, expected_sha256=manifest.sha256,
                   start_weights=options.start_weights)
    run = TrainingRun(cfg, name, manifest, plan, job)

    def done(result: dict[str, Any] | None, error: str | None) -> None:
        try:
            report = run._finish(result, error)
            if on_report is not None:
                on_report(report)
        finally:
            run._done.set()

    def event(message: dict[str, Any]) -> None:
        if on_progress is not None and message.get("event") == "progress":
            on_progress(message)

    runner = runner or JobRunner(t.rss_poll_s)
    run.child = runner.submit(job, plan.child_limit_bytes, event, done)
    log.info("Training %d steps of %s with %s", job.steps, name, plan)
    return run
