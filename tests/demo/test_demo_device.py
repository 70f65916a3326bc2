"""The demo's device side: the config it writes is one the daemon accepts, and stopping a daemon always works."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

from demo import datasets
from demo.broker import BrokerAddress
from demo.device import stop_group, to_toml, write_config
from demo.run import SETTINGS, device_config, hand_over_recordings


def test_to_toml_round_trips() -> None:
    sections = {"a": {"s": 'quote " and \\ backslash', "i": 3, "f": 0.5, "b": True, "l": ["x", "y"], "n": None}}
    text = to_toml(sections, {"sources": [{"type": "csv"}, {"type": "iio"}]})
    data = tomllib.loads(text)
    assert data["a"] == {"s": 'quote " and \\ backslash', "i": 3, "f": 0.5, "b": True, "l": ["x", "y"]}
    assert data["sources"] == [{"type": "csv"}, {"type": "iio"}]


def test_device_config_is_accepted_by_the_daemon(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    user = datasets.Dataset(
        rng.normal(size=(4, 100, 6)).astype(np.float32),
        np.array([0, 1, 2, 3], np.int32),
        ["a", "b", "c", "d"],
        list(datasets.BASICMOTIONS_CHANNELS),
        "NLC",
        10.0,
    )
    sources, csv_path = hand_over_recordings(user, tmp_path / "device")
    assert csv_path.is_file() and sources[0]["type"] == "csv"
    sections = device_config(
        tmp_path, BrokerAddress("127.0.0.1", 1884), "3.1.1", "imu", SETTINGS["basicmotions"], steps=10,
        ram_ceiling_mb=SETTINGS["basicmotions"].ram_ceiling_mb,
    )
    path = write_config(tmp_path / "device" / "device.toml", sections, sources)  # raises if the daemon refuses
    from device_app.config import load_config

    cfg = load_config(path)
    assert cfg.mqtt.port == 1884 and cfg.mqtt.protocol == "3.1.1"
    assert cfg.training.ram_ceiling_mb == SETTINGS["basicmotions"].ram_ceiling_mb
    assert cfg.sources[0].path == str(csv_path)


def test_images_go_into_the_device_store(tmp_path: Path) -> None:
    user = datasets.Dataset(
        np.zeros((10, 8, 8, 1), np.float32), np.arange(10, dtype=np.int32) % 2, ["0", "1"], None, "NHWC"
    )
    sources, db_path = hand_over_recordings(user, tmp_path / "device")
    assert sources == []
    from device_app.store import Store

    store = Store(db_path)
    try:
        counts = store.counts()
    finally:
        store.close()
    assert counts["total"] == 10, counts


def test_stop_group_kills_a_child_that_ignores_sigterm() -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    start = time.monotonic()
    stop_group(proc, "stubborn child", timeout_s=1.0)
    assert proc.returncode is not None and proc.returncode < 0
    assert time.monotonic() - start < 10
