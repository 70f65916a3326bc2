"""The daemon under a fake systemd: a datagram socket as NOTIFY_SOCKET receives READY=1 once the bundle is
probed and MQTT is connected, STATUS= lines, WATCHDOG=1 that keep coming while a training child runs, and
STOPPING=1 on SIGTERM."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from pathlib import Path

from conftest import idle


class FakeSystemd:
    """Reads the notify socket continuously, as systemd does (an unread AF_UNIX datagram queue blocks senders)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def test_ready_status_watchdog_and_stopping(broker, client_factory, device_factory, tmp_path: Path) -> None:
    address = str(tmp_path / "notify")
    systemd = FakeSystemd(address)
    try:
        dev = device_factory(broker.port).start(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
        cl = client_factory(broker.port)
        cl.wait("status", idle, timeout=60)
        assert cl.request("train", {"transaction": "sd", "steps": 30})["status"] == "ok"
        cl.wait("report", lambda p: p.get("transaction") == "sd", timeout=120)
        time.sleep(1.0)
        assert dev.stop() == 0
        time.sleep(0.3)
    finally:
        systemd.close()
    messages = systemd.messages
    texts = [m for _, m in messages]
    assert texts.count("READY=1") == 1
    assert any(m.startswith("STATUS=idle; bundle imu_hosvd") for m in texts)
    assert any(m.startswith("STATUS=training;") for m in texts)
    pings = [t for t, m in messages if m == "WATCHDOG=1"]
    assert len(pings) >= 4 and max(b - a for a, b in itertools.pairwise(pings)) < 0.4
    assert texts[-1] == "STOPPING=1" or "STOPPING=1" in texts[-3:]
