"""The SQLite store on a real file: WAL mode, class-balanced splits and retention, relabelling, the feature
cache keyed by bundle hash, the bounded outbox."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from device_app.store import OUTBOX_LIMIT, Store


def _window(v: float) -> np.ndarray:
    return np.full((4, 3), v, np.float32)


def test_wal_mode_and_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", val_fraction=0.0)
    ids = [store.add(_window(i), "a" if i % 2 else "b", "src") for i in range(6)]
    with sqlite3.connect(tmp_path / "s.sqlite") as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    index = store.split_index("train", ["b", "a"])
    assert list(index.ids) == ids and list(index.y) == [0, 1, 0, 1, 0, 1]
    x = store.windows(index.ids[[3, 0, 3]])  # in the order asked, repeats allowed
    assert x.shape == (3, 4, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], _window(3))
    np.testing.assert_array_equal(x[1], _window(0))
    assert len(store.split_index("train", ["zzz"])) == 0
    assert len(store.split_index("all", ["a"])) == 3


def test_val_split_is_class_balanced(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", val_fraction=0.25)
    for i in range(40):
        store.add(_window(i), "a", "src")
    for i in range(8):
        store.add(_window(i), "b", "src")
    by_label = store.counts()["by_label"]
    assert by_label == {"a": {"train": 30, "val": 10}, "b": {"train": 6, "val": 2}}


def test_retention_drops_oldest_of_the_largest_class(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", max_samples=10, val_fraction=0.0)
    for i in range(8):
        store.add(_window(i), "walk", "src")
    for i in range(8):
        store.add(_window(100 + i), "idle", "src")
    for i in range(3):
        store.add(_window(200 + i), None, "src")
    counts = store.counts()
    assert counts["total"] == 10
    # 8 walk + 8 idle settle at 5 + 5; each unlabelled window then costs the largest class (ties: by name)
    assert {k: v["train"] for k, v in counts["by_label"].items()} == {"walk": 4, "idle": 3, "": 3}
    walk = store.windows(store.split_index("train", ["walk"]).ids)
    assert [float(x[0, 0]) for x in walk] == [4.0, 5.0, 6.0, 7.0]  # the oldest went


def test_retention_prefers_unlabelled_on_a_tie(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", max_samples=10, val_fraction=0.0)
    for i in range(5):
        store.add(_window(i), "walk", "src")
        store.add(_window(i), None, "src")
    store.add(_window(9), "walk", "src")  # walk 6 is the largest: walk goes
    assert {k: v["train"] for k, v in store.counts()["by_label"].items()} == {"walk": 5, "": 5}
    store.add(_window(11), "idle", "src")  # walk 5 vs unlabelled 5: unlabelled goes
    assert {k: v["train"] for k, v in store.counts()["by_label"].items()} == {"walk": 5, "": 4, "idle": 1}


def test_relabel_by_ids_and_last(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", val_fraction=0.0)
    ids = [store.add(_window(i), None, "src") for i in range(5)]
    assert store.relabel(ids[:2], None, "a") == 2
    assert store.relabel(None, 2, "b") == 2
    counts = store.counts()["by_label"]
    assert counts["a"]["train"] == 2 and counts["b"]["train"] == 2 and counts[""]["train"] == 1


def test_feature_cache_is_keyed_by_bundle_hash(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", val_fraction=0.0)
    ids = np.array([store.add(_window(i), "a", "src") for i in range(3)])
    feats = np.arange(6, dtype=np.float32).reshape(3, 2)
    store.put_features(ids, feats, "sha-one")
    cached = store.cached_features(ids, "sha-one")
    np.testing.assert_array_equal(cached[int(ids[1])], feats[1])
    assert store.cached_features(ids, "sha-two") == {}
    assert store.invalidate_features("sha-two") == 3
    assert store.cached_features(ids, "sha-one") == {}


def test_outbox_is_bounded_and_survives_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    for i in range(OUTBOX_LIMIT + 5):
        store.outbox_put("t/report", f"{i}".encode(), 1, True)
    store.close()
    items = Store(tmp_path / "s.sqlite").outbox()
    assert len(items) == OUTBOX_LIMIT
    assert items[0].payload == b"5" and items[-1].payload == str(OUTBOX_LIMIT + 4).encode()
    assert items[0].retain is True and items[0].qos == 1
