"""End to end against a real Mosquitto: CSV replay -> store -> train request -> child -> progress -> report ->
checkpoint restored by a second daemon."""

from __future__ import annotations

import time

import pytest

from hosvd_contract import Manifest


def _idle_with(n: int):
    return lambda p: isinstance(p, dict) and p.get("state") == "idle" and p["samples"]["total"] == n


def test_train_over_mqtt_then_restart_restores_checkpoint(broker, client_factory, device_factory,
                                                          imu_manifest: Manifest) -> None:
    per_class = 16
    n_windows = per_class * len(imu_manifest.labels)
    dev = device_factory(broker.port, windows_per_class=per_class).start()
    cl = client_factory(broker.port)
    status = cl.wait("status", _idle_with(n_windows), timeout=60)
    assert status["bundle"] == "imu_hosvd" and status["global_step"] == 0
    assert set(status["samples"]["by_label"]) == set(imu_manifest.labels)
    untrained = cl.request("evaluate", {"split": "all"})["data"]
    assert untrained["global_step"] == 0 and untrained["n"] == n_windows

    answer = cl.request("train", {"transaction": "tx-42", "steps": 40})
    assert set(answer) == {"transaction", "status", "data"}
    assert (answer["transaction"], answer["status"]) == ("tx-42", "ok")
    assert answer["data"]["accepted"] is True and answer["data"]["steps"] == 40

    report = cl.wait("report", lambda p: p.get("transaction") == "tx-42", timeout=120)
    progress = [p for p in cl.all("progress") if p.get("transaction") == "tx-42"]
    assert [p["step"] for p in progress][:2] == [1, 5] and progress[-1]["step"] == 40
    assert all(p["total"] == 40 and p["global_step"] == p["step"] for p in progress)
    assert report["status"] == "ok", report
    assert report["steps_done"] == 40 and report["global_step"] == 40
    assert report["final_loss"] < report["first_loss"]
    assert report["final_loss"] == pytest.approx(progress[-1]["loss"])  # both the mean of the last 5 steps
    # the child's own peak (VmHWM) bounds every RSS it reported and every sample the daemon took of it (up
    # to 1 MiB: the kernel's per-thread RSS counters lag by up to 64 pages each)
    assert max(p["rss_mb"] for p in progress) <= report["peak_rss_mb"] + 1.0
    assert report["watched_peak_rss_mb"] <= report["peak_rss_mb"] + 1.0
    assert report["n_train"] + report["n_val"] == n_windows
    assert report["checkpoint"] == "ckpt-000000040.npz"

    status = cl.request("status")
    assert status["status"] == "ok" and status["data"]["global_step"] == 40
    assert status["data"]["state"] == "idle"
    first = cl.request("evaluate", {"split": "all"})
    assert first["status"] == "ok", first
    assert first["data"]["n"] == n_windows and first["data"]["global_step"] == 40
    assert first["data"]["loss"] < untrained["loss"]
    # evaluate restores checkpoint 40 in a new child: the same numbers the training run measured at its end
    val = cl.request("evaluate", {"split": "val"})["data"]
    assert val["n"] == report["n_val"] == report["val_after"]["n"]
    assert val["loss"] == pytest.approx(report["val_after"]["loss"], rel=1e-4)
    assert val["accuracy"] == report["val_after"]["accuracy"]

    assert dev.stop() == 0
    assert cl.wait("status", lambda p: p.get("state") == "offline")["global_step"] == 40

    dev.doc["sources"][0]["autostart"] = False  # same data on the second start
    dev.rewrite()
    dev.start()
    cl2 = client_factory(broker.port)
    status = cl2.wait("status", _idle_with(n_windows), timeout=60)
    assert status["global_step"] == 40
    again = cl2.request("evaluate", {"split": "all"})
    assert again["data"]["global_step"] == 40
    assert again["data"]["loss"] == pytest.approx(first["data"]["loss"], rel=1e-5)
    assert again["data"]["accuracy"] == first["data"]["accuracy"]
    # the retained report survives for late subscribers
    assert cl2.wait("report", lambda p: p.get("transaction") == "tx-42")["global_step"] == 40


def _poll_status(cl, pred, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        data = cl.request("status")["data"]
        if pred(data) or time.monotonic() > deadline:
            return data
        time.sleep(0.1)


def test_mqtt_samples_collect_and_label_commands(broker, client_factory, device_factory,
                                                 imu_manifest: Manifest) -> None:
    length, channels = imu_manifest.input.shape
    sources = [{"type": "mqtt", "name": "phone"},
               {"type": "synthetic", "name": "synth", "autostart": False, "fast": True}]
    device_factory(broker.port, sources=sources).start()
    cl = client_factory(broker.port)
    cl.wait("status", lambda p: isinstance(p, dict) and p.get("state") == "collecting", timeout=60)
    rows = [[float(i % 7), 0.5, -1.0][:channels] for i in range(2 * length)]
    cl.publish("samples/phone", {"values": rows, "label": "walk"})
    cl.publish("samples/phone", b'{"values": [[1, 2]]}')  # malformed: dropped, logged
    status = _poll_status(cl, lambda d: d["samples"]["total"] == 2)
    assert status["samples"]["by_label"] == {"walk": {"train": 1, "val": 1}}

    answer = cl.request("collect", {"action": "start", "sources": ["synth"], "label": "idle", "windows": 5})
    assert answer["status"] == "ok" and "synth" in answer["data"]["collecting"]
    status = _poll_status(cl, lambda d: d["samples"]["total"] == 7)
    assert sum(status["samples"]["by_label"]["idle"].values()) == 5

    answer = cl.request("label", {"label": "shake", "last": 2})
    assert answer["status"] == "ok" and answer["data"]["updated"] == 2
    by_label = answer["data"]["samples"]["by_label"]
    assert sum(by_label["idle"].values()) == 3 and sum(by_label["shake"].values()) == 2
    assert cl.request("collect", {"action": "stop"})["data"]["collecting"] == []
