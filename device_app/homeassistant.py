"""Home Assistant MQTT discovery, device-based (Home Assistant 2024.11+): the daemon as one device.

One retained JSON on ``<discovery_prefix>/device/<node_id>/config`` holds the device (``dev``), the origin
(``o``, ``name`` required), a shared ``availability`` and the components (``cmps``: component id ->
``{"p": platform, "unique_id": ..., ...}``). Every component reads or writes the daemon's own topics, so
nothing is published twice: sensors template the retained ``status`` and ``report`` (and the ``evaluate``
response), buttons publish a request whose response comes back on ``response/<command>``, and a select
starts and stops collecting (with a label or without). Availability follows the retained status, which the
Last Will sets to ``{"state": "offline"}``. Homie 5 would need ``$state`` ``lost`` in the Will; one
connection has one Will, so this convention is Home Assistant's (see DESIGN.md).

The config is published on every connection, again whenever it changes (another bundle brings other labels)
and when Home Assistant's birth message (``homeassistant/status`` ``online``) says it restarted. An empty
retained payload on the same topic removes the device: ``hosvd-device ha-remove`` sends it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from device_app import __version__
from device_app.config import Config, HomeAssistantSection
from device_app.mqtt_link import MqttLink, make_client, to_json

log = logging.getLogger(__name__)

ORIGIN = {"name": "hosvd-edge", "sw": __version__}
STATES = ["idle", "collecting", "training", "error", "offline"]
REPORT_STATUSES = ["ok", "stopped", "rolled_back", "error"]
BUTTONS = {  # command -> (name, icon)
    "train": ("Train", "mdi:school"),
    "evaluate": ("Evaluate", "mdi:clipboard-check-outline"),
    "rollback": ("Roll back", "mdi:undo-variant"),
    "stop": ("Stop training", "mdi:stop-circle-outline"),
}
COLLECT_OFF, COLLECT_UNLABELLED = "off", "unlabelled"
TRANSACTION = "homeassistant"  # in every request Home Assistant sends, so its answers are recognisable
MIN_REFRESH_S = 1.0  # a burst of birth messages (or a flood from someone on the broker) makes one announce a second


def node_id(base_topic: str, device_id: str) -> str:
    """The ``<node_id>`` of the discovery topic: ``[A-Za-z0-9_-]`` only, unique per base topic and device."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{base_topic}_{device_id}")


def discovery_topic(section: HomeAssistantSection, base_topic: str, device_id: str) -> str:
    """``<discovery_prefix>/device/<node_id>/config``."""
    return f"{section.discovery_prefix}/device/{node_id(base_topic, device_id)}/config"


def _request(**fields: Any) -> str:
    return json.dumps({"transaction": TRANSACTION, **fields}, separators=(",", ":"))


# Templates (Jinja, as Home Assistant renders them); built by concatenation to keep Jinja's braces readable.
def _field(key: str) -> str:
    return "{{ value_json.get('" + key + "') }}"


def _windows_in(split: str) -> str:
    return "{{ value_json.samples.by_label.values() | sum(attribute='" + split + "') }}"


def _percent(expression: str) -> str:
    return "{% set v = " + expression + " %}{{ None if v is none else (v * 100) | round(1) }}"


def _sensor(name: str, topic: str, template: str, **extra: Any) -> dict[str, Any]:
    return {"p": "sensor", "name": name, "state_topic": topic, "value_template": template, **extra}


def _mib(name: str, topic: str, key: str, **extra: Any) -> dict[str, Any]:
    return _sensor(name, topic, _field(key), device_class="data_size", unit_of_measurement="MiB",
                   state_class="measurement", suggested_display_precision=1, **extra)


def components(base: str, labels: list[str]) -> dict[str, dict[str, Any]]:
    """The ``cmps`` mapping for the daemon whose topics are under ``base`` (``<base_topic>/<device_id>``).

    Templates use ``value_json.get(...)``: a missing or ``null`` field renders ``None``, which Home
    Assistant shows as *unknown* rather than failing.

    Args:
        base: the daemon's topic base.
        labels: the bundle's labels (the collect select's options besides ``off`` and ``unlabelled``).
    """
    status, report, evaluated = f"{base}/status", f"{base}/report", f"{base}/response/evaluate"
    options = [COLLECT_OFF, COLLECT_UNLABELLED, *(x for x in labels if x not in (COLLECT_OFF, COLLECT_UNLABELLED))]
    cmps: dict[str, dict[str, Any]] = {
        "state": _sensor("State", status, "{{ value_json.state }}", device_class="enum", options=STATES,
                         icon="mdi:state-machine"),
        "windows_train": _sensor("Windows (train)", status, _windows_in("train"), state_class="measurement",
                                 unit_of_measurement="windows", icon="mdi:database"),
        "windows_val": _sensor("Windows (validation)", status, _windows_in("val"),
                               state_class="measurement", unit_of_measurement="windows", icon="mdi:database-check"),
        "bundle": _sensor("Bundle", status, _field("bundle"), icon="mdi:package-variant"),
        "global_step": _sensor("Global step", status, _field("global_step"),
                               state_class="measurement", icon="mdi:counter"),
        "last_training": _sensor("Last training", report, "{{ value_json.status }}", device_class="enum",
                                 options=REPORT_STATUSES, json_attributes_topic=report,
                                 json_attributes_template="{{ value_json | tojson }}", icon="mdi:school"),
        "final_loss": _sensor("Final loss", report, _field("final_loss"),
                              state_class="measurement", suggested_display_precision=4, icon="mdi:chart-bell-curve"),
        "val_accuracy": _sensor("Validation accuracy", report,
                                _percent("(value_json.get('val_after') or {}).get('accuracy')"),
                                unit_of_measurement="%", state_class="measurement", icon="mdi:target"),
        "peak_rss": _mib("Training peak RSS", report, "peak_rss_mb", icon="mdi:memory",
                         json_attributes_topic=report,
                         json_attributes_template="{{ {'ram_ceiling_mb': value_json.get('ram_ceiling_mb'), "
                                                  "'watched_peak_rss_mb': value_json.get('watched_peak_rss_mb'), "
                                                  "'plan': value_json.get('plan')} | tojson }}"),
        "ram_ceiling": _sensor("RAM ceiling", status, "{{ value_json.get('ram_ceiling_mb') or None }}",
                               device_class="data_size", unit_of_measurement="MiB",
                               entity_category="diagnostic", icon="mdi:memory-arrow-down"),
        "daemon_rss": _mib("Daemon RSS", status, "daemon_rss_mb", entity_category="diagnostic"),
        "eval_accuracy": _sensor("Evaluation accuracy", evaluated,
                                 _percent("(value_json.get('data') or {}).get('accuracy')"),
                                 unit_of_measurement="%", icon="mdi:clipboard-check-outline"),
        "collect": {
            "p": "select", "name": "Collect", "options": options, "icon": "mdi:record-rec",
            "state_topic": status, "command_topic": f"{base}/request/collect",
            "value_template": "{% if not value_json.collecting %}" + COLLECT_OFF
                              + "{% elif value_json.get('collect_label') %}{{ value_json.collect_label }}"
                              + "{% else %}" + COLLECT_UNLABELLED + "{% endif %}",
            "command_template": f"{{% if value == '{COLLECT_OFF}' %}}" + _request(action="stop")
                                + f"{{% elif value == '{COLLECT_UNLABELLED}' %}}" + _request(action="start")
                                + "{% else %}" + _request(action="start", label="LABEL").replace(
                                    '"LABEL"', "{{ value | tojson }}") + "{% endif %}",
        },
    }
    for command, (name, icon) in BUTTONS.items():
        cmps[command] = {"p": "button", "name": name, "icon": icon, "command_topic": f"{base}/request/{command}",
                         "payload_press": _request()}
    return cmps


def discovery_config(section: HomeAssistantSection, base_topic: str, device_id: str,
                     status: dict[str, Any]) -> dict[str, Any]:
    """The device discovery payload for the daemon's current ``status`` (its bundle, model and labels).

    Args:
        section: ``[homeassistant]``.
        base_topic: ``[mqtt] base_topic``.
        device_id: ``[device] id``.
        status: the daemon's status object (``bundle``, ``model_name``, ``labels``).
    """
    node = node_id(base_topic, device_id)
    base = f"{base_topic}/{device_id}"
    cmps = components(base, list(status.get("labels") or []))
    for cid, component in cmps.items():
        component["unique_id"] = f"{node}_{cid}"
    model = status.get("model_name") or "no bundle loaded"
    return {
        "dev": {"ids": [node], "name": section.device_name or device_id, "mf": "hosvd-edge",
                "mdl": f"{model} ({status.get('bundle')})" if status.get("bundle") else model, "sw": __version__},
        "o": ORIGIN,
        "availability": [{"topic": f"{base}/status", "payload_available": "online",
                          "payload_not_available": "offline",
                          "value_template": "{{ 'offline' if value_json.state == 'offline' else 'online' }}"}],
        "qos": 1,
        "cmps": cmps,
    }


class Discovery:
    """Keeps the device's discovery config published through the daemon's connection.

    Args:
        cfg: the whole config (``[homeassistant]``, ``[mqtt] base_topic``, ``[device] id``).
        link: the daemon's MQTT link.
        refresh: publishes the daemon's status again (which calls :meth:`announce`); run in its own thread
            after Home Assistant's birth message.
    """

    def __init__(self, cfg: Config, link: MqttLink, refresh: Callable[[], None]) -> None:
        self.section = cfg.homeassistant
        self.base_topic = cfg.mqtt.base_topic
        self.device_id = cfg.device.id
        self.topic = discovery_topic(self.section, self.base_topic, self.device_id)
        self.link = link
        self.refresh = refresh
        self.lock = threading.Lock()
        self.sent: bytes | None = None
        self.refresh_pending = False
        self.last_refresh = -MIN_REFRESH_S
        link.watch(self.section.status_topic, self._on_home_assistant_status)

    def connected(self) -> None:
        """Forget what was sent: a (re)connection announces again (the broker may have lost retained data)."""
        with self.lock:
            self.sent = None

    def announce(self, status: dict[str, Any]) -> None:
        """Publish the config (retained) for ``status`` unless this exact config was already sent."""
        payload = to_json(discovery_config(self.section, self.base_topic, self.device_id, status))
        with self.lock:
            if payload == self.sent or not self.link.connected.is_set():
                return
            self.sent = payload
        self.link.publish_to(self.topic, payload, retain=True)
        log.info("Announced the device to Home Assistant on %s (%d components)", self.topic,
                 len(json.loads(payload)["cmps"]))

    def _on_home_assistant_status(self, payload: bytes) -> None:
        # network thread: only note it and hand the work to one thread
        if payload.strip() != b"online":
            return
        with self.lock:
            self.sent = None
            if self.refresh_pending:
                return
            self.refresh_pending = True
        threading.Thread(target=self._refresh, name="homeassistant", daemon=True).start()

    def _refresh(self) -> None:
        time.sleep(max(0.0, self.last_refresh + MIN_REFRESH_S - time.monotonic()))
        with self.lock:
            self.refresh_pending = False
            self.last_refresh = time.monotonic()
        self.refresh()


def remove(cfg: Config, force: bool = False, timeout: float = 10.0) -> str:
    """Remove the device from Home Assistant: an empty retained payload on its discovery topic.

    Run it with the daemon stopped (or with ``[homeassistant] enabled = false``): a running daemon that
    announces itself would bring the device back.

    Args:
        cfg: the daemon's config (broker, credentials, topics).
        force: remove it even though the daemon's retained status says it is running.
        timeout: seconds to wait for the broker.

    Returns:
        The discovery topic that was cleared.

    Raises:
        RuntimeError: the broker cannot be reached, or the daemon is running and ``force`` is not set.
    """
    topic = discovery_topic(cfg.homeassistant, cfg.mqtt.base_topic, cfg.device.id)
    status_topic = f"{cfg.mqtt.base_topic}/{cfg.device.id}/status"
    client = make_client(cfg.mqtt, f"{cfg.mqtt.client_id or 'hosvd-edge-' + cfg.device.id}-ha-remove",
                         cfg.mqtt_password())
    connected, status_seen = threading.Event(), threading.Event()
    state: dict[str, Any] = {}

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        state["reason"] = reason
        if not reason.is_failure:
            client.subscribe(status_topic, 1)
        connected.set()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        try:
            state["daemon"] = json.loads(msg.payload).get("state")
        except (ValueError, AttributeError):
            state["daemon"] = None
        status_seen.set()

    client.on_connect, client.on_message = on_connect, on_message
    try:
        client.connect(cfg.mqtt.host, cfg.mqtt.port, keepalive=cfg.mqtt.keepalive)
    except OSError as err:
        raise RuntimeError(f"cannot reach broker {cfg.mqtt.host}:{cfg.mqtt.port}: {err}") from err
    client.loop_start()
    try:
        if not connected.wait(timeout) or state["reason"].is_failure:
            raise RuntimeError(f"broker {cfg.mqtt.host}:{cfg.mqtt.port} did not accept the connection: "
                               f"{state.get('reason', 'no answer')}")
        status_seen.wait(min(2.0, timeout))  # a retained status arrives right after the subscription
        running = state.get("daemon") not in (None, "offline")
        if running and not force:
            raise RuntimeError(f"the daemon of {cfg.device.id} is running (state {state['daemon']!r}) and would "
                               "announce itself again: stop it first (systemctl stop hosvd-device), or pass --force")
        info = client.publish(topic, b"", qos=1, retain=True)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise RuntimeError(f"the broker did not acknowledge the removal on {topic} within {timeout:g} s")
    finally:
        client.disconnect()
        client.loop_stop()
    return topic
