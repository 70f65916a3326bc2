"""SQLite store (WAL mode): labelled windows with splits, the frozen-prefix feature cache, the outbox.

The daemon writes windows while a training child reads them (and fills the feature cache) through its own
connection: WAL lets one writer and many readers work at once, and ``busy_timeout`` absorbs short write
contention. Every public method is one transaction. The size is bounded by ``max_samples`` with a
class-balanced retention rule: the most numerous class (unlabelled windows count as one class and go first on
ties) loses its oldest window.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

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
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
OUTBOX_LIMIT = 1000


@dataclass(frozen=True)
class OutboxItem:
    """A message waiting for the broker."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class Dataset:
    """Windows of one split: ids ``(N,)``, ``x`` ``(N, *input_shape)`` float32, ``y`` ``(N,)`` int32."""

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _blob(a: np.ndarray) -> tuple[str, bytes]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return json.dumps(list(a.shape)), a.tobytes()


def _array(shape: str, blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32).reshape(json.loads(shape))


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
        self.max_samples = max_samples
        self.val_fraction = val_fraction
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

    def _tx(self, sql: str, args: Iterable = ()) -> sqlite3.Cursor:
        return self.db.execute(sql, tuple(args))

    # --- samples -------------------------------------------------------------------------------------------

    def _auto_split(self, label: str | None) -> str:
        if label is None or self.val_fraction <= 0:
            return "train"
        n, n_val = self._tx("SELECT COUNT(*), COALESCE(SUM(split = 'val'), 0) FROM samples WHERE label = ?",
                            [label]).fetchone()
        return "val" if n_val < self.val_fraction * (n + 1) - 1e-9 else "train"

    def add(self, x: np.ndarray, label: str | None, source: str, split: str = "auto") -> int:
        """Store one window and apply retention; return its id.

        Args:
            x: the window, model input shape.
            label: class name or ``None``.
            source: the source's name.
            split: ``train``, ``val`` or ``auto`` (class-balanced ``val_fraction``).
        """
        shape, blob = _blob(x)
        with self.lock:
            self._tx("BEGIN IMMEDIATE")
            try:
                split = self._auto_split(label) if split == "auto" else split
                cur = self._tx("INSERT INTO samples (created, source, label, split, shape, x) "
                               "VALUES (?, ?, ?, ?, ?, ?)", [time.time(), source, label, split, shape, blob])
                self._retain()
                self._tx("COMMIT")
            except BaseException:
                self._tx("ROLLBACK")
                raise
        return int(cur.lastrowid)

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
        with self.lock:
            self._tx("BEGIN IMMEDIATE")
            try:
                if ids is None:
                    rows = self._tx("SELECT id FROM samples ORDER BY id DESC LIMIT ?", [last or 0]).fetchall()
                    ids = [r[0] for r in rows]
                changed = 0
                for sid in ids:
                    split = self._auto_split(label)
                    changed += self._tx("UPDATE samples SET label = ?, split = ? WHERE id = ?",
                                        [label, split, sid]).rowcount
                self._tx("COMMIT")
            except BaseException:
                self._tx("ROLLBACK")
                raise
        return changed

    def counts(self) -> dict[str, object]:
        """``{"total": n, "by_label": {label: {"train": n, "val": n}}}`` (unlabelled under ``""``)."""
        with self.lock:
            return window_counts(self.db)

    def dataset(self, split: str, labels: list[str]) -> Dataset:
        """Labelled windows of ``split`` (``train``, ``val`` or ``all``) whose label is in ``labels``.

        ``y`` is the index of the label in ``labels`` (the bundle's label order).
        """
        where = "" if split == "all" else "AND split = ?"
        args: list[object] = [] if split == "all" else [split]
        with self.lock:
            rows = self._tx(f"SELECT id, label, shape, x FROM samples WHERE label IS NOT NULL {where} "
                            "ORDER BY id", args).fetchall()
        index = {name: i for i, name in enumerate(labels)}
        rows = [r for r in rows if r[1] in index]
        if not rows:
            return Dataset(np.zeros(0, np.int64), np.zeros((0,), np.float32), np.zeros(0, np.int32))
        ids = np.array([r[0] for r in rows], np.int64)
        x = np.stack([_array(r[2], r[3]) for r in rows])
        y = np.array([index[r[1]] for r in rows], np.int32)
        return Dataset(ids, x, y)

    # --- feature cache -------------------------------------------------------------------------------------

    def cached_features(self, ids: np.ndarray, bundle_sha: str) -> dict[int, np.ndarray]:
        """Cached prefix outputs of ``ids`` computed with the bundle whose model hash is ``bundle_sha``."""
        with self.lock:
            rows = self._tx("SELECT sample_id, shape, f FROM features WHERE bundle_sha = ?",
                            [bundle_sha]).fetchall()
        wanted = set(int(i) for i in ids)
        return {r[0]: _array(r[1], r[2]) for r in rows if r[0] in wanted}

    def put_features(self, ids: np.ndarray, features: np.ndarray, bundle_sha: str) -> None:
        """Cache ``features[i]`` for window ``ids[i]`` (skipping windows deleted meanwhile)."""
        rows = [(int(i), bundle_sha, *_blob(f), int(i)) for i, f in zip(ids, features, strict=True)]
        with self.lock:
            self.db.executemany(
                "INSERT OR REPLACE INTO features (sample_id, bundle_sha, shape, f) "
                "SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM samples WHERE id = ?)", rows)

    def invalidate_features(self, bundle_sha: str) -> int:
        """Drop cached features made with any other bundle; return how many rows went."""
        with self.lock:
            return self._tx("DELETE FROM features WHERE bundle_sha != ?", [bundle_sha]).rowcount

    # --- outbox --------------------------------------------------------------------------------------------

    def outbox_put(self, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        """Queue a message; the oldest go when more than :data:`OUTBOX_LIMIT` wait."""
        with self.lock:
            cur = self._tx("INSERT INTO outbox (created, topic, payload, qos, retain) VALUES (?, ?, ?, ?, ?)",
                           [time.time(), topic, payload, qos, int(retain)])
            self._tx("DELETE FROM outbox WHERE id <= ?", [cur.lastrowid - OUTBOX_LIMIT])
        return int(cur.lastrowid)

    def outbox(self) -> list[OutboxItem]:
        with self.lock:
            rows = self._tx("SELECT id, topic, payload, qos, retain FROM outbox ORDER BY id").fetchall()
        return [OutboxItem(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows]

    def outbox_done(self, item_id: int) -> None:
        with self.lock:
            self._tx("DELETE FROM outbox WHERE id = ?", [item_id])

    # --- meta ----------------------------------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self.lock:
            row = self._tx("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.lock:
            self._tx("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [key, value])
