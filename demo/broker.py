"""An MQTT broker for the demo: an embedded amqtt broker in a child process, or an external one by address.

``embedded_broker()`` starts amqtt (MQTT 3.1.1, anonymous, no ``$SYS`` topics) as ``python -m demo.broker``
on a free port of 127.0.0.1, waits until a client can connect, and on exit terminates the child (then kills it
if it does not go). ``parse_broker("host[:port]")`` names an external broker such as Mosquitto instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_PORT = 1883


@dataclass(frozen=True)
class BrokerAddress:
    """Where clients connect."""

    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_broker(text: str) -> BrokerAddress:
    """Parse ``HOST`` or ``HOST:PORT`` (port 1883 when absent).

    Raises:
        ValueError: an empty host or a port that is not a number in 1..65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, str(DEFAULT_PORT)
    if not host:
        raise ValueError(f"broker must be HOST or HOST:PORT, got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"broker port must be a number, got {port_text!r} in {text!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"broker port must be in 1..65535, got {port}")
    return BrokerAddress(host, port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until_connectable(
    address: BrokerAddress, timeout_s: float = 15.0, child: subprocess.Popen | None = None
) -> None:
    """Block until an MQTT client can connect to ``address``.

    Args:
        address: the broker.
        timeout_s: give up after this long.
        child: the broker process, if we started it: its early exit fails at once.

    Raises:
        TimeoutError: no successful MQTT CONNECT within ``timeout_s``.
        RuntimeError: ``child`` exited before accepting connections.
    """
    import paho.mqtt.client as mqtt

    deadline = time.monotonic() + timeout_s
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            raise RuntimeError(f"the MQTT broker exited with code {child.returncode} before accepting connections")
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"demo-probe-{uuid.uuid4().hex[:8]}")
        try:
            client.connect(address.host, address.port, keepalive=5)
            client.loop_start()
            for _ in range(20):
                if client.is_connected():
                    return
                time.sleep(0.05)
            last_error = "no CONNACK"
        except OSError as err:
            last_error = str(err)
        finally:
            client.loop_stop()
            with contextlib.suppress(Exception):
                client.disconnect()
        time.sleep(0.1)
    raise TimeoutError(f"MQTT broker at {address} not reachable after {timeout_s:.0f} s: {last_error}")


def stop_process(proc: subprocess.Popen, name: str, timeout_s: float = 10.0) -> None:
    """Terminate a child process, kill it if it is still there after ``timeout_s``, and reap it."""
    if proc.poll() is not None:
        return
    log.debug("Stopping %s (pid %d)", name, proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) did not stop within %.0f s; killing it", name, proc.pid, timeout_s)
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def embedded_broker(
    host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 15.0
) -> Iterator[BrokerAddress]:
    """Run an amqtt broker in a child process for the duration of the ``with`` block.

    Args:
        host: interface to listen on.
        port: TCP port; ``None`` picks a free one.
        timeout_s: how long to wait for the broker to accept connections.

    Yields:
        The broker's address, once a client can connect.

    Raises:
        TimeoutError, RuntimeError: the broker did not come up (the child is stopped first).
    """
    address = BrokerAddress(host, port if port is not None else free_port(host))
    cmd = [sys.executable, "-m", "demo.broker", "--host", address.host, "--port", str(address.port)]
    # Own session: a terminal Ctrl-C reaches only the demo, which stops the broker last, after the device.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    log.info("Started embedded MQTT broker (amqtt, pid %d) on %s", proc.pid, address)
    try:
        wait_until_connectable(address, timeout_s, child=proc)
        yield address
    finally:
        stop_process(proc, "MQTT broker")
        log.info("Stopped embedded MQTT broker")


def broker_config(host: str, port: int) -> dict:
    """amqtt configuration: one TCP listener, anonymous clients, no ``$SYS`` publishing."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def _serve(host: str, port: int) -> None:
    """Run the broker until SIGTERM/SIGINT, then shut it down."""
    import signal

    from amqtt.broker import Broker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    broker = Broker(broker_config(host, port))
    await broker.start()
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the broker child process: ``python -m demo.broker --port N``."""
    parser = argparse.ArgumentParser(description="embedded amqtt broker for the hosvd-edge demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="broker: %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
