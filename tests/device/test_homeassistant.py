"""Home Assistant MQTT discovery against a real Mosquitto and the real daemon, checked the way Home Assistant
reads it: the retained device config and its documented fields, every template rendered with Jinja2 (Home
Assistant's template engine, sandboxed as there) on what the daemon publishes, every button and the collect
select driving a request that the daemon answers, the birth message, availability, and removal."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from device_app.homeassistant import TRANSACTION, components, node_id
from tests.device.conftest import REPO, Client, idle

PREFIX = "homeassistant"
NODE = node_id("hosvd-edge", "dev1")
CONFIG_TOPIC = f"device/{NODE}/config"
ENTITY_PLATFORMS = {"sensor", "button", "select"}
REQUIRED = {"sensor": {"state_topic"}, "button": {"command_topic"},
            "select": {"command_topic", "options", "state_topic"}}
JINJA = ImmutableSandboxedEnvironment(undefined=StrictUndefined)


def render(template: str, payload: Any, **variables: Any) -> str | None:
    """A state as Home Assistant's MQTT entities compute it; the string ``None`` means unknown."""
    context = {"value_json": payload, "value": json.dumps(payload), **variables}
    text = JINJA.from_string(template).render(**context).strip()
    return None if text == "None" else text


def check_device_config(config: dict[str, Any]) -> None:
    """The documented device-discovery rules (integrations/mqtt, 'Device discovery payload')."""
    assert {"dev", "o", "cmps"} <= set(config), sorted(config)
    assert config["o"]["name"] == "hosvd-edge"
    assert config["dev"]["ids"] == [NODE] and config["dev"]["name"] == "dev1"
    (availability,) = config["availability"]
    assert availability["topic"] == "hosvd-edge/dev1/status"
    unique_ids = [c["unique_id"] for c in config["cmps"].values()]
    assert len(unique_ids) == len(set(unique_ids)) and all(unique_ids), Counter(unique_ids)
    for cid, component in config["cmps"].items():
        assert component["p"] in ENTITY_PLATFORMS, (cid, component["p"])
        missing = REQUIRED[component["p"]] - set(component)
        assert not missing, f"{cid}: missing {missing}"
        assert len(set(component) - {"p"}) >= 1
        for key in ("state_topic", "command_topic", "json_attributes_topic"):
            if key in component:
                assert component[key].startswith("hosvd-edge/dev1/"), (cid, key)


def _state_topics(config: dict[str, Any]) -> set[str]:
    cmps = config["cmps"].values()
    return ({c["state_topic"] for c in cmps if "state_topic" in c}
            | {c["json_attributes_topic"] for c in cmps if "json_attributes_topic" in c}
            | {a["topic"] for a in config["availability"]})


def test_home_assistant_discovers_drives_and_removes_the_device(broker, client_factory, device_factory) -> None:
    sources = [{"type": "csv", "name": "replay", "path": "", "pacing": "fast"},
               {"type": "synthetic", "name": "synth", "autostart": False, "rate_hz": 50.0}]
    dev = device_factory(broker.port, homeassistant={"enabled": True},
                         training={"steps": 5000, "progress_every": 5})
    sources[0]["path"] = dev.doc["sources"][0]["path"]
    dev.rewrite(sources=sources)
    dev.start()
    cl = client_factory(broker.port)
    ha = Client(broker.port, PREFIX)
    try:
        cl.wait("status", idle, timeout=60)
        config = ha.wait(CONFIG_TOPIC, lambda p: isinstance(p, dict), timeout=30)
        check_device_config(config)
        cmps = config["cmps"]
        assert config["dev"]["mdl"] == "imu_cnn (imu_hosvd)"
        assert cmps["collect"]["options"] == ["off", "unlabelled", "idle", "walk", "shake"]

        status = cl.wait("status", idle)
        assert render(config["availability"][0]["value_template"], status) == "online"
        assert render(cmps["state"]["value_template"], status) == "idle"
        splits = Counter()
        for counts in status["samples"]["by_label"].values():
            splits.update(counts)
        assert render(cmps["windows_train"]["value_template"], status) == str(splits["train"])
        assert render(cmps["windows_val"]["value_template"], status) == str(splits["val"])
        assert splits["train"] > 0 and splits["val"] > 0
        assert render(cmps["bundle"]["value_template"], status) == "imu_hosvd"
        assert render(cmps["global_step"]["value_template"], status) == "0"
        assert render(cmps["daemon_rss"]["value_template"], status) == str(status["daemon_rss_mb"])

        def press(command: str) -> dict[str, Any]:
            mark = len(cl.seen)
            cl.c.publish(cmps[command]["command_topic"], cmps[command]["payload_press"], qos=1).wait_for_publish(5)
            return cl.wait(f"response/{command}", lambda p: p.get("transaction") == TRANSACTION, start=mark)

        # train, then stop it while it runs: both answered, and the report ends "stopped"
        mark = len(cl.seen)
        assert press("train")["data"]["accepted"] is True
        cl.wait("progress", lambda p: p.get("transaction") == TRANSACTION, start=mark, timeout=60)
        assert press("stop") == {"transaction": TRANSACTION, "status": "ok", "data": {"stopping": True}}
        report = cl.wait("report", lambda p: p.get("transaction") == TRANSACTION, start=mark, timeout=60)
        assert report["status"] == "stopped" and 0 < report["steps_done"] < 5000, report
        assert render(cmps["last_training"]["value_template"], report) == "stopped"
        assert float(render(cmps["final_loss"]["value_template"], report)) == pytest.approx(report["final_loss"])
        assert float(render(cmps["val_accuracy"]["value_template"], report)) == pytest.approx(
            round(report["val_after"]["accuracy"] * 100, 1))
        assert float(render(cmps["peak_rss"]["value_template"], report)) == report["peak_rss_mb"]
        attributes = json.loads(render(cmps["peak_rss"]["json_attributes_template"], report))
        assert attributes["ram_ceiling_mb"] == report["ram_ceiling_mb"]
        assert json.loads(render(cmps["last_training"]["json_attributes_template"], report)) == report

        evaluated = press("evaluate")
        assert evaluated["status"] == "ok" and evaluated["data"]["n"] > 0
        assert float(render(cmps["eval_accuracy"]["value_template"], evaluated)) == pytest.approx(
            round(evaluated["data"]["accuracy"] * 100, 1))
        rolled = press("rollback")
        assert rolled["status"] == "ok" and rolled["data"]["global_step"] < report["global_step"], rolled
        assert press("stop")["error"] == "nothing to stop: no training is running"

        # the collect select: a label starts a labelled session, "off" stops it
        def select(option: str, settled: Callable[[dict[str, Any]], bool] = lambda p: True) -> dict[str, Any]:
            assert option in cmps["collect"]["options"]
            mark = len(cl.seen)
            payload = render(cmps["collect"]["command_template"], None, value=option)
            cl.c.publish(cmps["collect"]["command_topic"], payload, qos=1).wait_for_publish(5)
            answer = cl.wait("response/collect", lambda p: p.get("transaction") == TRANSACTION, start=mark)
            assert answer["status"] == "ok", answer
            return cl.wait("status", lambda p: render(cmps["collect"]["value_template"], p) == option and settled(p),
                           start=mark)

        # sources start one after another, each announcing a status: the first may show the label before synth runs
        walking = select("walk", lambda p: "synth" in p["collecting"])
        assert "synth" in walking["collecting"] and walking["collect_label"] == "walk"
        assert select("off")["collecting"] == []

        # every topic a state, attribute or availability reads has received a value by now
        seen_topics = {t for t, _ in cl.seen}
        assert _state_topics(config) <= seen_topics, _state_topics(config) - seen_topics

        # Home Assistant restarted: its birth message brings the config again
        configs = len([p for t, p in ha.seen if t == f"{PREFIX}/{CONFIG_TOPIC}"])
        ha.c.publish(f"{PREFIX}/status", "online", qos=1).wait_for_publish(5)
        again = ha.wait(CONFIG_TOPIC, lambda p: isinstance(p, dict), start=len(ha.seen), timeout=10)
        assert again["cmps"].keys() == cmps.keys()
        assert len([p for t, p in ha.seen if t == f"{PREFIX}/{CONFIG_TOPIC}"]) == configs + 1
        for _ in range(30):  # a flood of births (or of someone on the broker) is not a flood of configs
            ha.c.publish(f"{PREFIX}/status", "online", qos=1)
        with pytest.raises(TimeoutError):  # collect everything for 2.5 s
            ha.wait(CONFIG_TOPIC, lambda p: False, timeout=2.5)
        flood = len([p for t, p in ha.seen if t == f"{PREFIX}/{CONFIG_TOPIC}"]) - (configs + 1)
        assert 1 <= flood <= 3, flood

        # a broker restart loses retained messages (no persistence here): the reconnection announces again
        broker.restart()
        ha.close()
        ha = Client(broker.port, PREFIX)
        assert ha.wait(CONFIG_TOPIC, lambda p: isinstance(p, dict), timeout=30)["cmps"].keys() == cmps.keys()
        cl = client_factory(broker.port)
        cl.wait("status", idle, timeout=30)

        remove = [sys.executable, "-m", "device_app", "ha-remove", "--config", str(dev.config)]
        refused = subprocess.run(remove, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "is running (state 'idle')" in refused.stderr, refused.stderr

        assert dev.stop() == 0
        offline = cl.wait("status", lambda p: p.get("state") == "offline")
        assert render(config["availability"][0]["value_template"], offline) == "offline"
        removed = subprocess.run(remove, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert removed.returncode == 0, removed.stderr
        assert f"cleared {PREFIX}/{CONFIG_TOPIC}" in removed.stdout
        ha.wait(CONFIG_TOPIC, lambda p: p is None, start=len(ha.seen))  # the empty payload
    finally:
        ha.close()
    late = Client(broker.port, PREFIX)  # a Home Assistant starting now finds no device
    try:
        with pytest.raises(TimeoutError):
            late.wait(CONFIG_TOPIC, timeout=1.5)
    finally:
        late.close()


def test_labels_that_collide_with_the_select_words_are_left_out() -> None:
    options = components("base/dev", ["off", "walk", "unlabelled"])["collect"]["options"]
    assert options == ["off", "unlabelled", "walk"]
