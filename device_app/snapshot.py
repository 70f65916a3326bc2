"""The daemon's state at a glance, without MQTT: ``<state_dir>/daemon-state.json`` and ``hosvd-device status``.

The daemon keeps what it last said in one small JSON file: its pid, the status it last published, the
training run in progress (transaction, steps, plan) with its latest progress, and the last report (kept
across restarts). The file is replaced atomically (written beside it, then renamed), so a reader never sees
half of it; progress is written at most every :data:`PROGRESS_EVERY_S` seconds to spare the SD card.

``hosvd-device status`` reads it, checks that the pid is still a hosvd-edge daemon, and adds what the files
say now: window counts and waiting reports from the store, opened read-only (``mode=ro`` while the daemon
runs; ``immutable=1`` when it is stopped, so that no ``-wal``/``-shm`` file is left behind owned by whoever
ran the command), and the newest checkpoint. It never writes, so it is safe while the daemon runs.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from device_app import checkpoint
from device_app.config import Config
from device_app.store import window_counts

log = logging.getLogger(__name__)
STATE_FILE = "daemon-state.json"
PROGRESS_EVERY_S = 2.0


class Snapshot:
    """Writes ``<state_dir>/daemon-state.json`` for the running daemon.

    Args:
        state_dir: the daemon's state directory; the last report of a previous run is kept.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / STATE_FILE
        previous = read_state(self.path) or {}
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {"pid": os.getpid(), "started": time.time(), "status": None, "job": None,
                                     "progress": None, "report": previous.get("report")}
        self.progress_written = 0.0
        self.warned = False
        self._write()

    def update(self, **parts: Any) -> None:
        """Replace top-level parts (``status``, ``job``, ``progress``, ``report``) and write the file."""
        with self.lock:
            self.data.update(parts)
            self._write()

    def progress(self, event: dict[str, Any]) -> None:
        """Record a progress event; written if it is a run's first, or :data:`PROGRESS_EVERY_S` after the last."""
        with self.lock:
            first = self.data["progress"] is None
            self.data["progress"] = event
            if first or time.monotonic() - self.progress_written >= PROGRESS_EVERY_S:
                self.progress_written = time.monotonic()
                self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({**self.data, "updated": time.time()}, default=str))
            os.replace(tmp, self.path)
            self.warned = False
        except OSError as err:  # a full disk must not stop the daemon; the file is only informative
            if not self.warned:
                log.warning("cannot write %s: %s (hosvd-device status will show older state)", self.path, err)
                self.warned = True
            tmp.unlink(missing_ok=True)


def read_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state file's content, or ``None`` when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def daemon_alive(pid: Any) -> bool:
    """True when ``pid`` is a running process that is a hosvd-edge daemon (not a recycled pid)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user (DynamicUser=)
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc to ask: trust the pid
    return b"device_app" in cmdline or b"hosvd-device" in cmdline


def _store_view(db_path: Path) -> dict[str, Any]:
    if not db_path.is_file():
        return {"path": str(db_path), "error": "no store yet"}
    wal = db_path.with_name(db_path.name + "-wal").exists()
    mode = "mode=ro" if wal else "immutable=1"
    try:
        db = sqlite3.connect(f"file:{quote(str(db_path))}?{mode}", uri=True, timeout=5.0)
        try:
            samples = window_counts(db)
            (outbox,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        finally:
            db.close()
    except sqlite3.Error as err:
        return {"path": str(db_path), "error": f"cannot read: {err}"}
    return {"path": str(db_path), "samples": samples, "outbox": outbox}


def look(cfg: Config) -> dict[str, Any]:
    """Everything ``hosvd-device status`` shows, as one JSON-able object (read-only).

    Returns:
        ``{"device_id", "state_file", "running", "pid", "started", "updated", "status", "job", "progress",
        "report", "store", "checkpoint"}``; ``status`` etc. are ``None`` when the daemon never ran here.
    """
    path = cfg.state_dir / STATE_FILE
    state = read_state(path) or {}
    status = state.get("status") or {}
    newest = (checkpoint.listing(checkpoint.bundle_dir(cfg.checkpoints_dir, status["sha256"]))
              if status.get("sha256") else [])
    running = daemon_alive(state.get("pid"))
    job, report = state.get("job"), state.get("report")
    if not running or (job and report and report.get("started") == job.get("started")):
        job = None  # a job noted just after its (instant) end: the report is the newer news
    return {
        "device_id": cfg.device.id, "state_file": str(path), "running": running, "pid": state.get("pid"),
        "started": state.get("started"), "updated": state.get("updated"), "status": state.get("status"),
        "job": job, "progress": state.get("progress") if job else None, "report": report,
        "store": _store_view(cfg.db_path),
        "checkpoint": {"name": newest[0][1].name, "step": newest[0][0], "kept": len(newest)} if newest else None,
    }


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, int | float) else "?"


def _num(value: Any, fmt: str = ".4f") -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


def _plan(plan: dict[str, Any] | None) -> str:
    if not plan:
        return "-"
    micro = f" (micro-batch {plan['micro_batch']})" if plan.get("mode") == "streamed" else ""
    ceiling = f" of {plan['ceiling_mb']} MiB" if plan.get("ceiling_mb") else " (no ceiling)"
    return f"batch {plan.get('batch_size')} {plan.get('mode')}{micro}, needs {plan.get('need_mb')} MiB{ceiling}"


def _accuracy(metrics: Any) -> str:
    return _num(metrics.get("accuracy"), ".3f") if isinstance(metrics, dict) else "-"


def render(view: dict[str, Any]) -> str:
    """The human-readable form of :func:`look`'s result."""
    status = view["status"] or {}
    lines = []
    if view["running"]:
        lines.append(f"{view['device_id']}: running (pid {view['pid']}, since {_when(view['started'])}), "
                     f"state {status.get('state', '?')}")
    elif view["status"] is None:
        lines.append(f"{view['device_id']}: no daemon has run with this state directory ({view['state_file']})")
    else:
        lines.append(f"{view['device_id']}: not running (last seen {_when(view['updated'])}, state "
                     f"{status.get('state', '?')})")
    if status:
        bundle = status.get("bundle")
        if status.get("sha256"):
            lines.append(f"bundle {bundle} ({status.get('model_name')}, sha256 {status['sha256'][:12]}…), "
                         f"runtime {status.get('runtime') or '?'}")
        else:
            lines.append(f"bundle {bundle}: not loaded ({status.get('error')})")
    ckpt = view["checkpoint"]
    lines.append(f"checkpoint: {ckpt['name']} (step {ckpt['step']}, {ckpt['kept']} kept)" if ckpt
                 else "checkpoint: none (the bundle's initial weights)")
    store = view["store"]
    if "error" in store:
        lines.append(f"store {store['path']}: {store['error']}")
    else:
        samples = store["samples"]
        totals = {s: sum(c[s] for c in samples["by_label"].values()) for s in ("train", "val")}
        lines.append(f"store {store['path']}: {samples['total']} windows (train {totals['train']}, "
                     f"val {totals['val']}); {store['outbox']} report(s) waiting for the broker")
        for label, counts in sorted(samples["by_label"].items()):
            lines.append(f"  {label or '(unlabelled)':<16} train {counts['train']:>6}  val {counts['val']:>6}")
    if view["running"] and status.get("collecting"):
        label = f" (label {status['collect_label']})" if status.get("collect_label") else ""
        lines.append(f"collecting: {', '.join(status['collecting'])}{label}")
    job, progress = view["job"], view["progress"]
    if job:
        lines.append(f"training (transaction {job.get('transaction')!r}, started {_when(job.get('started'))}): "
                     + (f"step {progress['step']}/{progress['total']}, loss {_num(progress.get('loss'))}, "
                        f"child RSS {_num(progress.get('rss_mb'), '.1f')} MiB, {_num(progress.get('elapsed'), '.1f')} s"
                        if progress else f"starting, {job.get('steps')} steps"))
        lines.append(f"  plan: {_plan(job.get('plan'))}")
    report = view["report"]
    if report:
        lines.append(f"last report (transaction {report.get('transaction')!r}, finished "
                     f"{_when(report.get('finished'))}): {report.get('status')}, {report.get('steps_done', 0)} steps, "
                     f"loss {_num(report.get('first_loss'))} -> {_num(report.get('final_loss'))}, validation "
                     f"accuracy {_accuracy(report.get('val_before'))} -> {_accuracy(report.get('val_after'))}")
        if report.get("reason") or report.get("error"):
            lines.append(f"  {report.get('reason') or report.get('error')}")
        ceiling = f"{report['ram_ceiling_mb']} MiB" if report.get("ram_ceiling_mb") else "none"
        lines.append(f"  peak RSS {_num(report.get('peak_rss_mb'), '.1f')} MiB (ceiling {ceiling}), plan "
                     f"{_plan(report.get('plan'))}, {_num(report.get('elapsed_s'), '.2f')} s")
    else:
        lines.append("last report: none yet")
    return "\n".join(lines)
