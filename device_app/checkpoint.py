"""Atomic checkpoints of every bundle variable (weights, optimizer slots, compression state) plus metadata.

A checkpoint is ``ckpt-<step>.npz`` in a directory per bundle hash (``<checkpoints_dir>/<sha256[:16]>``), so
a checkpoint is only ever restored into the model it came from. Writing goes to a hidden temp file, which is
flushed and fsynced, renamed over the final name, and then the directory is fsynced: a crash (SIGKILL, power
loss) at any point leaves either the previous set of checkpoints or the new one, never a torn file. The newest
``keep`` are kept. Loading walks from the newest and skips any file that does not read back completely.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
META_KEY = "__meta__"
NAME = re.compile(r"ckpt-(\d{9})\.npz")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back: every variable by manifest name, and the metadata written with it."""

    path: Path
    step: int
    weights: dict[str, np.ndarray]
    meta: dict[str, Any]


def bundle_dir(root: str | os.PathLike[str], bundle_sha: str) -> Path:
    """The checkpoint directory of the bundle whose model hash is ``bundle_sha``."""
    return Path(root) / bundle_sha[:16]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_npz(final: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``final`` atomically: a temp file beside it (named so :func:`remove_stale_temp` knows
    it), fsync, rename. A full disk or SIGTERM's SystemExit leaves no partial file behind."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save(directory: str | os.PathLike[str], step: int, weights: dict[str, np.ndarray], meta: dict[str, Any],
         keep: int = 3) -> Path:
    """Write a checkpoint atomically and prune to the newest ``keep``.

    Args:
        directory: the bundle's checkpoint directory (created if missing).
        step: global optimizer step (names and orders the files).
        weights: every variable from ``get_weights``.
        meta: JSON-serialisable metadata (bundle hash, metrics, time).
        keep: how many checkpoints to keep.

    Returns:
        The final path.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{step:09d}.npz"
    write_npz(final, {**weights, META_KEY: np.frombuffer(json.dumps({**meta, "step": step}).encode(), np.uint8)})
    _fsync_dir(root)
    log.info("Saved checkpoint %s", final)
    prune(root, keep)
    return final


def listing(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints in ``directory``, newest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME.fullmatch(p.name))]
    return sorted(found, reverse=True)


def prune(directory: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints and leftover temp files of dead writers."""
    root = Path(directory)
    for _, path in listing(root)[keep:]:
        path.unlink(missing_ok=True)
    remove_stale_temp(root)


def _running(pid: int) -> bool:
    """True when ``pid`` is a live process (a zombie left by a killed writer does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def remove_stale_temp(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temp files left by writers that died mid-write (their pid is gone); return them."""
    removed = []
    for tmp in Path(directory).glob(".ckpt-*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def read(path: Path) -> Checkpoint:
    """Read one checkpoint completely.

    Raises:
        ValueError: the file is truncated, not an npz, or has no metadata.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.array(data[k]) for k in data.files}
    except Exception as err:  # zipfile.BadZipFile, EOFError, OSError, ValueError: all mean "unreadable"
        raise ValueError(f"checkpoint {path} is unreadable: {err}") from err
    if META_KEY not in arrays:
        raise ValueError(f"checkpoint {path} has no metadata")
    meta = json.loads(arrays.pop(META_KEY).tobytes())
    return Checkpoint(path, int(meta["step"]), arrays, meta)


def latest(directory: str | os.PathLike[str], names: set[str] | None = None) -> Checkpoint | None:
    """The newest checkpoint that reads back (and holds exactly ``names`` when given), else ``None``."""
    for _, path in listing(directory):
        try:
            ckpt = read(path)
        except ValueError as err:
            log.warning("skipping %s", err)
            continue
        if names is not None and set(ckpt.weights) != names:
            log.warning("skipping checkpoint %s: its variables do not match the bundle", path)
            continue
        return ckpt
    return None


def discard(path: Path) -> Path:
    """Move one checkpoint out of the listing (``*.rolled-back``, kept to inspect); return its new path."""
    target = path.with_name(f"{path.name}.{int(time.time())}.rolled-back")
    os.replace(path, target)
    _fsync_dir(path.parent)
    return target


def discard_latest(directory: str | os.PathLike[str]) -> Path | None:
    """Roll back one checkpoint: :func:`discard` the newest; ``None`` when there is none."""
    found = listing(directory)
    return discard(found[0][1]) if found else None
