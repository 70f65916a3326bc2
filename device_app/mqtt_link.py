"""The daemon's MQTT connection (paho-mqtt 2): topics, Last Will, reconnects, responses, the report outbox.

Topics under ``<base_topic>/<device_id>``: ``status`` (retained; the Last Will sets ``{"state":
"offline"}``), ``request/<command>`` (subscribed), ``response/<command>``, ``progress``, ``report``
(retained), ``samples/<source>`` (subscribed for ``mqtt`` sources). paho's network thread reconnects with
exponential backoff (``reconnect_min_s`` doubling to ``reconnect_max_s``), also after the broker refuses the
credentials; every (re)connection subscribes again, republishes the retained status and flushes the outbox.
Reports go through the SQLite outbox: written first, deleted when the broker acknowledges them, so a report
made while the broker is down is delivered after it returns, even across a daemon restart. A report the outbox
cannot take (disk full) is published at once, QoS 1, and the failure logged.

Oversized messages never reach the daemon's memory: with MQTT 5 the CONNECT carries the Maximum Packet Size
property (``max_payload_bytes`` plus room for topic and properties), so the broker drops larger PUBLISHes
instead of sending them. A broker that only speaks 3.1.1 refuses the MQTT 5 CONNECT ("Unsupported protocol
version"); the link then falls back to 3.1.1 with a warning (the broker's own ``max_packet_size`` is the guard
there), and the daemon still drops a large request before queueing it.

Requests arrive with their retain flag: a retained request is answered with an error and never executed (it
would run again on every connection), and with MQTT 5 the retained copy is cleared. The request subscription
uses No Local, so the daemon never receives its own clearing publish. MQTT 5 response topics are honoured only
under ``<base>/<device_id>/response/`` or a configured ``response_topic_prefixes`` entry.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
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
from paho.mqtt.subscribeoptions import SubscribeOptions

from device_app.config import MqttSection
from device_app.store import Store

log = logging.getLogger(__name__)
PACKET_OVERHEAD_BYTES = 4096  # fixed header, topic, packet id and properties on top of the payload
UNSUPPORTED_PROTOCOL = 132  # CONNACK reason "Unsupported protocol version" (3.1.1's return code 1 reads as it)
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
        on_request: ``(command, payload, properties, retained)`` for each ``request/<command>`` message;
            called in paho's network thread, so it must only queue work.
        on_samples: ``(source_name, payload)`` for each ``samples/<source>`` message.
        on_connect: called after every successful (re)connection.
    """

    def __init__(self, cfg: MqttSection, device_id: str, password: str | None, store: Store,
                 on_request: Callable[[str, bytes, Any, bool], None],
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
        self.connect_properties: Properties | None = None
        if self.v5:
            self.connect_properties = Properties(PacketTypes.CONNECT)
            self.connect_properties.MaximumPacketSize = cfg.max_payload_bytes + PACKET_OVERHEAD_BYTES
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
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive,
                                  properties=self.connect_properties)
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
        if reason.is_failure and self.v5 and reason.value == UNSUPPORTED_PROTOCOL:
            self._fall_back_to_311(client)
            return
        if reason.is_failure:
            hint = AUTH_HINTS.get(str(reason), "check [mqtt] in the config")
            where = f"{self.cfg.host}:{self.cfg.port}"
            self.last_error = f"broker {where} refused the connection: {reason} ({hint})"
            log.error("%s; retrying with backoff up to %.0f s", self.last_error, self.cfg.reconnect_max_s)
            return
        self.last_error = None
        log.info("Connected to %s:%d (MQTT %s)", self.cfg.host, self.cfg.port, "5" if self.v5 else "3.1.1")
        if self.v5:
            client.subscribe([(self.topic("request/+"), SubscribeOptions(qos=1, noLocal=True)),
                              (self.topic("samples/+"), SubscribeOptions(qos=0, noLocal=True)),
                              *((topic, SubscribeOptions(qos=1)) for topic in self.watched)])
        else:
            client.subscribe([(self.topic("request/+"), 1), (self.topic("samples/+"), 0),
                              *((topic, 1) for topic in self.watched)])
        self.connected.set()
        if self.status_payload is not None:
            client.publish(self.topic("status"), self.status_payload, qos=1, retain=True)
        self.flush_outbox()
        self.on_connected()

    def _fall_back_to_311(self, client: paho.Client) -> None:
        """The broker only speaks 3.1.1: reconnect with it (paho itself downgrades 3.1.1 to 3.1 this way)."""
        log.warning("broker %s:%d does not speak MQTT 5: falling back to 3.1.1. Oversized requests then reach "
                    "the daemon before it drops them; set the broker's max_packet_size (Mosquitto: "
                    "max_packet_size %d) and [mqtt] protocol = \"3.1.1\"", self.cfg.host, self.cfg.port,
                    self.cfg.max_payload_bytes + PACKET_OVERHEAD_BYTES)
        self.v5 = False
        client._protocol = MQTTProtocolVersion.MQTTv311  # paho has no public setter
        client._clean_session = True  # a v5 client has none; 3.1.1 needs one

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
                self.on_request(name, msg.payload, getattr(msg, "properties", None), bool(msg.retain))
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
            try:
                self.store.outbox_done(outbox_id)
            except (sqlite3.Error, OSError) as err:  # stays queued: sent again (a duplicate) on reconnection
                log.warning("could not remove delivered report %d from the outbox: %s", outbox_id, err)

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

    def publish_reliably(self, suffix: str, data: Any, retain: bool = True) -> bool:
        """Queue in the outbox, then publish at QoS 1; the broker's acknowledgement removes it.

        When the outbox cannot take it (disk full, a broken store) it is published directly at QoS 1 instead and
        the failure is logged: it then survives a broker outage only inside paho's memory.

        Returns:
            True when the message went into the outbox.
        """
        topic, payload = self.topic(suffix), to_json(data)
        try:
            item_id = self.store.outbox_put(topic, payload, 1, retain)
        except (sqlite3.Error, OSError) as err:
            log.error("could not queue the %s in the outbox (%s); publishing it directly%s", suffix, err,
                      "" if self.connected.is_set() else " once the broker is back (kept in memory only)")
            self.client.publish(topic, payload, qos=1, retain=retain)
            return False
        if self.connected.is_set():
            self._send_outbox_item(item_id, topic, payload, retain)
        return True

    def clear_retained(self, topic: str) -> bool:
        """Remove the retained copy of ``topic`` (an empty retained publish); only with MQTT 5, whose No Local
        subscription keeps the empty message from coming back to the daemon as a request. True if sent."""
        if not self.v5 or not self.connected.is_set():
            return False
        self.client.publish(topic, b"", qos=1, retain=True)
        return True

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

    def response_topic_allowed(self, topic: str) -> bool:
        """True for a topic a response may go to: under ``<base>/<device_id>/response/`` or a configured prefix,
        and without wildcards."""
        if not topic or "#" in topic or "+" in topic or "\x00" in topic:
            return False
        prefixes = [self.topic("response/"), *self.cfg.response_topic_prefixes]
        return any(topic.startswith(prefix) for prefix in prefixes)

    def respond(self, command: str, request_props: Any, body: dict[str, Any]) -> None:
        """Send a response to ``response/<command>`` and, with MQTT 5, to the request's response topic when that
        is allowed (:meth:`response_topic_allowed`)."""
        payload = to_json(body)
        if not self.connected.is_set():
            log.warning("not connected: dropped the response to %s", command)
            return
        self.client.publish(self.topic(f"response/{command}"), payload, qos=1)
        response_topic = getattr(request_props, "ResponseTopic", None) if self.v5 else None
        if response_topic and not self.response_topic_allowed(response_topic):
            log.warning("request %s: ignored its response topic %r: responses go only under %s or [mqtt] "
                        "response_topic_prefixes", command, response_topic[:200], self.topic("response/"))
        elif response_topic:
            props = Properties(PacketTypes.PUBLISH)
            correlation = getattr(request_props, "CorrelationData", None)
            if correlation is not None:
                props.CorrelationData = correlation
            self.client.publish(response_topic, payload, qos=1, properties=props)
