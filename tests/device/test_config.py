"""Config validation: every problem reported at once, naming section and key; defaults filled; paths
resolved against the config file; ``check-config`` exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_app.cli import explain, main
from device_app.config import SECTIONS, ConfigError, load_config
from device_app.schema import describe

MINIMAL = '[device]\nid = "pi-1"\nstate_dir = "state"\n[model]\nbundle = "imu"\n'


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "device.toml"
    path.write_text(text)
    return path


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL))
    assert cfg.device.id == "pi-1" and cfg.state_dir == tmp_path / "state"
    assert cfg.bundles_dir == tmp_path / "state" / "bundles"
    assert cfg.db_path == tmp_path / "state" / "store.sqlite"
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.base_topic, cfg.mqtt.protocol) == ("localhost", 1883,
                                                                                       "hosvd-edge", "5")
    assert cfg.training.ram_ceiling_mb == 0 and cfg.training.steps == 100 and cfg.training.keep_checkpoints == 3
    assert cfg.sources == []


@pytest.mark.parametrize(("snippet", "expected"), [
    ('[mqtt]\nport = "1883"\n', "[mqtt] port: must be an integer, got '1883'"),
    ("[mqtt]\nport = 70000\n", "[mqtt] port: must be <= 65535, got 70000"),
    ("[mqtt]\nprotocol = \"4\"\n", "[mqtt] protocol: must be one of ['5', '3.1.1']"),
    ("[mqtt]\nbase_topic = \"a/#\"\n", "[mqtt] base_topic: must match"),
    ("[mqtt]\npassword = \"x\"\n", "[mqtt] password is set but username is not"),
    ("[mqtt]\nca_file = \"ca.pem\"\n", "[mqtt] ca_file is set but tls = false"),
    ("[training]\nram_ceiling_mb = -1\n", "[training] ram_ceiling_mb: must be >= 0, got -1"),
    ("[training]\nstep = 5\n", "[training] unknown key 'step'; allowed:"),
    ("[store]\nval_fraction = 0.95\n", "[store] val_fraction: must be <= 0.9"),
    ("[trainig]\n", "unknown section [trainig]"),
    ('[[sources]]\ntype = "gps"\n', "[[sources]] #1 type: must be one of ['camera', 'csv', 'iio', 'mpu6050', 'mqtt', "
                                    "'synthetic'], got 'gps'"),
    ('[[sources]]\ntype = "csv"\n', "[[sources]] #1 (csv) path: is required"),
    ('[[sources]]\ntype = "csv"\npath = "x"\npacing = "slow"\n', "pacing: must be one of ['realtime', 'fast']"),
    ('[[sources]]\ntype = "mpu6050"\naddress = 0x70\n', "address: must be one of [104, 105]"),
    ('[[sources]]\ntype = "synthetic"\nname = "a"\n[[sources]]\ntype = "synthetic"\nname = "a"\n',
     "name 'a' is used more than once"),
])
def test_invalid_values_are_named(tmp_path: Path, snippet: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, MINIMAL + snippet))
    assert expected in str(info.value)


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    text = '[device]\nstate_dir = 3\n[model]\n[mqtt]\nport = 0\nkeepalive = "x"\n'
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    message = str(info.value)
    for part in ("[device] id: is required", "[device] state_dir: must be a string", "[model] bundle: is required",
                 "[mqtt] port: must be >= 1", "[mqtt] keepalive: must be an integer"):
        assert part in message


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(_write(tmp_path, "[device\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_check_config_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _write(tmp_path, MINIMAL + '[[sources]]\ntype = "synthetic"\n')
    assert main(["check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "synthetic1 (synthetic)" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL + "[mqtt]\nport = 0\n")
    assert main(["check-config", str(bad)]) == 2
    assert "[mqtt] port: must be >= 1" in capsys.readouterr().err


def test_explain_documents_every_key() -> None:
    text = explain()
    for cls in SECTIONS.values():
        for key, _, _, doc in describe(cls):
            assert doc, f"{cls.__name__}.{key} has no doc"
            assert f"  {key} (" in text
    assert '[[sources]] type = "mpu6050"' in text and "accel_range_g" in text


def test_docs_list_every_config_key() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "device.md").read_text()
    for name, cls in SECTIONS.items():
        assert f"### `[{name}]`" in doc
        for key, *_ in describe(cls):
            assert f"| `{key}` |" in doc, f"[{name}] {key} is not in docs/device.md"
