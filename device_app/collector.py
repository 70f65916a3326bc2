"""Runs the configured sources, one thread each, turning their samples into labelled windows in the store.

A collection *session* (the ``collect`` request, or ``autostart`` at start-up) may set a label and a split
for what it collects and a number of windows after which it stops. A source that fails with an ``OSError``
(a bus or file that went away) is logged with its name and set up again with backoff; a data error (a CSV
that does not fit the model) ends that source with an error in the log.

Each window is stored with the resume marks of its samples (``Sample.mark``), in the same transaction, so a
replayed source started again skips what is stored. When the disk is full the feature cache is dropped first
(it can be computed again; windows cannot); if that is not enough, the source pauses on the window it holds and
tries again with backoff (1 s doubling to 30 s) until space returns: nothing already stored is touched.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from device_app.sources import SourceOptions, make_source
from device_app.sources.base import Source, SourceContext
from device_app.store import DiskFull, Store
from device_app.windowing import Window, model_inputs

log = logging.getLogger(__name__)
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0
DISK_RETRY_MIN_S = 1.0
DISK_RETRY_MAX_S = 30.0


@dataclass
class Session:
    """What the current collection applies to its windows."""

    label: str | None = None
    split: str = "auto"
    windows: int | None = None
    stored: int = 0


@dataclass
class Running:
    source: Source
    stop: threading.Event
    thread: threading.Thread
    errors: list[str] = field(default_factory=list)


class Collector:
    """Source threads feeding one store.

    Args:
        sources: validated ``[[sources]]`` options.
        context: what the bundle says about its input (channels, rate) and the MQTT samples topic base.
        window_length: samples per window.
        store: where windows go.
        samples_topic: ``<base>/<device_id>/samples``; an ``mqtt`` source listens on
            ``<samples_topic>/<name>``.
        on_change: called (from a source thread) when a source ends, pauses or resumes.
    """

    def __init__(self, sources: list[SourceOptions], context: SourceContext, window_length: int, store: Store,
                 samples_topic: str = "", on_change: Callable[[], None] | None = None) -> None:
        self.options = {s.name: s for s in sources}
        self.context = context
        self.window_length = window_length
        self.store = store
        self.samples_topic = samples_topic
        self.session = Session()
        self.running: dict[str, Running] = {}
        self.lock = threading.Lock()
        self.paused: str | None = None  # why collection waits (disk full), else None
        self.on_change = on_change or (lambda: None)

    def active(self) -> list[str]:
        """Sources collecting now (a source asked to stop, or done, no longer counts)."""
        with self.lock:
            return sorted(n for n, r in self.running.items() if r.thread.is_alive() and not r.stop.is_set())

    def unknown(self, names: list[str]) -> list[str]:
        return [n for n in names if n not in self.options]

    def start(self, names: list[str] | None = None, label: str | None = None, split: str = "auto",
              windows: int | None = None, replay: bool = False) -> list[str]:
        """Start a session on ``names`` (default all sources); return the active sources.

        ``replay`` makes replayed sources (CSV) start from the beginning of their files instead of resuming
        after what is stored; sources already running go on as they are.
        """
        with self.lock:
            self.session = Session(label, split, windows)
        for name in names or list(self.options):
            self._start_one(name, replay)
        return self.active()

    def autostart(self) -> list[str]:
        names = [n for n, o in self.options.items() if o.autostart]
        return self.start(names) if names else []

    def _start_one(self, name: str, replay: bool = False) -> None:
        with self.lock:
            current = self.running.get(name)
            if current and current.thread.is_alive():
                return
            opts = self.options[name]
            resume = self.context.resume_from if replay else self.store.progress
            ctx = dataclasses.replace(self.context, topic=f"{self.samples_topic}/{name}", resume_from=resume)
            run = Running(make_source(opts, ctx), threading.Event(), threading.Thread())
            run.thread = threading.Thread(target=self._loop, args=(name, run), name=f"source-{name}",
                                          daemon=True)
            self.running[name] = run
            run.thread.start()

    def stop(self, names: list[str] | None = None, timeout: float = 5.0) -> list[str]:
        """Stop ``names`` (default all) and wait for their threads; return the sources still active."""
        with self.lock:
            runs = [r for n, r in self.running.items() if names is None or n in names]
        for run in runs:
            run.stop.set()
        for run in runs:
            run.thread.join(timeout)
        return self.active()

    def feed(self, name: str, payload: bytes) -> int:
        """Hand an MQTT ``samples/<name>`` message to that ``mqtt`` source, if it is running."""
        with self.lock:
            run = self.running.get(name)
        if run is None or not hasattr(run.source, "feed"):
            log.warning("samples for %r: no running mqtt source of that name", name)
            return 0
        return run.source.feed(payload)

    def _store(self, name: str, window: Window, stop: threading.Event) -> bool:
        """Store one window under the session's rules; return False when the session has enough (or on stop)."""
        if not np.isfinite(window.x).all():
            log.warning("source %s: dropped a window with non-finite values", name)
            return True
        with self.lock:
            session = self.session
            if session.windows is not None and session.stored >= session.windows:
                return False
            session.stored += 1  # reserved now, so two sources cannot both take the last one
        delay = DISK_RETRY_MIN_S
        while True:
            try:
                self.store.add(window.x, session.label or window.label, name, session.split, window.marks)
                break
            except DiskFull as err:
                if self._make_room(name, err):
                    continue
                if self.paused is None:
                    log.error("source %s: %s; collection paused, retrying with backoff up to %.0f s", name, err,
                              DISK_RETRY_MAX_S)
                    self.paused = str(err)
                    self._changed()
                if stop.wait(delay):
                    with self.lock:
                        session.stored -= 1
                    return False
                delay = min(delay * 2, DISK_RETRY_MAX_S)
        if self.paused is not None:
            log.info("source %s: space is back; collection resumed", name)
            self.paused = None
            self._changed()
        return session.windows is None or session.stored < session.windows

    def _make_room(self, name: str, err: DiskFull) -> bool:
        """Drop the feature cache to make room; True when something went (worth trying again at once)."""
        try:
            dropped = self.store.drop_features()
        except DiskFull:
            return False
        if dropped:
            log.warning("source %s: %s; dropped %d cached features to make room", name, err, dropped)
        return dropped > 0

    def _changed(self) -> None:
        try:
            self.on_change()
        except Exception:  # a status that cannot be published must not stop collection
            log.exception("reporting a collection change failed")

    def _loop(self, name: str, run: Running) -> None:
        try:
            self._run_source(name, run)
        finally:
            run.stop.set()  # ends active() for it even before the thread is gone
            self._changed()

    def _run_source(self, name: str, run: Running) -> None:
        delay = RETRY_MIN_S
        while not run.stop.is_set():
            try:
                run.source.setup()
                for window in model_inputs(run.source, run.stop, self.window_length):
                    if not self._store(name, window, run.stop):
                        if run.stop.is_set():
                            return
                        log.info("source %s: collection session complete; stopping all sources", name)
                        with self.lock:
                            for other in self.running.values():
                                other.stop.set()
                        return
                log.info("source %s: no more samples", name)
                return
            except OSError as err:
                run.errors.append(str(err))
                log.error("source %s failed: %s; retrying in %.0f s", name, err, delay)
                run.stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            except Exception as err:  # data errors: retrying would fail the same way
                run.errors.append(str(err))
                log.error("source %s stopped: %s", name, err)
                return
            finally:
                try:
                    run.source.cleanup()
                except Exception:
                    log.exception("source %s: cleanup failed", name)
