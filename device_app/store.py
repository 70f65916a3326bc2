"""SQLite store (WAL mode): labelled windows with splits, the frozen-prefix feature cache, the outbox, and how far
each replayed file got.

The daemon writes windows while a training child reads them (and fills the feature cache) through its own
connection: WAL lets one writer and many readers work at once, and ``busy_timeout`` absorbs short write
contention. Every public method that writes is one transaction. Readers never load a whole split: training asks
for the ids and labels of a split (:meth:`Store.split_index`, 12 bytes a window) and then fetches the windows
or cached features of one batch at a time (:meth:`Store.windows`, :meth:`Store.cached_features`), so a child's
memory does not grow with the store.

The size is bounded by ``max_samples`` with a class-balanced retention rule: the most numerous class
(unlabelled windows count as one class and go first on ties) loses its oldest window.

A write that finds the disk full raises :class:`DiskFull` (naming the state directory) after rolling back only
if SQLite left a transaction open: SQLite rolls back by itself on ``SQLITE_FULL``, and a second ``ROLLBACK``
would replace the real error with "cannot rollback - no transaction is active".
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    source TEXT NOT NULL,
    label TEXT,
    split TEXT NOT NULL CHECK (split IN ('train', 'val')),
    shape TEXT NOT NULL,
    x BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_label ON samples(label, split);
CREATE TABLE IF NOT EXISTS features (
    sample_id INTEGER PRIMARY KEY REFERENCES samples(id) ON DELETE CASCADE,
    bundle_sha TEXT NOT NULL,
    shape TEXT NOT NULL,
    f BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS source_progress (
    key TEXT PRIMARY KEY,
    consumed INTEGER NOT NULL,
    updated REAL NOT NULL
);
"""
OUTBOX_LIMIT = 1000
INDEX_BYTES_PER_WINDOW = 12  # an int64 id and an int32 label index (SplitIndex)
MAX_SQL_VARIABLES = 500  # ids per IN (...) query, well below SQLite's limit


class DiskFull(OSError):
    """A write failed because the file system holding the store is full; the message names the directory."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror or "disk full"


@dataclass(frozen=True)
class OutboxItem:
    """A message waiting for the broker."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class SplitIndex:
    """The labelled windows of one split, without their data: ids ``(N,)`` int64, label indices ``(N,)`` int32."""

    ids: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _blob(a: np.ndarray) -> tuple[str, bytes]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return json.dumps(list(a.shape)), a.tobytes()


def _array(shape: str, blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32).reshape(json.loads(shape))


def is_disk_full(err: BaseException) -> bool:
    """True for SQLite's ``SQLITE_FULL`` and for ``ENOSPC``/``EDQUOT`` from the file system."""
    if isinstance(err, sqlite3.Error):
        return getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(err)
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(directory: str | os.PathLike[str], what: str, err: BaseException) -> str:
    """``disk full: <what> in <directory> (<free> bytes free): <error>`` for logs, status and reports."""
    try:
        st = os.statvfs(directory)
        free = f"{st.f_bavail * st.f_frsize} bytes free"
    except OSError:
        free = "free space unknown"
    return f"disk full: {what} in {os.fspath(directory)} ({free}): {err}"


def window_counts(db: sqlite3.Connection) -> dict[str, object]:
    """Windows per label and split on any connection to a store (``hosvd-device status`` reads read-only)."""
    rows = db.execute("SELECT COALESCE(label, ''), split, COUNT(*) FROM samples GROUP BY 1, 2").fetchall()
    by_label: dict[str, dict[str, int]] = {}
    for label, split, n in rows:
        by_label.setdefault(label, {"train": 0, "val": 0})[split] = n
    return {"total": sum(r[2] for r in rows), "by_label": by_label}


class Store:
    """One SQLite file; thread-safe within a process (one connection behind a lock).

    Args:
        path: database file (created with its tables if missing).
        max_samples: windows kept (retention runs after each insert).
        val_fraction: share of each class's windows put in the ``val`` split.
    """

    def __init__(self, path: str | os.PathLike[str], max_samples: int = 5000,
                 val_fraction: float = 0.2) -> None:
        self.path = os.fspath(path)
        self.directory = str(Path(self.path).resolve().parent)
        self.max_samples = max_samples
        self.val_fraction = val_fraction
        self.disk_full: str | None = None  # the last write's disk-full message, cleared by a write that works
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=30000")
        with self.lock:
            self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _tx(self, sql: str, args: Sequence[object] = ()) -> sqlite3.Cursor:
        return self.db.execute(sql, tuple(args))

    @contextmanager
    def _write(self, what: str) -> Iterator[None]:
        """One write transaction under the lock; a full disk becomes :class:`DiskFull`, and is remembered."""
        with self.lock:
            try:
                self._tx("BEGIN IMMEDIATE")
                yield
                self._tx("COMMIT")
            except BaseException as err:
                if self.db.in_transaction:
                    try:
                        self._tx("ROLLBACK")
                    except sqlite3.Error as rollback_err:  # keep the error that matters
                        log.warning("rollback after %s failed too: %s", err, rollback_err)
                if isinstance(err, Exception) and is_disk_full(err):
                    self.disk_full = disk_full_message(self.directory, f"cannot store {what}", err)
                    raise DiskFull(self.disk_full) from err
                raise
        self.disk_full = None

    # --- samples -------------------------------------------------------------------------------------------

    def _class_counts(self, label: str) -> tuple[int, int]:
        n, n_val = self._tx("SELECT COUNT(*), COALESCE(SUM(split = 'val'), 0) FROM samples WHERE label = ?",
                            [label]).fetchone()
        return int(n), int(n_val)

    def _split_for(self, n: int, n_val: int) -> str:
        """``val`` while fewer than ``val_fraction`` of a class holding ``n`` windows (``n_val`` in val) are there."""
        return "val" if self.val_fraction > 0 and n_val < self.val_fraction * (n + 1) - 1e-9 else "train"

    def _auto_split(self, label: str | None) -> str:
        return "train" if label is None else self._split_for(*self._class_counts(label))

    def add(self, x: np.ndarray, label: str | None, source: str, split: str = "auto",
            progress: dict[str, int] | None = None) -> int:
        """Store one window and apply retention; return its id.

        Args:
            x: the window, model input shape.
            label: class name or ``None``.
            source: the source's name.
            split: ``train``, ``val`` or ``auto`` (class-balanced ``val_fraction``).
            progress: resume points reached with this window (``{key: rows consumed}``, see
                :meth:`progress`), saved in the same transaction, so a window is never stored twice.

        Raises:
            DiskFull: no space left; nothing was stored.
        """
        shape, blob = _blob(x)
        with self._write("a window"):
            split = self._auto_split(label) if split == "auto" else split
            cur = self._tx("INSERT INTO samples (created, source, label, split, shape, x) "
                           "VALUES (?, ?, ?, ?, ?, ?)", [time.time(), source, label, split, shape, blob])
            for key, consumed in (progress or {}).items():
                self._tx("INSERT OR REPLACE INTO source_progress (key, consumed, updated) VALUES (?, ?, ?)",
                         [key, consumed, time.time()])
            self._retain()
        return int(cur.lastrowid)

    def add_many(self, xs: Sequence[np.ndarray] | np.ndarray, labels: Sequence[str | None], source: str) -> int:
        """Store many windows in one transaction (class-balanced splits, retention at the end); return how many.

        Raises:
            DiskFull: no space left; nothing was stored.
        """
        counts: dict[str, list[int]] = {}
        rows = []
        now = time.time()
        with self._write(f"{len(labels)} windows"):
            for x, label in zip(xs, labels, strict=True):
                split = "train"
                if label is not None:
                    n, n_val = counts.setdefault(label, list(self._class_counts(label)))
                    split = self._split_for(n, n_val)
                    counts[label] = [n + 1, n_val + (split == "val")]
                rows.append((now, source, label, split, *_blob(x)))
            self.db.executemany("INSERT INTO samples (created, source, label, split, shape, x) "
                                "VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._retain()
        return len(rows)

    def _retain(self) -> None:
        (total,) = self._tx("SELECT COUNT(*) FROM samples").fetchone()
        while total > self.max_samples:
            # Largest class first; unlabelled (NULL) sorts first among equals.
            (label,) = self._tx("SELECT label FROM samples GROUP BY label "
                                "ORDER BY COUNT(*) DESC, label IS NOT NULL, label LIMIT 1").fetchone()
            self._tx("DELETE FROM samples WHERE id = (SELECT MIN(id) FROM samples WHERE label IS ?)", [label])
            total -= 1

    def relabel(self, ids: list[int] | None, last: int | None, label: str) -> int:
        """Set ``label`` on the windows ``ids`` or on the ``last`` newest ones; return how many changed.

        The split of a relabelled window is chosen again, class-balanced.
        """
        changed = 0
        with self._write("labels"):
            if ids is None:
                rows = self._tx("SELECT id FROM samples ORDER BY id DESC LIMIT ?", [last or 0]).fetchall()
                ids = [r[0] for r in rows]
            for sid in ids:
                split = self._auto_split(label)
                changed += self._tx("UPDATE samples SET label = ?, split = ? WHERE id = ?",
                                    [label, split, sid]).rowcount
        return changed

    def counts(self) -> dict[str, object]:
        """``{"total": n, "by_label": {label: {"train": n, "val": n}}}`` (unlabelled under ``""``)."""
        with self.lock:
            return window_counts(self.db)

    def split_index(self, split: str, labels: list[str]) -> SplitIndex:
        """Ids and label indices of the labelled windows of ``split`` (``train``, ``val`` or ``all``) whose label is
        in ``labels``, in id order; ``y`` indexes ``labels`` (the bundle's label order).

        Read from the ``(label, split)`` index alone, one label at a time in small chunks: no window data, not
        even the table's pages, and never more than a chunk of Python row objects.
        """
        where = "" if split == "all" else "AND split = ?"
        ids, ys = [np.zeros(0, np.int64)], [np.zeros(0, np.int32)]
        with self.lock:
            for k, label in enumerate(labels):
                cur = self._tx(f"SELECT id FROM samples INDEXED BY samples_label WHERE label = ? {where}",
                               [label] if split == "all" else [label, split])
                while rows := cur.fetchmany(1024):
                    ids.append(np.fromiter((r[0] for r in rows), np.int64, len(rows)))
                    ys.append(np.full(len(rows), k, np.int32))
        all_ids, all_y = np.concatenate(ids), np.concatenate(ys)
        order = np.argsort(all_ids, kind="stable")
        return SplitIndex(all_ids[order], all_y[order])

    def windows(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The windows ``ids`` as ``(len(ids), *shape)`` float32, in the order given (ids may repeat).

        Raises:
            KeyError: a window is not stored (deleted by retention, or never there).
        """
        found = self.windows_by_id(ids)
        missing = [int(i) for i in ids if int(i) not in found]
        if missing:
            raise KeyError(f"windows {missing[:5]} are not in the store")
        return np.stack([found[int(i)] for i in ids])

    def windows_by_id(self, ids: Sequence[int] | np.ndarray) -> dict[int, np.ndarray]:
        """The windows ``ids`` that are stored, by id (retention may have deleted some)."""
        return self._fetch("SELECT id, shape, x FROM samples WHERE id IN ({})", ids, "")

    def _fetch(self, sql: str, ids: Sequence[int] | np.ndarray, bundle_sha: str) -> dict[int, np.ndarray]:
        unique = sorted({int(i) for i in ids})
        out: dict[int, np.ndarray] = {}
        for start in range(0, len(unique), MAX_SQL_VARIABLES):
            chunk = unique[start:start + MAX_SQL_VARIABLES]
            query = sql.format(",".join("?" * len(chunk)))
            args = [*chunk, bundle_sha] if bundle_sha else chunk
            with self.lock:
                rows = self._tx(query, args).fetchall()
            out.update((r[0], _array(r[1], r[2])) for r in rows)
        return out

    # --- feature cache -------------------------------------------------------------------------------------

    def cached_features(self, ids: Sequence[int] | np.ndarray, bundle_sha: str) -> dict[int, np.ndarray]:
        """Cached prefix outputs of ``ids`` computed with the bundle whose model hash is ``bundle_sha``."""
        return self._fetch("SELECT sample_id, shape, f FROM features WHERE sample_id IN ({}) AND bundle_sha = ?",
                           ids, bundle_sha)

    def put_features(self, ids: Sequence[int] | np.ndarray, features: np.ndarray, bundle_sha: str) -> None:
        """Cache ``features[i]`` for window ``ids[i]`` (skipping windows deleted meanwhile).

        Raises:
            DiskFull: no space left; nothing was cached.
        """
        rows = [(int(i), bundle_sha, *_blob(f), int(i)) for i, f in zip(ids, features, strict=True)]
        with self._write("cached features"):
            self.db.executemany(
                "INSERT OR REPLACE INTO features (sample_id, bundle_sha, shape, f) "
                "SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM samples WHERE id = ?)", rows)

    def invalidate_features(self, bundle_sha: str) -> int:
        """Drop cached features made with any other bundle; return how many rows went."""
        with self._write("the feature cache"):
            return self._tx("DELETE FROM features WHERE bundle_sha != ?", [bundle_sha]).rowcount

    def drop_features(self) -> int:
        """Drop the whole feature cache (it can be computed again; windows cannot); return how many rows went."""
        with self._write("the feature cache"):
            return self._tx("DELETE FROM features").rowcount

    # --- resume points of replayed sources -----------------------------------------------------------------

    def progress(self, key: str) -> int:
        """Rows of the input ``key`` (e.g. ``csv:<sha256 of the file>``) already in stored windows; 0 if none."""
        with self.lock:
            row = self._tx("SELECT consumed FROM source_progress WHERE key = ?", [key]).fetchone()
        return int(row[0]) if row else 0

    # --- outbox --------------------------------------------------------------------------------------------

    def outbox_put(self, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        """Queue a message; the oldest go when more than :data:`OUTBOX_LIMIT` wait.

        Raises:
            DiskFull: no space left; the message was not queued.
        """
        with self._write("a report in the outbox"):
            cur = self._tx("INSERT INTO outbox (created, topic, payload, qos, retain) VALUES (?, ?, ?, ?, ?)",
                           [time.time(), topic, payload, qos, int(retain)])
            self._tx("DELETE FROM outbox WHERE id <= ?", [cur.lastrowid - OUTBOX_LIMIT])
        return int(cur.lastrowid)

    def outbox(self) -> list[OutboxItem]:
        with self.lock:
            rows = self._tx("SELECT id, topic, payload, qos, retain FROM outbox ORDER BY id").fetchall()
        return [OutboxItem(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows]

    def outbox_done(self, item_id: int) -> None:
        """Forget a delivered message.

        Raises:
            DiskFull: no space left (it stays queued and is sent again later).
        """
        with self._write("the outbox"):
            self._tx("DELETE FROM outbox WHERE id = ?", [item_id])
