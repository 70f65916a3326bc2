"""A dependency-free client for systemd's notification protocol (sd_notify).

systemd runs the daemon as ``Type=notify`` (``systemd/hosvd-device.service``) and passes the path of a
datagram socket in ``NOTIFY_SOCKET``. Each notification is one datagram of newline-separated ``KEY=VALUE``
assignments: ``READY=1`` once the daemon has loaded its bundle and connected to the broker, ``STATUS=...``
for ``systemctl status``, ``WATCHDOG=1`` at least once per ``WatchdogSec=``, ``STOPPING=1`` when shutdown
begins.

Outside systemd (a shell, tests, a container) ``NOTIFY_SOCKET`` is unset and every call is a no-op, so the
daemon never needs to know how it was started. The watchdog is pinged from a daemon thread: training runs in
a child process, so nothing the trainer does can hold that thread back; a wedged interpreter, or a failing
``alive`` check (the daemon passes one that fails when its main loop stops going round, see
``start_watchdog_thread``), stops the pings and lets systemd restart the service.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

__all__ = ["Notifier", "start_watchdog_thread", "watchdog_interval"]


def _socket_address(value: str) -> str | bytes:
    """Turns a ``NOTIFY_SOCKET`` value into an ``AF_UNIX`` address.

    Args:
        value: a filesystem path (``/run/systemd/notify``) or an abstract socket name written with a leading
            ``@`` (``@/org/freedesktop/systemd1/notify/...``).

    Returns:
        The path as given, or the abstract name as bytes with the ``@`` replaced by a NUL byte.

    Raises:
        ValueError: the value is neither an absolute path nor an abstract name.
    """
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ValueError(
        f"NOTIFY_SOCKET must be an absolute path or start with '@' (abstract socket); got {value!r}"
    )


class Notifier:
    """Sends sd_notify messages to the socket named by ``NOTIFY_SOCKET``.

    The environment is read once, at construction. Messages are sent over one ``AF_UNIX``/``SOCK_DGRAM``
    socket that is opened on first use; sending is safe from several threads (the main loop and the watchdog
    thread).

    Args:
        notify_socket: the socket address; ``None`` reads ``NOTIFY_SOCKET`` from ``environ``. An empty value
            disables the notifier.
        environ: the environment to read (default ``os.environ``).
        debug: raise ``OSError`` when a message cannot be sent, instead of logging a warning.

    Raises:
        ValueError: ``NOTIFY_SOCKET`` is set to something that is not a socket address.
    """

    def __init__(
        self,
        notify_socket: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        debug: bool = False,
    ) -> None:
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "") if notify_socket is None else notify_socket
        self._address: str | bytes | None = _socket_address(value) if value else None
        self._debug = debug
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether messages are sent at all (``NOTIFY_SOCKET`` was set)."""
        return self._address is not None

    def notify(self, message: str) -> bool:
        """Sends one raw notification.

        Args:
            message: newline-separated ``KEY=VALUE`` assignments, e.g. ``"READY=1\\nSTATUS=idle"``.

        Returns:
            True when the datagram was sent; False when the notifier is disabled or sending failed (logged).

        Raises:
            OSError: sending failed and the notifier was created with ``debug=True``.
        """
        if self._address is None:
            return False
        data = message.encode()
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.sendto(data, self._address)
        except OSError as exc:
            if self._debug:
                raise
            logger.warning("sd_notify to %r failed (%s): %r", self._address, exc, message)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tells systemd that start-up is complete (``READY=1``), optionally with a status line."""
        if status is None:
            return self.notify("READY=1")
        return self.notify(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """Sets the free-form status shown by ``systemctl status`` (``STATUS=...``, one line)."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Pings the service watchdog (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """Tells systemd that shutdown has begun (``STOPPING=1``)."""
        return self.notify("STOPPING=1")


def _one_line(text: str) -> str:
    """A newline would start a new assignment in the datagram: fold the text onto one line."""
    return " ".join(text.splitlines())


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Reads the watchdog timeout systemd set for this process.

    systemd exports ``WATCHDOG_USEC`` (microseconds) when ``WatchdogSec=`` is set, and ``WATCHDOG_PID`` with
    the main process's pid; a child that inherited the variables is not the one being watched.

    Args:
        environ: the environment to read (default ``os.environ``).

    Returns:
        The timeout in seconds, or None when there is no watchdog for this process (unset, zero, malformed, or
        ``WATCHDOG_PID`` naming another process; malformed values are logged).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            logger.warning("ignoring the watchdog: WATCHDOG_PID must be an integer pid; got %r", pid)
            return None
    try:
        value = int(usec)
    except ValueError:
        logger.warning("ignoring the watchdog: WATCHDOG_USEC must be an integer (microseconds); got %r", usec)
        return None
    if value <= 0:
        return None
    return value / 1_000_000


def start_watchdog_thread(
    notifier: Notifier,
    stop_event: threading.Event,
    *,
    interval: float | None = None,
    alive: Callable[[], bool] | None = None,
) -> threading.Thread | None:
    """Starts a daemon thread sending ``WATCHDOG=1`` every half watchdog interval until ``stop_event`` is set.

    The thread only waits on ``stop_event`` and sends datagrams, so it keeps running while the main loop is
    busy and while a training child runs; it dies with the process.

    Args:
        notifier: where the pings go.
        stop_event: set it to end the thread (at shutdown, after ``Notifier.stopping``).
        interval: the watchdog timeout in seconds; None reads it with ``watchdog_interval()``.
        alive: optional health check called before each ping; when it returns False (or raises) the ping is
            skipped, so a main loop that stopped making progress is restarted by systemd.

    Returns:
        The started thread, or None when there is nothing to do (notifier disabled or no watchdog configured).
    """
    if interval is None:
        interval = watchdog_interval()
    if not notifier.enabled or interval is None or interval <= 0:
        return None
    period = interval / 2

    def run() -> None:
        while not stop_event.is_set():
            healthy = True
            if alive is not None:
                try:
                    healthy = bool(alive())
                except Exception:
                    logger.exception("watchdog health check failed; not pinging systemd")
                    healthy = False
            if healthy:
                notifier.watchdog()
            else:
                logger.warning("watchdog health check says the daemon is stuck; not pinging systemd")
            if stop_event.wait(period):
                break

    thread = threading.Thread(target=run, name="sd-watchdog", daemon=True)
    thread.start()
    logger.debug("watchdog thread started: WATCHDOG=1 every %.3f s", period)
    return thread
