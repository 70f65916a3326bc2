"""Entry point of the child process that loads the interpreter and runs one :class:`~device_app.jobs.Job`.

The child is started with the ``spawn`` method, so it holds nothing of the daemon's memory; it exits when
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

from device_app.jobs import Job
from device_app.memory import peak_rss_bytes, rss_bytes

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


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

    bundle = Bundle(job.bundle_dir, job.threads)
    send({"event": "loaded", "rss": rss_bytes(), "runtime": runtime_name(), "sha256": bundle.sha256,
          "has_features": bundle.has_features})
    if job.kind == "probe":
        from device_app import checkpoint

        newest = checkpoint.listing(checkpoint.bundle_dir(job.checkpoints_root, bundle.sha256))
        return {"base_rss": rss_bytes(), "global_step": newest[0][0] if newest else 0,
                "runtime": runtime_name(), "has_features": bundle.has_features}
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
        log.exception("%s job failed", job.kind)
        conn.send({"event": "error", "error": str(err) or type(err).__name__, "type": type(err).__name__})
    finally:
        conn.close()
