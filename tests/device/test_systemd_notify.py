"""sd_notify client against a real AF_UNIX datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import pytest
from conftest import wait_until

from device_app.systemd_notify import Notifier, start_watchdog_thread, watchdog_interval


@pytest.fixture
def receiver(tmp_path):
    """A bound datagram socket in tmp_path, like systemd's /run/systemd/notify. Yields (socket, path)."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield sock, str(path)
    sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on the socket, without blocking."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return messages


def test_every_call_is_a_noop_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    assert notifier.ready() is False
    assert notifier.status("idle") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert start_watchdog_thread(notifier, threading.Event()) is None


def test_empty_notify_socket_is_a_noop(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert not Notifier().enabled
    assert Notifier().ready() is False


@pytest.mark.parametrize(
    ("send", "payload"),
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.ready("idle, bundle har-v3"), b"READY=1\nSTATUS=idle, bundle har-v3"),
        (lambda n: n.status("training step 3/10"), b"STATUS=training step 3/10"),
        (lambda n: n.status("two\nlines"), b"STATUS=two lines"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.notify("STATUS=x\nERRNO=5"), b"STATUS=x\nERRNO=5"),
    ],
)
def test_messages_arrive_with_exact_payloads(receiver, monkeypatch, send, payload):
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier()
    assert notifier.enabled
    assert send(notifier) is True
    assert sock.recv(4096) == payload
    assert drain(sock) == []


def test_one_socket_serves_many_messages(receiver):
    sock, path = receiver
    notifier = Notifier(environ={"NOTIFY_SOCKET": path})
    for i in range(5):
        notifier.status(f"step {i}")
    notifier.watchdog()
    assert [sock.recv(4096) for _ in range(6)] == [f"STATUS=step {i}".encode() for i in range(5)] + [
        b"WATCHDOG=1"
    ]


def test_abstract_socket_address_with_at_prefix():
    name = f"hosvd-edge-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    try:
        notifier = Notifier(environ={"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready() is True
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_relative_notify_socket_is_rejected():
    with pytest.raises(ValueError, match="absolute path or start with '@'"):
        Notifier(environ={"NOTIFY_SOCKET": "run/notify"})


def test_send_failure_is_logged_not_raised_unless_debug(tmp_path, caplog):
    missing = str(tmp_path / "nobody-listens.sock")
    with caplog.at_level(logging.WARNING, logger="device_app.systemd_notify"):
        assert Notifier(environ={"NOTIFY_SOCKET": missing}).ready() is False
    assert "sd_notify" in caplog.text and "READY=1" in caplog.text
    with pytest.raises(OSError):
        Notifier(environ={"NOTIFY_SOCKET": missing}, debug=True).ready()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": "{pid}"}, 1.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "thirty"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "main"}, None),
    ],
)
def test_watchdog_interval_parsing(env, expected):
    pid = os.getpid()
    env = {k: v.format(pid=pid, other=pid + 1) for k, v in env.items()}
    assert watchdog_interval(env) == expected


def test_watchdog_interval_reads_os_environ(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "250000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 0.25


def test_no_watchdog_thread_without_watchdog_usec(receiver, monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = Notifier(environ={"NOTIFY_SOCKET": receiver[1]})
    assert start_watchdog_thread(notifier, threading.Event()) is None


class RecordingEvent(threading.Event):
    """A stop event that records every timeout the watchdog thread waits with."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return super().wait(timeout)


class CountingCheck:
    """A health check answering ``healthy`` (or raising ``error``), counting its calls."""

    def __init__(self, healthy: bool = True, error: Exception | None = None) -> None:
        self.healthy, self.error, self.calls = healthy, error, 0

    def __call__(self) -> bool:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.healthy


def test_watchdog_thread_pings_every_half_interval_until_stopped(receiver, monkeypatch):
    sock, path = receiver
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2s -> a ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    stop = RecordingEvent()
    thread = start_watchdog_thread(Notifier(environ={"NOTIFY_SOCKET": path}), stop)
    assert thread is not None and thread.daemon and thread.is_alive()
    assert [sock.recv(4096) for _ in range(4)] == [b"WATCHDOG=1"] * 4
    stop.set()
    thread.join(timeout=5.0)
    assert not thread.is_alive()
    assert len(stop.waits) >= 4 and set(stop.waits) == {0.1}, stop.waits  # between pings: interval / 2


def test_watchdog_keeps_pinging_while_the_main_thread_computes(receiver):
    sock, path = receiver
    stop = threading.Event()
    thread = start_watchdog_thread(Notifier(environ={"NOTIFY_SOCKET": path}), stop, interval=0.1)
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # pure-Python work holding the GIL between switches
            sum(i * i for i in range(1000))
        pings = drain(sock)
    finally:
        stop.set()
        thread.join(timeout=1.0)
    assert len(pings) >= 5, pings  # 10 are due in 0.5 s at one per 0.05 s
    assert set(pings) == {b"WATCHDOG=1"}


def test_failing_health_check_withholds_pings(receiver, caplog):
    sock, path = receiver
    check = CountingCheck(healthy=False)
    stop = threading.Event()
    with caplog.at_level(logging.WARNING, logger="device_app.systemd_notify"):
        thread = start_watchdog_thread(Notifier(environ={"NOTIFY_SOCKET": path}), stop, interval=0.1, alive=check)
        try:
            wait_until(lambda: check.calls >= 3, 10, "three health checks")
            assert drain(sock) == []
            check.healthy = True
            assert sock.recv(4096) == b"WATCHDOG=1"
        finally:
            stop.set()
            thread.join(timeout=1.0)
    assert "stuck" in caplog.text


def test_health_check_that_raises_counts_as_stuck(receiver):
    sock, path = receiver
    stop = threading.Event()
    check = CountingCheck(error=RuntimeError("event loop gone"))
    thread = start_watchdog_thread(Notifier(environ={"NOTIFY_SOCKET": path}), stop, interval=0.1, alive=check)
    try:
        wait_until(lambda: check.calls >= 3, 10, "three health checks")
        assert drain(sock) == []
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(timeout=1.0)
