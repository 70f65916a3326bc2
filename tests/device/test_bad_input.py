"""Malformed requests against a running daemon: each gets an error response naming the problem, the daemon
stays up, and nothing stored is lost."""

from __future__ import annotations

import os
import shutil
import time
import uuid

import paho.mqtt.client as paho
import pytest
from conftest import idle
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def test_every_malformed_request_gets_an_error_and_nothing_is_lost(broker, client_factory, device_factory,
                                                                    tmp_path) -> None:
    dev = device_factory(broker.port, mqtt={"max_payload_bytes": 1024}).start()
    cl = client_factory(broker.port)
    before = cl.wait("status", idle, timeout=60)["samples"]
    outside = tmp_path / "outside_bundle"
    shutil.copytree(dev.state_dir / "bundles" / "imu_hosvd", outside)
    os.symlink(outside, dev.state_dir / "bundles" / "escape")

    cases = [
        ("train", b"{not json", "payload is not valid JSON"),
        ("train", b"[1, 2]", "must be a table/object, got list"),
        ("explode", b"{}", "unknown command 'explode'"),
        ("train", b'{"transaction": "t-types", "steps": "many"}', "steps: must be an integer, got 'many'"),
        ("train", b'{"steps": -3}', "steps: must be >= 1"),
        ("train", b'{"epochs": 3}', "unknown key 'epochs'"),
        ("train", b'{"steps": 1, "pad": "' + b"x" * 2000 + b'"}', "payload is 2023 bytes, the limit is 1024"),
        ("train", b'{"batch_size": 7}', "batch_size 7 is not in the bundle"),
        ("reload", b'{"bundle": "../../etc"}', "bundle: must match"),
        ("reload", b'{"bundle": "/etc/passwd"}', "bundle: must match"),
        ("reload", b'{"bundle": "escape"}', "outside the bundles directory"),
        ("reload", b'{"bundle": "missing"}', "no bundle 'missing'"),
        ("label", b'{"label": "no-such-class", "last": 1}', "is not one of the bundle's labels"),
        ("label", b'{"label": "x", "ids": [1], "last": 2}', "give exactly one of ids or last"),
        ("label", b'{"label": "idle", "ids": [9223372036854775808]}',
         "ids: every item must be between 1 and 9223372036854775807"),
        ("collect", b'{"action": "pause"}', "action: must be one of ['start', 'stop']"),
        ("collect", b'{"action": "start", "sources": ["nope"]}', "unknown sources ['nope']"),
        ("stop", b"{}", "nothing to stop"),
        ("evaluate", b'{"split": "test"}', "split: must be one of"),
    ]
    for command, payload, expected in cases:
        mark = len(cl.seen)
        cl.publish(f"request/{command}", payload)
        answer = cl.wait(f"response/{command}", start=mark)
        assert answer["status"] == "error", (command, payload[:60], answer)
        assert expected in answer["error"], (command, payload[:60], answer["error"])
    # a readable transaction is echoed even when the request is invalid
    assert [p for p in cl.all("response/train") if p.get("transaction") == "t-types"]

    assert dev.alive()
    status = cl.request("status")
    assert status["status"] == "ok" and status["data"]["samples"] == before
    assert status["data"]["bundle"] == "imu_hosvd"


def test_deep_nesting_is_invalid_json_not_a_crash() -> None:
    from device_app.requests import RequestError, parse_request, transaction_of

    payload = b'{"transaction": "t", "ids": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(RequestError, match="payload is not valid JSON: nested too deeply"):
        parse_request("label", payload, 1 << 20)
    assert transaction_of(payload) is None


def test_mqtt5_response_topics_are_honoured_only_where_allowed(broker, client_factory, device_factory) -> None:
    dev = device_factory(broker.port, mqtt={"response_topic_prefixes": ["replies/"]}).start()
    cl = client_factory(broker.port)
    cl.wait("status", idle, timeout=60)
    got: dict[str, list[paho.MQTTMessage]] = {}
    watcher = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    watcher.on_message = lambda c, u, m: got.setdefault(m.topic, []).append(m)
    watcher.connect("127.0.0.1", broker.port)
    watcher.subscribe("#", qos=1)
    watcher.loop_start()
    time.sleep(0.5)
    mine = f"replies/{uuid.uuid4().hex[:6]}"
    own = "hosvd-edge/dev1/response/status/me"
    # another device's report, and the device's own request topic: never published to
    refused = ["hosvd-edge/dev2/report", "hosvd-edge/dev1/request/rollback", "hosvd-edge/dev1/status", "elsewhere"]
    for i, topic in enumerate([mine, own, *refused]):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = topic
        props.CorrelationData = f"corr-{i}".encode()
        cl.c.publish("hosvd-edge/dev1/request/status", f'{{"transaction": {i}}}'.encode(), qos=1,
                     properties=props)
    deadline = time.monotonic() + 15
    while len(got.get("hosvd-edge/dev1/response/status", [])) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(got["hosvd-edge/dev1/response/status"]) == 6  # every request answered on the usual topic
    for i, topic in enumerate([mine, own]):
        assert [m.properties.CorrelationData for m in got[topic]] == [f"corr-{i}".encode()], topic
        assert f'"transaction":{i}'.encode() in got[topic][0].payload
    for topic in refused:
        assert not [m for m in got.get(topic, []) if b'"status"' in m.payload and b'"data"' in m.payload], topic
    watcher.disconnect()
    watcher.loop_stop()
    assert "ignored its response topic 'hosvd-edge/dev2/report'" in dev.log()
    assert cl.request("status")["data"]["global_step"] == 0  # the rollback topic got nothing


def test_reload_switches_bundle_by_name(broker, client_factory, device_factory) -> None:
    dev = device_factory(broker.port)
    shutil.copytree(dev.state_dir / "bundles" / "imu_hosvd", dev.state_dir / "bundles" / "imu_v2")
    dev.start()
    cl = client_factory(broker.port)
    cl.wait("status", idle, timeout=60)
    answer = cl.request("reload", {"bundle": "imu_v2"})
    assert answer["status"] == "ok", answer
    assert answer["data"]["bundle"] == "imu_v2"
    assert cl.wait("status", lambda p: p.get("bundle") == "imu_v2")["state"] in ("idle", "collecting")
    # a tampered bundle is refused with the hash message, and the loaded one stays
    model = dev.state_dir / "bundles" / "imu_hosvd" / "model.tflite"
    model.write_bytes(model.read_bytes() + b"\0")
    answer = cl.request("reload", {"bundle": "imu_hosvd"})
    assert answer["status"] == "error" and "sha256" in answer["error"]
    assert cl.request("status")["data"]["bundle"] == "imu_v2"
