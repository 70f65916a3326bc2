"""A fleet round through the device daemon, when the daemon holds the state directory.

The daemon owns its state directory for its whole life (``daemon.lock``), so a ClientApp on the same device does
not train beside it: it asks the daemon over MQTT, as any client would, with ``fleet_round: true``. The daemon
then runs the round as one of its jobs (``Busy`` while another runs), from the global weights the ClientApp left
in ``<state_dir>/fleet/global.npz``, and publishes ``progress`` and a retained ``report`` like any ``train``: the
round shows on MQTT as a job. This module sends the request and waits for the report with its transaction.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from typing import Any

from device_app.config import Config
from device_app.mqtt_link import make_client

DAEMON_PURPOSE = "hosvd-device run"  # what the daemon writes into daemon.lock (device_app/cli.py)


class DaemonError(RuntimeError):
    """The daemon refused the request, did not answer, or the broker could not be reached."""


def request(cfg: Config, command: str, body: dict[str, Any], timeout_s: float,
            report: bool = False) -> dict[str, Any]:
    """Send ``request/<command>`` to this device's daemon and return its answer's ``data``; with ``report``, wait
    on for the retained ``report`` of the job it started and return that instead.

    Raises:
        DaemonError: no connection, an error answer, or no answer/report within ``timeout_s``.
    """
    base = f"{cfg.mqtt.base_topic}/{cfg.device.id}"
    transaction = body.setdefault("transaction", f"fleet-{uuid.uuid4().hex[:12]}")
    inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
    client = make_client(cfg.mqtt, f"hosvd-fleet-{cfg.device.id}-{uuid.uuid4().hex[:6]}", cfg.mqtt_password())
    subscribed = queue.Queue[bool]()

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            subscribed.put(False)
            return
        c.subscribe([(f"{base}/response/{command}", 1), (f"{base}/report", 1)])

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        try:
            inbox.put((msg.topic[len(base) + 1:], json.loads(msg.payload or b"null")))
        except ValueError:
            return

    client.on_connect = on_connect
    client.on_subscribe = lambda *args: subscribed.put(True)
    client.on_message = on_message
    try:
        client.connect(cfg.mqtt.host, cfg.mqtt.port, keepalive=cfg.mqtt.keepalive)
    except OSError as err:
        raise DaemonError(f"cannot reach the MQTT broker {cfg.mqtt.host}:{cfg.mqtt.port}: {err}") from err
    client.loop_start()
    try:
        try:
            if not subscribed.get(timeout=30):
                raise DaemonError(f"the MQTT broker {cfg.mqtt.host}:{cfg.mqtt.port} refused the connection")
        except queue.Empty:
            raise DaemonError(f"no MQTT connection to {cfg.mqtt.host}:{cfg.mqtt.port} within 30 s") from None
        client.publish(f"{base}/request/{command}", json.dumps(body), qos=1)
        answer = _wait(inbox, f"response/{command}", transaction, timeout_s, f"the daemon's answer to {command}")
        if answer.get("status") != "ok":
            raise DaemonError(f"the daemon refused {command}: {answer.get('error', answer)}")
        if not report:
            return answer.get("data") or {}
        return _wait(inbox, "report", transaction, timeout_s, f"the report of {command} {transaction}")
    finally:
        client.disconnect()
        client.loop_stop()


def _wait(inbox: queue.Queue[tuple[str, Any]], topic: str, transaction: str, timeout_s: float,
          what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            got, payload = inbox.get(timeout=left)
        except queue.Empty:
            break
        if got == topic and isinstance(payload, dict) and payload.get("transaction") == transaction:
            return payload
    raise DaemonError(f"no {what} within {timeout_s:.0f} s")
