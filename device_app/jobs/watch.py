"""Parent side of a child run: spawn it, relay its messages, watch its RSS against the ceiling, stop it.

:class:`ChildRun` runs one job and blocks until it ends; :class:`~device_app.jobs.runner.JobRunner` runs it from
a worker thread, one at a time.
The RSS watcher samples the child every ``poll_s``; a child above its limit is killed and the run fails with
a message giving both numbers, before the kernel's OOM killer would have to act.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from typing import Any

import psutil

from device_app.jobs.child import child_main
from device_app.jobs.spec import Job

log = logging.getLogger(__name__)
MIB = 1 << 20


class ChildError(RuntimeError):
    """The child reported an error, exceeded the RAM limit, or died; the message says which."""


class ChildRun:
    """One spawned child running ``job``.

    Args:
        job: what to run.
        limit_bytes: kill the child when its RSS passes this (0: no limit).
        poll_s: RSS sampling period.
        on_event: called (in the calling thread) with every ``loaded``/``progress`` message.
    """

    def __init__(self, job: Job, limit_bytes: int = 0, poll_s: float = 0.05,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.job = job
        self.limit_bytes = limit_bytes
        self.poll_s = poll_s
        self.on_event = on_event or (lambda event: None)
        ctx = mp.get_context("spawn")
        self.stop_event = ctx.Event()
        self.recv, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=child_main, args=(job, send, self.stop_event, os.getpid()),
                                   name=f"hosvd-{job.kind}", daemon=True)
        self._send = send
        self.peak_rss = 0
        self.last_progress: dict[str, Any] | None = None

    def request_stop(self) -> None:
        """Ask the child to stop after its current step (it still checkpoints and reports)."""
        self.stop_event.set()

    def kill(self) -> None:
        """SIGKILL the child if it still runs."""
        if self.process.is_alive():
            self.process.kill()

    def _sample_rss(self, proc: psutil.Process) -> None:
        try:
            rss = proc.memory_info().rss
        except psutil.Error:
            return
        self.peak_rss = max(self.peak_rss, rss)
        if self.limit_bytes and rss > self.limit_bytes:
            self.process.kill()
            raise ChildError(f"training child used {rss / MIB:.1f} MiB, above its limit of "
                             f"{self.limit_bytes / MIB:.1f} MiB (ram_ceiling_mb minus the daemon); "
                             "stopped it")

    def run(self) -> dict[str, Any]:
        """Start the child and block until it finishes.

        Returns:
            The child's ``result`` data, with ``watched_peak_rss_mb`` added.

        Raises:
            ChildError: the job failed, the child passed ``limit_bytes``, or it died without a result.
        """
        self.process.start()
        self._send.close()
        proc = psutil.Process(self.process.pid)
        try:
            while True:
                self._sample_rss(proc)
                if self.recv.poll(self.poll_s):
                    try:
                        message = self.recv.recv()
                    except EOFError:
                        break
                    if message["event"] == "result":
                        data = message["data"]
                        data["watched_peak_rss_mb"] = round(self.peak_rss / MIB, 1)
                        return data
                    if message["event"] == "error":
                        raise ChildError(message["error"])
                    if message["event"] == "progress":
                        self.last_progress = message
                    self.on_event(message)
                elif not self.process.is_alive() and not self.recv.poll(0):
                    break
            self.process.join(5)
            raise ChildError(f"{self.job.kind} child exited with code {self.process.exitcode} and no result")
        finally:
            self.kill()
            self.process.join(5)
            self.recv.close()


def run_job(job: Job, limit_bytes: int = 0, poll_s: float = 0.05,
            on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Convenience: :meth:`ChildRun.run` for one job."""
    started = time.monotonic()
    result = ChildRun(job, limit_bytes, poll_s, on_event).run()
    log.debug("%s child finished in %.2f s", job.kind, time.monotonic() - started)
    return result
