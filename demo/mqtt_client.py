"""The workstation's side of the device's MQTT API (see ``docs/mqtt.md`` and DESIGN.md).

Topics under ``<base>/<device_id>``: retained ``status``, ``request/<command>`` answered on
``response/<command>`` with the request's ``transaction``, ``progress`` during training and retained
``report`` at its end. :class:`DeviceClient` subscribes to all of them, keeps the latest value per topic and
queues every message, so the demo can wait for a state, send a request and follow the progress without
callbacks of its own.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from demo.broker import BrokerAddress

log = logging.getLogger(__name__)

PROTOCOLS = {"3.1.1": "MQTTv311", "5": "MQTTv5"}


class DeviceError(RuntimeError):
    """The device answered with an error, went offline, or did not answer in time."""


@dataclass(frozen=True)
class Message:
    """A received message: topic below the device base (``status``, ``progress``, ...), parsed JSON."""

    topic: str
    payload: Any
    retained: bool


class DeviceClient:
    """An MQTT client talking to one device.

    Args:
        broker: where to connect.
        device_id: the ``<device_id>`` topic level.
        base_topic: the first topic level.
        protocol: ``"3.1.1"`` or ``"5"``.
    """

    def __init__(
        self, broker: BrokerAddress, device_id: str, base_topic: str = "hosvd-edge", protocol: str = "3.1.1"
    ) -> None:
        import paho.mqtt.client as mqtt

        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
        self.broker = broker
        self.base = f"{base_topic}/{device_id}"
        self._protocol = getattr(mqtt, PROTOCOLS[protocol])
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"hosvd-demo-{uuid.uuid4().hex[:8]}",
            protocol=self._protocol,
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._lock = threading.Condition()
        self._latest: dict[str, Message] = {}
        self._queue: queue.Queue[Message] = queue.Queue()
        self._connected = threading.Event()

    # -- connection --
    def __enter__(self) -> DeviceClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect, subscribe to ``<base>/#`` and wait for the subscription.

        Raises:
            DeviceError: no connection within ``timeout_s``.
        """
        self._client.connect(self.broker.host, self.broker.port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self.close()
            raise DeviceError(f"could not connect to the MQTT broker at {self.broker} within {timeout_s:.0f} s")

    def close(self) -> None:
        """Disconnect and stop the network thread (safe to call twice)."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.error("MQTT connect to %s refused: %s", self.broker, reason)
            return
        client.subscribe(f"{self.base}/#", qos=1)  # again after every reconnect
        self._connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        topic = msg.topic[len(self.base) + 1 :]
        try:
            payload = json.loads(msg.payload) if msg.payload else None
        except (ValueError, UnicodeDecodeError):
            log.warning("Ignoring a non-JSON message on %s", msg.topic)
            return
        message = Message(topic, payload, bool(msg.retain))
        with self._lock:
            self._latest[topic] = message
            self._lock.notify_all()
        self._queue.put(message)

    # -- reading --
    def latest(self, topic: str) -> Any:
        """The last payload seen on ``topic`` (relative to the device base), or ``None``."""
        with self._lock:
            message = self._latest.get(topic)
        return message.payload if message else None

    def wait_for(
        self,
        topic: str,
        predicate: Callable[[Any], bool],
        timeout_s: float,
        what: str = "",
        live: bool = False,
    ) -> Any:
        """Block until the latest payload on ``topic`` satisfies ``predicate``.

        Args:
            topic: below the device base.
            predicate: called with the parsed payload (under a lock: keep it short).
            timeout_s: give up after this long.
            what: for the error message.
            live: ignore messages the broker delivered as retained (left from an earlier run).

        Raises:
            DeviceError: not within ``timeout_s`` (the message shows the last payload seen).
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                message = self._latest.get(topic)
                if message is not None and not (live and message.retained) and predicate(message.payload):
                    return message.payload
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    last = message.payload if message else None
                    raise DeviceError(
                        f"timed out after {timeout_s:.0f} s waiting for {what or topic} on "
                        f"{self.base}/{topic}; last payload: {last}"
                    )
                self._lock.wait(min(remaining, 0.5))

    def wait_for_state(self, states: set[str], timeout_s: float, live: bool = False) -> dict[str, Any]:
        """Wait for the ``status`` state to be one of ``states``.

        Args:
            states: acceptable states.
            timeout_s: give up after this long.
            live: only count status messages published while we listen (not a retained one from before).

        Raises:
            DeviceError: timeout, or the device reports ``error`` (or a live ``offline``) when that was not
                asked for.
        """

        def ok(payload: Any) -> bool:
            state = payload.get("state") if isinstance(payload, dict) else None
            if state == "error" and state not in states:
                raise DeviceError(f"device {self.base} reports an error: {payload}")
            return state in states

        return self.wait_for("status", ok, timeout_s, f"state {sorted(states)}", live=live)

    def messages(self, timeout_s: float) -> Message | None:
        """The next received message in arrival order, or ``None`` after ``timeout_s``."""
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    # -- requests --
    def refusal(self, command: str, payload: dict[str, Any] | None = None, timeout_s: float = 30.0) -> str:
        """Send a request the device is expected to refuse and return its error message.

        Raises:
            DeviceError: the device accepted it, or did not answer in time.
        """
        try:
            data = self.request(command, payload, timeout_s)
        except DeviceError as err:
            prefix = f"device refused {command}: "
            if str(err).startswith(prefix):
                return str(err)[len(prefix):]
            raise
        raise DeviceError(f"the device accepted {command} where a refusal was expected: {data}")

    def request(self, command: str, payload: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
        """Send ``request/<command>`` and wait for the matching ``response/<command>``.

        Args:
            command: the command name (``train``, ``evaluate``, ``status``, ...).
            payload: request fields; a fresh ``transaction`` is added unless it has one.
            timeout_s: how long to wait for the answer.

        Returns:
            The response's ``data``.

        Raises:
            DeviceError: an error response or no answer in time.
        """
        body = {"transaction": uuid.uuid4().hex, **(payload or {})}
        transaction = body["transaction"]
        topic = f"response/{command}"
        with self._lock:
            self._latest.pop(topic, None)
        self._client.publish(f"{self.base}/request/{command}", json.dumps(body), qos=1)
        log.debug("Sent %s request %s", command, body)
        answer = self.wait_for(
            topic,
            lambda p: isinstance(p, dict) and p.get("transaction") == transaction,
            timeout_s,
            f"the answer to {command}",
        )
        if answer.get("status") != "ok":
            raise DeviceError(f"device refused {command}: {answer.get('error', answer)}")
        return answer.get("data")
