"""``fleet.toml`` (``hosvd-fleet supernode``) and ``systemd/hosvd-fleet.service``: what they start, and refusals
that name the problem."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fleet.cli import NodeConfig, main
from tests.device.test_unit_file import parse_unit, systemd_analyze

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "hosvd-fleet.service"
DEVICE_UNIT = REPO / "systemd" / "hosvd-device.service"
EXAMPLE = REPO / "deploy" / "fleet.toml.example"
EXEC_START = "/opt/hosvd-edge/venv/bin/hosvd-fleet supernode --config /etc/hosvd-edge/fleet.toml"


def write(directory: Path, text: str, *files: str) -> Path:
    for name in files:
        (directory / name).write_text("x\n")
    path = directory / "fleet.toml"
    path.write_text(text)
    return path


def test_the_example_starts_a_tls_supernode_for_the_device(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace("# auth_private_key", "auth_private_key").replace(
        "# auth_public_key", "auth_public_key").replace('# bundle = "digits"', 'bundle = "digits"')
    path = write(tmp_path, text, "device.toml", "fleet-ca.pem", "fleet-node.key", "fleet-node.pub")
    cmd = NodeConfig.load(path).command(tmp_path)
    assert cmd[0].endswith("flower-supernode")
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert args["--superlink"] == "fleet.example.org:8000"
    assert args["--root-certificates"] == str(tmp_path / "fleet-ca.pem")
    assert args["--node-config"] == f'device-config="{tmp_path / "device.toml"}" bundle="digits"'
    assert args["--auth-supernode-private-key"] == str(tmp_path / "fleet-node.key")
    assert args["--auth-supernode-public-key"] == str(tmp_path / "fleet-node.pub")
    assert args["--host"] == "127.0.0.1" and args["--port"] == "9094"
    assert "--insecure" not in cmd


@pytest.mark.parametrize(("text", "files", "message"), [
    ('superlink = "a:1"\ninsecure = true\n', [], "missing ['device_config']"),
    ('device_config = "d.toml"\nsuperlink = "a:1"\n', ["d.toml"], "set root_certificates"),
    ('device_config = "d.toml"\nsuperlink = "a:1"\ninsecure = true\nport = 3\n', ["d.toml"], "unknown keys ['port']"),
    ('device_config = "d.toml"\nsuperlink = "a:1"\ninsecure = true\n', [], "device_config d.toml does not exist"),
    ('device_config = "d.toml"\nsuperlink = "a:1"\ninsecure = true\nauth_private_key = "k"\n', ["d.toml", "k"],
     "auth_private_key and auth_public_key go together"),
    ('device_config = "d.toml"\nsuperlink = \n', [], "fleet.toml"),
    ('device_config = "d.toml"\nsuperlink = "a:1"\ninsecure = true\nbundle = "../x"\n', ["d.toml"],
     "bundle must be a plain bundle name"),
])
def test_a_bad_fleet_config_is_refused_naming_the_problem(tmp_path: Path, text: str, files: list[str],
                                                          message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        NodeConfig.load(write(tmp_path, text, *files))


def test_the_unit_shares_the_daemons_user_state_and_hardening() -> None:
    unit, device = parse_unit(UNIT.read_text()), parse_unit(DEVICE_UNIT.read_text())
    service = unit["Service"]
    assert service["ExecStart"] == [EXEC_START]
    assert service["User"] == ["hosvd-device"]  # the daemon's DynamicUser name: one UID for the state directory
    assert service["StateDirectory"] == device["Service"]["StateDirectory"]
    for key in ("ProtectSystem", "NoNewPrivileges", "CapabilityBoundingSet", "PrivateUsers", "SystemCallFilter",
                "RestrictAddressFamilies", "MemoryDenyWriteExecute", "MemorySwapMax"):
        assert service[key] == device["Service"][key], key


def test_systemd_accepts_the_unit_and_rates_its_exposure_at_most_2_5(tmp_path: Path) -> None:
    text = UNIT.read_text()
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={EXEC_START}", f"ExecStart={shutil.which('true')} supernode"))
    verify = subprocess.run([systemd_analyze(), "verify", "--man=no", str(copy)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert verify.returncode == 0 and "Unknown key" not in verify.stderr, verify.stdout + verify.stderr
    security = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager", str(UNIT)],
                              capture_output=True, text=True, timeout=120, check=False)
    match = re.search(r"Overall exposure level for hosvd-fleet\.service: (\d+\.\d+)", security.stdout)
    assert match and float(match.group(1)) <= 2.5, security.stdout + security.stderr


def test_run_refuses_a_non_bundle_and_a_missing_tls_choice(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--bundle", str(tmp_path), "--out", str(tmp_path / "o"), "--insecure"]) == 2
    assert "is not a bundle (no manifest.json)" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text("{}")
    assert main(["run", "--bundle", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "give --root-certificates CA.pem (TLS) or --insecure" in capsys.readouterr().err
    assert main(["supernode", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err
