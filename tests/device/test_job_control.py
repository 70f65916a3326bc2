"""Controlling jobs over MQTT on the real daemon and broker: a running training refuses other jobs (Busy) and
bundle changes, `stop` ends it early with a checkpoint and a `stopped` report, and `rollback` discards the newest
checkpoint so that the weights before the last run are the ones in use again."""

from __future__ import annotations

import pytest
from conftest import idle

from hosvd_contract import Manifest


def _ok(answer: dict) -> dict:
    assert answer["status"] == "ok", answer
    return answer["data"]


def _error(answer: dict) -> str:
    assert answer["status"] == "error", answer
    return answer["error"]


def test_a_running_training_refuses_other_jobs_and_stops_on_request(broker, client_factory, device_factory) -> None:
    device_factory(broker.port).start()
    cl = client_factory(broker.port)
    cl.wait("status", idle, timeout=60)
    assert _ok(cl.request("train", {"transaction": "long", "steps": 100_000}))["accepted"] is True
    cl.wait("progress", lambda p: p.get("transaction") == "long" and p["step"] >= 5, timeout=60)
    assert cl.request("status")["data"]["state"] == "training"

    busy = "busy: a train job is running (transaction 'long'); send stop or wait for its report"
    assert _error(cl.request("train", {"transaction": "second", "steps": 5})) == busy
    assert _error(cl.request("evaluate", {"split": "all"})) == busy
    assert _error(cl.request("rollback")) == "busy: cannot roll back while a train job runs"
    assert _error(cl.request("reload", {"bundle": "imu_hosvd"})) == "busy: cannot reload while a train job runs"

    mark = len(cl.seen)
    assert _ok(cl.request("stop")) == {"stopping": True}
    report = cl.wait("report", lambda p: p.get("transaction") == "long", timeout=60, start=mark)
    assert report["status"] == "stopped", report
    done = report["steps_done"]
    assert 5 <= done < 100_000 and report["reason"] == f"stop requested after {done} steps"
    assert report["global_step"] == done and report["checkpoint"] == f"ckpt-{done:09d}.npz"
    assert not [p for p in cl.all("report") if p.get("transaction") == "second"]  # the refused job never ran

    status = cl.wait("status", lambda p: isinstance(p, dict) and p.get("state") == "idle", start=mark)
    assert status["global_step"] == done
    assert _error(cl.request("stop")) == "nothing to stop: no training is running"
    assert _ok(cl.request("evaluate", {"split": "all"}))["global_step"] == done  # free for the next job


def _train(cl, transaction: str, steps: int) -> dict:
    _ok(cl.request("train", {"transaction": transaction, "steps": steps}))
    report = cl.wait("report", lambda p: p.get("transaction") == transaction, timeout=120)
    assert report["status"] == "ok", report
    return report


def test_rollback_over_mqtt_restores_the_weights_before_the_last_run(broker, client_factory, device_factory,
                                                                     imu_manifest: Manifest) -> None:
    device_factory(broker.port).start()
    cl = client_factory(broker.port)
    cl.wait("status", idle, timeout=60)
    assert _error(cl.request("rollback")) == "no checkpoint to roll back: the bundle's initial weights are in use"

    assert _train(cl, "first", 20)["global_step"] == 20  # checkpoints at steps 10 and 20
    after_first = _ok(cl.request("evaluate", {"split": "all"}))
    assert _train(cl, "second", 20)["global_step"] == 40  # 30 and 40; keep_checkpoints = 3 prunes 10
    after_second = _ok(cl.request("evaluate", {"split": "all"}))
    assert after_second["loss"] != pytest.approx(after_first["loss"], rel=1e-6)

    rolled = _ok(cl.request("rollback"))
    assert rolled["global_step"] == 30 and rolled["discarded"].startswith("ckpt-000000040.npz.")
    rolled = _ok(cl.request("rollback"))
    assert rolled["global_step"] == 20 and rolled["discarded"].startswith("ckpt-000000030.npz.")
    assert cl.request("status")["data"]["global_step"] == 20
    now = _ok(cl.request("evaluate", {"split": "all"}))
    assert now["global_step"] == 20
    assert now["loss"] == pytest.approx(after_first["loss"], rel=1e-6)
    assert now["accuracy"] == after_first["accuracy"]

    # training continues from the restored step, and the discarded checkpoints stay out of the listing
    assert _train(cl, "third", 10)["global_step"] == 30
    assert _ok(cl.request("rollback"))["global_step"] == 20
    assert _ok(cl.request("rollback"))["global_step"] == 0  # step 10 was pruned while step 40 existed
    assert _error(cl.request("rollback")).startswith("no checkpoint to roll back")
    initial = _ok(cl.request("evaluate", {"split": "all"}))
    assert initial["global_step"] == 0 and initial["loss"] > after_first["loss"]
