"""One process per state directory: an exclusive ``flock`` on ``<state_dir>/daemon.lock`` holding the owner's PID.

Two daemons on one state directory would share the MQTT client id (the broker then throws each out in turn),
write the same store and checkpoints, and answer requests twice. The lock is taken before anything else is
opened and lasts as long as the process (the kernel releases it when the process dies, even by SIGKILL, so a
stale lock file never blocks a restart). ``hosvd-device train`` takes it too.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

LOCK_FILE = "daemon.lock"


class StateDirBusy(RuntimeError):
    """Another process holds the state directory; the message names its PID."""


class StateLock:
    """Exclusive lock on a state directory, as a context manager (or :meth:`acquire`/:meth:`release`).

    Args:
        state_dir: the directory (created if missing).
        purpose: what the holder is doing, written next to its PID (``hosvd-device run``).
    """

    def __init__(self, state_dir: str | os.PathLike[str], purpose: str = "hosvd-device") -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self.purpose = purpose
        self.fd: int | None = None

    def holder(self) -> str:
        """What the lock file says about its holder (``PID 1234 (hosvd-device run)``), or ``unknown``."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return "unknown"
        pid, _, purpose = text.partition(" ")
        return f"PID {pid} ({purpose})" if pid.isdigit() else "unknown"

    def acquire(self) -> None:
        """Take the lock now or fail.

        Raises:
            StateDirBusy: another process holds it (the message names its PID).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirBusy(f"state directory {self.path.parent} is in use by {self.holder()}: only one "
                               f"hosvd-device may use it at a time (lock {self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.purpose}\n".encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        """Give the lock up (the file stays; an unlocked file means nobody holds it)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
