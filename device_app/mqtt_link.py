"""The daemon's MQTT connection (paho-mqtt 2): topics, Last Will, reconnects, responses, the report outbox.

Topics under ``<base_topic>/<device_id>``: ``status`` (retained; the Last Will sets ``{"state":
"offline"}``), ``request/<command>`` (subscribed), ``response/<command>``, ``progress``, ``report``
(retained), ``samples/<source>`` (subscribed for ``mqtt`` sources). paho's network thread reconnects with
exponential backoff (``reconnect_min_s`` doubling to ``reconnect_max_s``), also after the broker refuses the
credentials; every (re)connection subscribes again, republishes the retained status and flushes the outbox.
Reports go through the SQLite outbox: written first, deleted when the broker acknowledges them, so a report
made while the broker is down is delivered after it returns, even across a daemon restart.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_app.config import MqttSection
from device_app.store import Store

log = logging.getLogger(__name__)
AUTH_HINTS = {
    "Not authorized": "check [mqtt] username and password",
    "Bad user name or password": "check [mqtt] username and password",
    "Client identifier not valid": "set [mqtt] client_id",
}


def to_json(data: Any) -> bytes:
    """Compact JSON; NaN/inf become null so every consumer can parse it."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), separators=(",", ":")).encode()


def make_client(cfg: MqttSection, client_id: str, password: str | None) -> paho.Client:
    """A paho client with the ``[mqtt]`` protocol, credentials, TLS and reconnect backoff (not connected)."""
    v5 = cfg.protocol == "5"
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311)
    if cfg.username:
        client.username_pw_set(cfg.username, password)
    if cfg.tls:
        client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file,
                       cert_reqs=ssl.CERT_REQUIRED)
        client.tls_insecure_set(cfg.tls_insecure)
    client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
    return client


class MqttLink:
    """One paho client with the daemon's conventions.

    Args:
        cfg: the ``[mqtt]`` section.
        device_id: ``[device] id``.
        password: the resolved password (``Config.mqtt_password``).
        store: holds the outbox.
        on_request: ``(command, payload, properties)`` for each ``request/<command>`` message; called in
            paho's network thread, so it must only queue work.
        on_samples: ``(source_name, payload)`` for each ``samples/<source>`` message.
        on_connect: called after every successful (re)connection.
    """

    def __init__(self, cfg: MqttSection, device_id: str, password: str | None, store: Store,
                 on_request: Callable[[str, bytes, Any], None],
                 on_samples: Callable[[str, bytes], None] | None = None,
                 on_connect: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.base = f"{cfg.base_topic}/{device_id}"
        self.store = store
        self.on_request = on_request
        self.on_samples = on_samples or (lambda name, payload: None)
        self.on_connected = on_connect or (lambda: None)
        self.connected = threading.Event()
        self.last_error: str | None = None
        self.status_payload: bytes | None = None
        # Never held while calling paho: paho runs on_publish under its own mutex.
        self._acks_lock = threading.Lock()
        self._pending: dict[int, int] = {}  # mid -> outbox id
        self._acked: OrderedDict[int, None] = OrderedDict()
        self.v5 = cfg.protocol == "5"
        self.watched: dict[str, Callable[[bytes], None]] = {}  # topics outside the base (Home Assistant's)
        self.client = make_client(cfg, cfg.client_id or f"hosvd-edge-{device_id}", password)
        self.client.will_set(self.topic("status"), to_json({"state": "offline"}), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    def topic(self, suffix: str) -> str:
        return f"{self.base}/{suffix}"

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho retries until it succeeds."""
        log.info("Connecting to mqtt%s://%s:%d as %s", "s" if self.cfg.tls else "", self.cfg.host,
                 self.cfg.port, self.cfg.username or "anonymous")
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()

    def stop(self, final_status: dict[str, Any] | None = None, timeout: float = 3.0) -> None:
        """Publish ``final_status`` (retained) if connected, then disconnect and stop the network thread."""
        if final_status is not None and self.connected.is_set():
            info = self.client.publish(self.topic("status"), to_json(final_status), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("could not publish the final status before disconnecting")
        self.client.disconnect()
        self.client.loop_stop()

    # --- callbacks (paho network thread) -------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            hint = AUTH_HINTS.get(str(reason), "check [mqtt] in the config")
            where = f"{self.cfg.host}:{self.cfg.port}"
            self.last_error = f"broker {where} refused the connection: {reason} ({hint})"
            log.error("%s; retrying with backoff up to %.0f s", self.last_error, self.cfg.reconnect_max_s)
            return
        self.last_error = None
        log.info("Connected to %s:%d", self.cfg.host, self.cfg.port)
        client.subscribe([(self.topic("request/+"), 1), (self.topic("samples/+"), 0),
                          *((topic, 1) for topic in self.watched)])
        self.connected.set()
        if self.status_payload is not None:
            client.publish(self.topic("status"), self.status_payload, qos=1, retain=True)
        self.flush_outbox()
        self.on_connected()

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError` block: the exception says why (refused, TLS, DNS).
        err = sys.exc_info()[1]
        self.last_error = f"cannot reach broker {self.cfg.host}:{self.cfg.port}" + (f": {err}" if err else "")
        log.warning("%s; retrying with backoff up to %.0f s", self.last_error, self.cfg.reconnect_max_s)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was:
            log.warning("Disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        rest = msg.topic[len(self.base) + 1:]
        kind, _, name = rest.partition("/")
        try:
            if msg.topic in self.watched:
                self.watched[msg.topic](msg.payload)
            elif kind == "request":
                self.on_request(name, msg.payload, msg.properties)
            elif kind == "samples":
                self.on_samples(name, msg.payload)
        except Exception:  # a bad message must never take the network thread down
            log.exception("handling a message on %s failed", msg.topic)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._acks_lock:
            outbox_id = self._pending.pop(mid, None)
            if outbox_id is None:
                self._acked[mid] = None
                while len(self._acked) > 1000:
                    self._acked.popitem(last=False)
        if outbox_id is not None:
            self.store.outbox_done(outbox_id)

    # --- publishing ----------------------------------------------------------------------------------------

    def watch(self, topic: str, callback: Callable[[bytes], None]) -> None:
        """Also subscribe to ``topic`` (outside the base) on every connection; ``callback(payload)`` runs in
        the network thread, so it must only queue work. Call before :meth:`start`."""
        self.watched[topic] = callback

    def publish_to(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish ``payload`` at QoS 1 on a topic outside the base, if connected (Home Assistant discovery)."""
        if self.connected.is_set():
            self.client.publish(topic, payload, qos=1, retain=retain)

    def publish(self, suffix: str, data: Any, qos: int = 1, retain: bool = False) -> None:
        """Publish JSON now if connected (dropped otherwise: progress, responses)."""
        if self.connected.is_set():
            self.client.publish(self.topic(suffix), to_json(data), qos=qos, retain=retain)

    def set_status(self, status: dict[str, Any]) -> None:
        """Publish the retained status, and remember it to publish again after a reconnection."""
        self.status_payload = to_json(status)
        if self.connected.is_set():
            self.client.publish(self.topic("status"), self.status_payload, qos=1, retain=True)

    def publish_reliably(self, suffix: str, data: Any, retain: bool = True) -> None:
        """Queue in the outbox, then publish at QoS 1; the broker's acknowledgement removes it."""
        item_id = self.store.outbox_put(self.topic(suffix), to_json(data), 1, retain)
        if self.connected.is_set():
            self._send_outbox_item(item_id, self.topic(suffix), to_json(data), retain)

    def flush_outbox(self) -> None:
        items = self.store.outbox()
        if items:
            log.info("Sending %d queued message(s) from the outbox", len(items))
        for item in items:
            self._send_outbox_item(item.id, item.topic, item.payload, item.retain)

    def _send_outbox_item(self, item_id: int, topic: str, payload: bytes, retain: bool) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return  # stays in the outbox; the next connection flushes it
        with self._acks_lock:
            done = info.mid in self._acked
            if done:
                del self._acked[info.mid]
            else:
                self._pending[info.mid] = item_id
        if done:
            self.store.outbox_done(item_id)

    def respond(self, command: str, request_props: Any, body: dict[str, Any]) -> None:
        """Send a response to ``response/<command>`` and, with MQTT 5, to the request's response topic."""
        payload = to_json(body)
        if not self.connected.is_set():
            log.warning("not connected: dropped the response to %s", command)
            return
        self.client.publish(self.topic(f"response/{command}"), payload, qos=1)
        response_topic = getattr(request_props, "ResponseTopic", None) if self.v5 else None
        if response_topic and "#" not in response_topic and "+" not in response_topic:
            props = Properties(PacketTypes.PUBLISH)
            correlation = getattr(request_props, "CorrelationData", None)
            if correlation is not None:
                props.CorrelationData = correlation
            self.client.publish(response_topic, payload, qos=1, properties=props)
