"""The embedded broker: starts on a free port, carries retained messages, stops with its child process."""

from __future__ import annotations

import socket
import threading

import paho.mqtt.client as mqtt
import pytest

from demo.broker import BrokerAddress, embedded_broker, free_port, parse_broker, wait_until_connectable


def _client() -> mqtt.Client:
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)


def test_embedded_broker_keeps_a_retained_message_and_stops() -> None:
    with embedded_broker() as address:
        pub = _client()
        pub.connect(address.host, address.port)
        pub.loop_start()
        pub.publish("demo/test/status", b'{"state": "idle"}', qos=1, retain=True).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()

        got: list[mqtt.MQTTMessage] = []
        arrived = threading.Event()
        sub = _client()
        sub.on_connect = lambda c, *_: c.subscribe("demo/test/#", qos=1)
        sub.on_message = lambda c, u, m: (got.append(m), arrived.set())
        sub.connect(address.host, address.port)
        sub.loop_start()
        try:
            assert arrived.wait(5), "no retained message arrived"
        finally:
            sub.loop_stop()
            sub.disconnect()
        assert got[0].topic == "demo/test/status"
        assert got[0].payload == b'{"state": "idle"}'
        assert got[0].retain
    with pytest.raises(TimeoutError):
        wait_until_connectable(address, timeout_s=1.0)


def test_parse_broker() -> None:
    assert parse_broker("mqtt.local") == BrokerAddress("mqtt.local", 1883)
    assert parse_broker("10.0.0.2:1884") == BrokerAddress("10.0.0.2", 1884)
    for bad in (":1883", "host:port", "host:70000"):
        with pytest.raises(ValueError):
            parse_broker(bad)


def test_free_port_can_be_bound_and_listened_on_right_away() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))  # raises if the port is taken (or is privileged for a non-root user)
        sock.listen()
        assert sock.getsockname()[1] == port  # port 0 would have been given another number
