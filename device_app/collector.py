"""Runs the configured sources, one thread each, turning their samples into labelled windows in the store.

A collection *session* (the ``collect`` request, or ``autostart`` at start-up) may set a label and a split
for what it collects and a number of windows after which it stops. A source that fails with an ``OSError``
(a bus or file that went away) is logged with its name and set up again with backoff; a data error (a CSV
that does not fit the model) ends that source with an error in the log.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from device_app.sources import SourceOptions, make_source
from device_app.sources.base import Source, SourceContext
from device_app.store import Store
from device_app.windowing import model_inputs

log = logging.getLogger(__name__)
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0


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
    """

    def __init__(self, sources: list[SourceOptions], context: SourceContext, window_length: int, store: Store,
                 samples_topic: str = "") -> None:
        self.options = {s.name: s for s in sources}
        self.context = context
        self.window_length = window_length
        self.store = store
        self.samples_topic = samples_topic
        self.session = Session()
        self.running: dict[str, Running] = {}
        self.lock = threading.Lock()

    def active(self) -> list[str]:
        with self.lock:
            return sorted(n for n, r in self.running.items() if r.thread.is_alive())

    def unknown(self, names: list[str]) -> list[str]:
        return [n for n in names if n not in self.options]

    def start(self, names: list[str] | None = None, label: str | None = None, split: str = "auto",
              windows: int | None = None) -> list[str]:
        """Start a session on ``names`` (default all sources); return the active sources."""
        with self.lock:
            self.session = Session(label, split, windows)
        for name in names or list(self.options):
            self._start_one(name)
        return self.active()

    def autostart(self) -> list[str]:
        names = [n for n, o in self.options.items() if o.autostart]
        return self.start(names) if names else []

    def _start_one(self, name: str) -> None:
        with self.lock:
            current = self.running.get(name)
            if current and current.thread.is_alive():
                return
            opts = self.options[name]
            ctx = dataclasses.replace(self.context, topic=f"{self.samples_topic}/{name}")
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

    def _store(self, name: str, x: np.ndarray, label: str | None) -> bool:
        """Store one window under the session's rules; return False when the session has enough."""
        if not np.isfinite(x).all():
            log.warning("source %s: dropped a window with non-finite values", name)
            return True
        with self.lock:
            session = self.session
            if session.windows is not None and session.stored >= session.windows:
                return False
            session.stored += 1
        self.store.add(x, session.label or label, name, session.split)
        return session.windows is None or session.stored < session.windows

    def _loop(self, name: str, run: Running) -> None:
        delay = RETRY_MIN_S
        while not run.stop.is_set():
            try:
                run.source.setup()
                for window in model_inputs(run.source, run.stop, self.window_length):
                    if not self._store(name, window.x, window.label):
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
