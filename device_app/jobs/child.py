"""Entry point of the child process that loads the interpreter and runs one :class:`~device_app.jobs.spec.Job`.

The child is started with the ``spawn`` method, so it holds nothing of the parent's memory; it exits when
its job is done, which gives the interpreter arena back to the system. It dies with its parent
(``PR_SET_PDEATHSIG`` on Linux, and a parent-pid check before each progress message). Messages to the parent
are dicts sent over a pipe: ``loaded``, ``progress``, then one ``result`` or ``error``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from device_app.jobs.spec import Job
from device_app.memory import peak_rss_bytes, rss_bytes

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
# Failures that are a state of the world, not a bug (no data, a full disk, a bad bundle): no traceback in the log.
EXPECTED_ERRORS = {"TrainingError", "BundleError", "InputError", "DiskFull"}


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent-pid check still applies
        pass


def _run(job: Job, send: Any, stop: Any, parent: int) -> dict[str, Any]:
    from device_app.bundle import Bundle
    from device_app.runtime import runtime_name
    from device_app.store import Store
    from device_app.training import run_evaluation, run_training
    from hosvd_contract import BundleError

    # a training child delegates only what its plan runs; evaluation and the probe run whatever they need
    bundle = Bundle(job.bundle_dir, job.threads, job.plan.mode if job.kind == "train" and job.plan else None)
    if job.expected_sha256 and bundle.sha256 != job.expected_sha256:
        raise BundleError(f"bundle {job.bundle_dir} changed since the job was planned: its model has sha256 "
                          f"{bundle.sha256[:12]}…, the plan was for {job.expected_sha256[:12]}…; reload it")
    send({"event": "loaded", "rss": rss_bytes(), "runtime": runtime_name(), "sha256": bundle.sha256,
          "has_features": bundle.has_features})
    if job.kind == "probe":
        from device_app import checkpoint

        newest = checkpoint.listing(checkpoint.bundle_dir(job.checkpoints_root, bundle.sha256))
        base = rss_bytes()
        return {"base_rss": base, "eval_bytes": _evaluation_cost(bundle), "global_step": newest[0][0] if newest else 0,
                "runtime": runtime_name(), "has_features": bundle.has_features, "sha256": bundle.sha256}
    store = Store(job.db_path)
    try:
        if job.kind == "evaluate":
            return run_evaluation(bundle, store, job)

        def emit(event: dict[str, Any]) -> None:
            if os.getppid() != parent:
                raise SystemExit("parent died")
            send(event)

        return run_training(bundle, store, job, emit, stop, rss_bytes)
    finally:
        store.close()


def _evaluation_cost(bundle: Any) -> dict[str, int]:
    """RSS that evaluating adds to a loaded process, per plan mode, at the largest train batch (bytes).

    ``evaluate`` (whole plans) and ``evaluate_features`` (streamed plans) have arenas of their own, on top of
    the train step's that the converter measured; smaller batches cost less. Measured on seeded inputs.
    """
    import numpy as np

    from device_app.measure import sample_batch

    batch = max(s.batch_size for s in bundle.manifest.train_signatures)
    x, y = sample_batch(bundle.manifest, batch, np.random.default_rng(0))
    cost = {}
    before = rss_bytes()
    bundle.evaluate(x, y, batch=batch)
    cost["whole"] = max(0, rss_bytes() - before)
    if bundle.has_features:
        features = np.zeros((batch, *bundle.manifest.features_shape), np.float32)
        before = rss_bytes()
        bundle.evaluate(features, y, from_features=True, batch=batch)
        cost["streamed"] = max(0, rss_bytes() - before)
    return cost


def child_main(job: Job, conn: Connection, stop: Any, parent: int) -> None:
    """Run ``job`` and report over ``conn``; never raises (errors become an ``error`` message)."""
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s child[{job.kind}] %(levelname)s %(name)s: %(message)s")
    try:
        result = _run(job, conn.send, stop, parent)
        result["peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
        conn.send({"event": "result", "data": result})
    except Exception as err:  # reported to the parent, which answers the request with it
        if type(err).__name__ in EXPECTED_ERRORS:
            log.error("%s job failed: %s", job.kind, err)
        else:
            log.exception("%s job failed", job.kind)
        conn.send({"event": "error", "error": str(err) or type(err).__name__, "type": type(err).__name__})
    finally:
        conn.close()
