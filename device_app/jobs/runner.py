"""One child job at a time, each from its own worker thread; a second job while one runs is refused (:class:`Busy`).

The caller's callbacks decide what the messages become (the daemon turns them into MQTT progress, responses and
reports; ``hosvd-device train`` into a progress bar).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from device_app.jobs.spec import Job
from device_app.jobs.watch import ChildError, ChildRun

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """A job is already running."""


class JobRunner:
    """Runs a :class:`~device_app.jobs.spec.Job` in a thread; a second one is refused with :class:`Busy`.

    Args:
        poll_s: RSS sampling period for the child.
        on_change: called when a job starts or ends (the daemon republishes its status).
    """

    def __init__(self, poll_s: float = 0.05, on_change: Callable[[], None] | None = None) -> None:
        self.poll_s = poll_s
        self.on_change = on_change or (lambda: None)
        self.lock = threading.Lock()
        self.current: ChildRun | None = None
        self.thread: threading.Thread | None = None

    @property
    def kind(self) -> str | None:
        """Kind of the running job, or ``None``."""
        with self.lock:
            return self.current.job.kind if self.current else None

    def submit(self, job: Job, limit_bytes: int, on_event: Callable[[dict[str, Any]], None],
               on_done: Callable[[dict[str, Any] | None, str | None], None]) -> ChildRun:
        """Start ``job``; ``on_done(result, error)`` runs in the worker thread when it ends.

        Returns:
            The run (its ``last_progress`` and ``peak_rss`` are live).

        Raises:
            Busy: another job is running.
        """
        with self.lock:
            if self.current is not None:
                raise Busy(f"busy: a {self.current.job.kind} job is running (transaction "
                           f"{self.current.job.transaction!r}); send stop or wait for its report")
            run = self.current = ChildRun(job, limit_bytes, self.poll_s, on_event)
            self.thread = threading.Thread(target=self._run, args=(run, on_done), name=f"job-{job.kind}",
                                           daemon=True)
        self.on_change()
        self.thread.start()
        return run

    def _run(self, run: ChildRun, on_done: Callable[[dict[str, Any] | None, str | None], None]) -> None:
        started = time.monotonic()
        result, error = None, None
        try:
            result = run.run()
        except ChildError as err:
            error = str(err)
        except Exception as err:  # spawning failed, pipe broke: report it rather than lose the thread
            log.exception("%s job crashed", run.job.kind)
            error = f"{type(err).__name__}: {err}"
        log.info("%s job ended after %.1f s: %s", run.job.kind, time.monotonic() - started, error or "ok")
        try:  # still "busy" meanwhile, so what on_done switches (a reloaded bundle) is in place for the next job
            on_done(result, error)
        except Exception:  # the job is over either way; a failing callback must not hide that
            log.exception("handling the end of the %s job failed", run.job.kind)
        finally:
            with self.lock:
                self.current = None
            self.on_change()

    def stop(self) -> bool:
        """Ask a running train job to stop; return False when no train job runs."""
        with self.lock:
            run = self.current
        if run is None or run.job.kind != "train":
            return False
        run.request_stop()
        return True

    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop the running job (politely, then by force after ``timeout``) and wait for its thread."""
        with self.lock:
            run, thread = self.current, self.thread
        if run is not None:
            run.request_stop()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive() and run is not None:
                run.kill()
                thread.join(5)
