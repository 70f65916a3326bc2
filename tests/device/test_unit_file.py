"""systemd/hosvd-device.service as systemd reads it: `systemd-analyze security --offline=true` exposure (at most
2.5) and `systemd-analyze verify`; plus what those cannot know: the watchdog against the daemon's ping period,
MemoryMax against the example's RAM ceiling, and hardening that would stop the daemon from working."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "hosvd-device.service"
EXAMPLE = REPO / "deploy" / "device.toml.example"
MAX_EXPOSURE = 2.5
EXEC_START = "/opt/hosvd-edge/venv/bin/hosvd-device run --config /etc/hosvd-edge/device.toml"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value assigned, in order (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {raw!r}"
        assert "=" in line, f"not a key=value line: {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def last(unit, section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:  # an error under CI (tests/conftest.py)
        pytest.skip("systemd-analyze not found: apt-get install systemd (.ci/run does)")
    return path


def mib(size: str) -> float:
    """A systemd size (640M, 1G, 512K, bytes) in MiB."""
    match = re.fullmatch(r"(\d+)([KMGT]?)", size)
    assert match, f"not a size: {size!r}"
    factor = {"": 1 / 2**20, "K": 1 / 2**10, "M": 1, "G": 2**10, "T": 2**20}[match.group(2)]
    return int(match.group(1)) * factor


def test_the_watchdog_is_on_and_longer_than_a_ping_period(unit):
    watchdog = last(unit, "Service", "WatchdogSec")
    seconds = int(re.fullmatch(r"(\d+)s?", watchdog).group(1))
    assert seconds >= 10, "the daemon pings every WatchdogSec/2; a very short timeout restarts it needlessly"


def test_memory_max_leaves_headroom_above_the_example_ceiling(unit):
    ceiling = tomllib.loads(EXAMPLE.read_text())["training"]["ram_ceiling_mb"]
    memory_max = mib(last(unit, "Service", "MemoryMax"))
    assert memory_max >= ceiling + 128, (memory_max, ceiling)


def test_the_daemon_keeps_what_it_needs(unit):
    service = unit["Service"]
    families = " ".join(service["RestrictAddressFamilies"]).split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families), "broker over TCP, sd_notify over AF_UNIX"
    assert "i2c" in " ".join(service["SupplementaryGroups"]).split(), "/dev/i2c-* is group i2c"
    assert "hosvd-edge" in " ".join(service["SupplementaryGroups"]).split(), "reads the 0640 config"
    assert service.get("PrivateNetwork", ["no"])[-1] == "no", "the broker is on the network"
    assert service.get("PrivateDevices", ["no"])[-1] == "no", "a private /dev hides /dev/i2c-*"
    assert service.get("ProcSubset", ["all"])[-1] == "all", "the runtime reads /proc/cpuinfo"
    for key in ("InaccessiblePaths", "TemporaryFileSystem"):
        assert not any("/sys" in v for v in service.get(key, [])), "IIO sources read /sys/bus/iio"
    assert last(unit, "Install", "WantedBy") == "multi-user.target"


def test_security_exposure_is_at_most_2_5():
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for hosvd-device\.service: (\d+\.\d+)", output)
    assert match, output
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, output


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # verify also checks that ExecStart's binary exists: point it at one that does, keep everything else.
    text = UNIT.read_text()
    assert f"ExecStart={EXEC_START}\n" in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={EXEC_START}", f"ExecStart={shutil.which('true')} run"))
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Unknown key" not in result.stderr and "Unknown section" not in result.stderr, result.stderr
    assert "Failed to parse" not in result.stderr, result.stderr
