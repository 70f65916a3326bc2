"""The daemon under a fake systemd: a datagram socket as NOTIFY_SOCKET receives READY=1 once the bundle is
probed and MQTT is connected, STATUS= lines, WATCHDOG=1 that keep coming while a training child runs, and
STOPPING=1 on SIGTERM; and a main loop that gets stuck stops the WATCHDOG=1 pings (systemd would restart it)."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from pathlib import Path

from conftest import idle, wait_until

WATCHDOG_USEC = "1000000"  # WatchdogSec=1s: a ping every 0.5 s


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

    def texts(self) -> list[str]:
        return [m for _, m in self.messages]

    def idle_after_training(self) -> bool:
        texts = self.texts()
        training = next((i for i, m in enumerate(texts) if m.startswith("STATUS=training;")), None)
        return training is not None and any(m.startswith("STATUS=idle") for m in texts[training:])

    def pings_after(self, prefix: str) -> int:
        """How many WATCHDOG=1 arrived after the first message starting with ``prefix`` (0 before it came)."""
        start = next((t for t, m in self.messages if m.startswith(prefix)), None)
        return 0 if start is None else sum(t > start for t in self.pings())

    def pings(self) -> list[float]:
        """Arrival times of the WATCHDOG=1 messages so far."""
        return [t for t, m in self.messages if m == "WATCHDOG=1"]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def test_ready_status_watchdog_and_stopping(broker, client_factory, device_factory, tmp_path: Path) -> None:
    address = str(tmp_path / "notify")
    systemd = FakeSystemd(address)
    try:
        dev = device_factory(broker.port).start(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": WATCHDOG_USEC})
        cl = client_factory(broker.port)
        cl.wait("status", idle, timeout=60)
        # A job that outlasts any machine's speed, stopped once the watchdog has pinged during it: a fixed number of
        # steps either ends inside one ping period on a fast machine or takes minutes under emulation.
        assert cl.request("train", {"transaction": "sd", "steps": 1_000_000})["status"] == "ok"
        wait_until(lambda: systemd.pings_after("STATUS=training;") >= 3, 60, "three pings while training")
        assert cl.request("stop")["status"] == "ok"
        cl.wait("report", lambda p: p.get("transaction") == "sd", timeout=120)
        wait_until(systemd.idle_after_training, 30, "STATUS=idle after STATUS=training")
        after_training = len(systemd.pings())
        wait_until(lambda: len(systemd.pings()) >= after_training + 2, 30, "two pings after training")
        assert dev.stop() == 0
        wait_until(lambda: "STOPPING=1" in systemd.texts(), 10, "STOPPING=1")
    finally:
        systemd.close()
    texts = systemd.texts()
    assert texts.count("READY=1") == 1
    assert any(m.startswith("STATUS=idle; bundle imu_hosvd") for m in texts)
    training = [t for t, m in systemd.messages if m.startswith("STATUS=training;")]
    back_to_idle = [t for t, m in systemd.messages if m.startswith("STATUS=idle") and training and t > training[0]]
    assert training and back_to_idle
    pings = systemd.pings()
    assert any(training[0] < t < back_to_idle[0] for t in pings), "no WATCHDOG=1 while the training child ran"
    assert max(b - a for a, b in itertools.pairwise(pings)) < 1.0, "a gap longer than WatchdogSec"
    assert "STOPPING=1" in texts[-3:]


# The real daemon, with its main loop wedged (in Daemon.state, called from the main thread only) once the file
# named by the first argument exists; everything else stays as it is.
WEDGED_MAIN_LOOP = """
import sys, threading, time
from pathlib import Path

from device_app import cli, daemon

trigger = Path(sys.argv[1])
state = daemon.Daemon.state


def state_or_hang(self):
    if threading.current_thread() is threading.main_thread() and trigger.exists():
        time.sleep(3600)
    return state(self)


daemon.Daemon.state = state_or_hang
sys.exit(cli.main(sys.argv[2:]))
"""

STUCK = "watchdog health check says the daemon is stuck"


def test_a_stuck_main_loop_stops_the_watchdog_pings(broker, client_factory, device_factory, tmp_path: Path) -> None:
    address = str(tmp_path / "notify")
    trigger = tmp_path / "wedge"
    systemd = FakeSystemd(address)
    dev = device_factory(broker.port)
    try:
        dev.start(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": WATCHDOG_USEC},
                  entry=["-c", WEDGED_MAIN_LOOP, str(trigger)])
        cl = client_factory(broker.port)
        cl.wait("status", idle, timeout=60)
        started = len(systemd.pings())
        wait_until(lambda: len(systemd.pings()) >= started + 2, 30, "pings while the main loop goes round")
        assert STUCK not in dev.log()

        trigger.touch()
        wait_until(lambda: STUCK in dev.log(), 30, "the watchdog noticing the stuck main loop",
                   lambda: dev.log()[-2000:])
        pings_when_stuck = len(systemd.pings())
        wait_until(lambda: dev.log().count(STUCK) >= 4, 30, "three more withheld pings")
        assert len(systemd.pings()) == pings_when_stuck, "WATCHDOG=1 sent while the main loop was stuck"
        assert cl.request("status")["status"] == "ok"  # only the main loop is stuck; the dispatcher answers
        assert dev.alive()
    finally:
        dev.kill()
        systemd.close()
