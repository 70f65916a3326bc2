"""Replay of Edge Impulse style CSV files: ``timestamp`` (ms) + one column per axis, optional ``label``.

``path`` is one file or a directory (every ``*.csv`` in name order). The window label comes from the
source's ``label`` option, else a ``label`` column, else (with ``label_from_filename``) the file name up to
its first dot, as Edge Impulse names exports (``walking.1.csv``).

A replay resumes, it does not repeat: every sample carries the mark ``("csv:<sha256 of the file>", rows read)``,
the store keeps the marks of each stored window, and a new start (daemon restart, ``reload``) skips the rows
already in stored windows. A file is known by its content, so a renamed copy is not replayed again and an edited
file is a new recording. ``collect`` with ``"replay": true`` plays the files from the start again, as does each
new pass with ``loop = true``.
"""

from __future__ import annotations

import csv
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from device_app.schema import spec
from device_app.sources.base import Sample, SourceOptions
from device_app.sources.base import Source as BaseSource
from hosvd_contract import file_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Options(SourceOptions):
    path: str = spec(doc="CSV file, or a directory of them")
    pacing: str = spec("realtime", doc="realtime follows the timestamps; fast replays at once",
                       choices=["realtime", "fast"])
    speed: float = spec(1.0, doc="realtime speed-up factor", min=0.001)
    loop: bool = spec(False, doc="start again after the last file")
    columns: list[str] | None = spec(  # noqa: RUF009 - spec() copies list defaults
        None, doc="value columns in model channel order; default the model's channel names if the header "
                  "has them, else every value column")
    label_from_filename: bool = spec(False, doc="label = file name up to the first dot if there is no label")


class CsvError(ValueError):
    """A CSV file that does not fit the model (missing columns, bad numbers)."""


def value_columns(header: list[str], wanted: list[str] | None, channels: list[str]) -> list[str]:
    """The columns to read, in model channel order.

    Raises:
        CsvError: a wanted column is missing, or the count differs from the model's channels.
    """
    present = [h for h in header if h not in ("timestamp", "label")]
    if wanted is None:
        wanted = channels if all(c in header for c in channels) else present
    missing = [c for c in wanted if c not in header]
    if missing:
        raise CsvError(f"columns {missing} are not in the header {header}")
    if len(wanted) != len(channels):
        raise CsvError(f"{len(wanted)} value columns {wanted}, the model wants {len(channels)} {channels}")
    return wanted


def read_rows(path: Path, wanted: list[str] | None, channels: list[str],
              default_label: str | None) -> Iterator[Sample]:
    """Samples of one CSV file, ``t`` in seconds from the ``timestamp`` column (``None`` if absent: the rows
    are then taken to be at the model's rate)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        cols = value_columns(header, wanted, channels)
        for i, row in enumerate(reader, start=2):
            try:
                t = float(row["timestamp"]) / 1000.0 if "timestamp" in row else None
                values = tuple(float(row[c]) for c in cols)
            except (TypeError, ValueError) as err:
                raise CsvError(f"{path}:{i}: not a number ({err})") from err
            label = (row.get("label") or "").strip() or default_label
            yield Sample(t, values, label)


class Source(BaseSource):
    """Reads the files row by row, sleeping between rows in ``realtime`` pacing."""

    options: Options

    def files(self) -> list[Path]:
        root = Path(self.options.path)
        files = sorted(root.glob("*.csv")) if root.is_dir() else [root]
        if not files or not files[0].is_file():
            raise CsvError(f"no CSV file at {root}")
        return files

    def setup(self) -> None:
        self.files()

    def samples(self, stop: threading.Event) -> Iterator[Sample]:
        opts = self.options
        first_pass = True
        while not stop.is_set():
            for file in self.files():
                key = f"csv:{file_sha256(file)}"
                skip = self.context.resume_from(key) if first_pass else 0
                if skip:
                    log.info("source %s: %s: resuming after row %d (already in stored windows)", opts.name,
                             file.name, skip)
                name_label = file.name.split(".")[0] if opts.label_from_filename else None
                start_wall, start_t = time.monotonic(), None
                rows = read_rows(file, opts.columns, self.context.channels, name_label)
                for n, sample in enumerate(rows, start=1):
                    if stop.is_set():
                        return
                    if n <= skip:
                        continue
                    if opts.pacing == "realtime":
                        start_t = sample.t if start_t is None else start_t
                        delay = start_wall + (sample.t - start_t) / opts.speed - time.monotonic()
                        if delay > 0 and stop.wait(delay):
                            return
                    label = opts.label or sample.label
                    yield Sample(sample.t, sample.values, label, (key, n))
            if not opts.loop:
                return
            first_pass = False
