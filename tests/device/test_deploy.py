"""deploy/: install.sh (dry run and a real run into tmp_path), push-bundle.sh against a real Mosquitto broker
with a stand-in daemon answering `reload`, the config example against the daemon's schema, and the Ansible
playbook (syntax check when ansible is installed, a structural YAML check otherwise)."""

from __future__ import annotations

import base64
import grp
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
INSTALL = DEPLOY / "install.sh"
PUSH = DEPLOY / "push-bundle.sh"
EXAMPLE = DEPLOY / "device.toml.example"
ANSIBLE = DEPLOY / "ansible"
SCRIPTS = [INSTALL, PUSH]


def run(cmd: list[str | os.PathLike], env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- shell scripts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_executable(script):
    assert run(["bash", "-n", script]).returncode == 0
    assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_shellcheck_clean(script):
    result = run(["shellcheck", script])
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_reject_unknown_options(script):
    result = run([script, "--frobnicate"])
    assert result.returncode != 0
    assert "unknown option --frobnicate" in result.stderr


# --- install.sh --------------------------------------------------------------------------------------------


def install_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        str(INSTALL),
        "--python", sys.executable,
        "--prefix", str(tmp_path / "opt"),
        "--etc-dir", str(tmp_path / "etc"),
        "--unit-dir", str(tmp_path / "units"),
        *extra,
    ]  # fmt: skip


def test_install_dry_run_prints_every_step_and_touches_nothing(tmp_path):
    before = tree(tmp_path)
    result = run([*install_args(tmp_path, "--dry-run", "--device-id", "pi-kitchen")])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert tree(tmp_path) == before, "a dry run created files"
    venv = tmp_path / "opt" / "venv"
    assert f"[dry-run] {sys.executable} -m venv {venv}" in out
    assert re.search(rf"\[dry-run\] {re.escape(str(venv))}/bin/python -m pip install .*\\\[device\\\]", out), out
    for group in ("i2c", "hosvd-edge"):
        assert (f"[dry-run] groupadd --system {group}" in out) == (not group_exists(group)), out
    assert f"[dry-run] write {tmp_path}/etc/hosvd-edge/device.toml (mode 0640" in out
    assert f"[dry-run] write {tmp_path}/units/hosvd-device.service (mode 0644" in out
    # ram_ceiling_mb = 512 in the example -> MemoryMax = 512 + 128 MiB headroom
    assert "[dry-run]   | MemoryMax=640M" in out
    assert "[dry-run] systemctl daemon-reload" in out
    assert "[dry-run] systemctl enable --now hosvd-device.service" in out
    assert out.rstrip().endswith("done (changed)")


def test_install_dry_run_legacy_uses_the_legacy_extra(tmp_path):
    result = run([*install_args(tmp_path, "--dry-run", "--legacy")])
    assert result.returncode == 0, result.stderr
    assert "\\[device-legacy\\]" in result.stdout


def test_install_legacy_refuses_python_other_than_3_11(tmp_path):
    fake = tmp_path / "python3.13"
    fake.write_text("#!/bin/sh\necho 3.13\n")
    fake.chmod(0o755)
    result = run([*install_args(tmp_path, "--dry-run", "--legacy"), "--python", fake])
    assert result.returncode != 0
    assert "--legacy needs Python 3.11" in result.stderr
    result = run([*install_args(tmp_path, "--dry-run"), "--python", fake])
    assert result.returncode == 0, result.stderr


def test_install_rejects_a_source_that_is_not_a_wheel_or_project(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    result = run([*install_args(tmp_path, "--dry-run"), tmp_path / "notes.txt"])
    assert result.returncode != 0 and "neither a wheel" in result.stderr
    result = run([*install_args(tmp_path, "--dry-run"), tmp_path])
    assert result.returncode != 0 and "without pyproject.toml" in result.stderr


FAKE_CLI = """\
import sys, tomllib


def main():
    if sys.argv[1:2] == ["check-config"]:
        try:
            with open(sys.argv[2], "rb") as f:
                data = tomllib.load(f)
            data["device"]["id"]
        except Exception as err:
            print(f"invalid: {err}", file=sys.stderr)
            return 1
        print("config ok")
        return 0
    return 2
"""


def make_fake_wheel(directory: Path) -> Path:
    """A stand-in hosvd-edge wheel (extras device/device-legacy, console script hosvd-device), built by hand so
    the real-run test installs offline in a second."""
    files = {
        "fake_hosvd_device.py": FAKE_CLI,
        "hosvd_edge-0.1.0.dist-info/METADATA": (
            "Metadata-Version: 2.1\nName: hosvd-edge\nVersion: 0.1.0\n"
            "Provides-Extra: device\nProvides-Extra: device-legacy\n"
        ),
        "hosvd_edge-0.1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        "hosvd_edge-0.1.0.dist-info/entry_points.txt": "[console_scripts]\nhosvd-device = fake_hosvd_device:main\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append("hosvd_edge-0.1.0.dist-info/RECORD,,")
    files["hosvd_edge-0.1.0.dist-info/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / "hosvd_edge-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


def test_install_real_run_into_tmp_is_idempotent_and_keeps_the_config(tmp_path):
    wheel = make_fake_wheel(tmp_path)
    args = [
        *install_args(tmp_path, "--no-system", "--device-id", "pi-kitchen"),
        "--pip-option=--no-index",
        "--pip-option=--no-deps",
        str(wheel),
    ]
    conf = tmp_path / "etc" / "hosvd-edge" / "device.toml"
    unit = tmp_path / "units" / "hosvd-device.service"
    dropin = tmp_path / "units" / "hosvd-device.service.d" / "50-memory.conf"
    venv = tmp_path / "opt" / "venv"

    first = run(args, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (venv / "bin" / "hosvd-device").is_file()
    assert "config ok" in first.stdout  # hosvd-device check-config ran on the new config
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    config = tomllib.loads(conf.read_text())
    assert config["device"]["id"] == "pi-kitchen"
    assert config == {**tomllib.loads(EXAMPLE.read_text()), "device": config["device"]}
    unit_text = unit.read_text()
    assert f"ExecStart={venv}/bin/hosvd-device run --config {conf}\n" in unit_text
    assert "/opt/hosvd-edge" not in unit_text.split("[Unit]")[1]
    assert unit_text.replace(f"{venv}/bin/hosvd-device run --config {conf}", "X") == (
        REPO / "systemd" / "hosvd-device.service"
    ).read_text().replace("/opt/hosvd-edge/venv/bin/hosvd-device run --config /etc/hosvd-edge/device.toml", "X")
    assert "MemoryMax=640M" in dropin.read_text()
    assert first.stdout.rstrip().endswith("done (changed)")
    assert "skipped (--no-system)" in first.stdout

    unit_mtime = unit.stat().st_mtime_ns
    second = run(args, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.rstrip().endswith("done (nothing changed)"), second.stdout
    assert f"kept existing {conf}" in second.stdout
    assert unit.stat().st_mtime_ns == unit_mtime

    # The user's edits survive; a new ceiling gives a new MemoryMax.
    conf.write_text(conf.read_text().replace("ram_ceiling_mb = 512", "ram_ceiling_mb = 300"))
    third = run(args, timeout=300)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "ram_ceiling_mb = 300" in conf.read_text()
    assert "MemoryMax=428M" in dropin.read_text()
    assert third.stdout.rstrip().endswith("done (changed)")

    # An invalid config stops the install before the unit is (re)written.
    conf.write_text("[device\n")
    fourth = run(args, timeout=300)
    assert fourth.returncode != 0
    assert "is invalid" in fourth.stderr


# --- push-bundle.sh ----------------------------------------------------------------------------------------


def make_bundle(path: Path, model: bytes = b"model-v1") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"format_version": 1}))
    (path / "model.tflite").write_bytes(model)
    return path


@pytest.fixture
def fake_ssh(tmp_path) -> dict[str, str]:
    """HOSVD_SSH stand-in that runs the 'remote' command here, as ssh's remote shell would."""
    script = tmp_path / "fake-ssh"
    script.write_text('#!/bin/sh\nshift\nexec sh -c "$*"\n')
    script.chmod(0o755)
    return {"HOSVD_SSH": str(script)}


def test_push_copies_over_ssh_and_replaces_atomically(tmp_path, fake_ssh):
    bundles = tmp_path / "device" / "bundles"
    source = make_bundle(tmp_path / "har-v1")
    result = run([PUSH, "pi-01", source, "--name", "har", "--bundles-dir", bundles], env=fake_ssh)
    assert result.returncode == 0, result.stderr
    assert (bundles / "har" / "model.tflite").read_bytes() == b"model-v1"
    assert "not asking for a reload" in result.stdout

    make_bundle(source, b"model-v2")
    result = run([PUSH, "pi-01", source, "--name", "har", "--bundles-dir", bundles], env=fake_ssh)
    assert result.returncode == 0, result.stderr
    assert (bundles / "har" / "model.tflite").read_bytes() == b"model-v2"
    assert os.listdir(bundles) == ["har"], "temporary or replaced directories left behind"
    assert stat.S_IMODE((bundles / "har" / "model.tflite").stat().st_mode) == 0o644


def test_push_defaults_the_name_to_the_directory_name(tmp_path):
    bundles = tmp_path / "bundles"
    source = make_bundle(tmp_path / "digits-v3")
    result = run([PUSH, "--local", source, "--bundles-dir", bundles])
    assert result.returncode == 0, result.stderr
    assert (bundles / "digits-v3" / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "../escape"], "bundle name must match"),
        (["--name", ".hidden"], "bundle name must match"),
        (["--bundles-dir", "relative/dir"], "--bundles-dir must be an absolute path"),
        (["--broker", "localhost"], "--broker and --device-id go together"),
    ],
)
def test_push_refuses_bad_arguments_before_copying(tmp_path, args, message):
    bundles = tmp_path / "bundles"
    source = make_bundle(tmp_path / "har")
    result = run([PUSH, "--local", source, "--bundles-dir", bundles, *args])
    assert result.returncode != 0
    assert message in result.stderr
    assert not bundles.exists()


def test_push_refuses_a_directory_that_is_not_a_bundle(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run([PUSH, "--local", tmp_path / "empty", "--bundles-dir", tmp_path / "bundles"])
    assert result.returncode != 0
    assert "no manifest.json" in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def broker(tmp_path):
    """A real Mosquitto broker on a free local port; yields the port."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(binary, os.X_OK) or shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto and mosquitto-clients are needed (.ci/run installs them)")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mosquitto did not start: {proc.stderr.read().decode()}")
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


class StandInDaemon:
    """Answers `reload` requests the way the daemon's MQTT API does, from a bundles directory; first sends a
    decoy response with another transaction, which push-bundle.sh must ignore."""

    def __init__(self, port: int, bundles: Path, device_id: str = "pi-01", refuse: bool = False) -> None:
        import paho.mqtt.client as mqtt

        self.bundles = bundles
        self.refuse = refuse
        self.requests: list[dict] = []
        self.prefix = f"hosvd-edge/{device_id}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{self.prefix}/request/reload", qos=1)
        self.client.loop_start()
        assert subscribed.wait(10), "stand-in daemon could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        request = json.loads(msg.payload)
        self.requests.append(request)
        topic = f"{self.prefix}/response/reload"
        decoy = {"transaction": "someone-else", "status": "error", "error": "not yours"}
        client.publish(topic, json.dumps(decoy), qos=1)
        name = request["bundle"]
        if self.refuse or not (self.bundles / name / "manifest.json").is_file():
            answer = {"transaction": request.get("transaction"), "status": "error", "error": f"bad bundle {name}"}
        else:
            answer = {"transaction": request.get("transaction"), "status": "ok", "data": {"bundle": name}}
        client.publish(topic, json.dumps(answer), qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def push_and_reload(tmp_path, port, *extra):
    source = make_bundle(tmp_path / "har-v2")
    return run(
        [PUSH, "--local", source, "--name", "har", "--bundles-dir", tmp_path / "bundles",
         "--broker", "127.0.0.1", "--port", str(port), "--device-id", "pi-01", *extra],
        timeout=60,
    )  # fmt: skip


def test_push_then_reload_waits_for_the_matching_ok_response(tmp_path, broker):
    daemon = StandInDaemon(broker, tmp_path / "bundles")
    try:
        result = push_and_reload(tmp_path, broker, "--timeout", "20")
    finally:
        daemon.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(daemon.requests) == 1
    (request,) = daemon.requests
    assert request["bundle"] == "har"
    assert request["transaction"].startswith("push-har-")
    assert f'"transaction": "{request["transaction"]}"' in result.stdout
    assert "device pi-01 reloaded bundle 'har'" in result.stdout


def test_push_reports_a_refused_reload(tmp_path, broker):
    daemon = StandInDaemon(broker, tmp_path / "bundles", refuse=True)
    try:
        result = push_and_reload(tmp_path, broker, "--timeout", "20")
    finally:
        daemon.close()
    assert result.returncode != 0
    assert "refused to reload 'har'" in result.stderr
    assert "bad bundle har" in result.stdout
    assert (tmp_path / "bundles" / "har" / "model.tflite").is_file()  # the copy itself stays


def test_push_times_out_when_no_daemon_answers(tmp_path, broker):
    start = time.monotonic()
    result = push_and_reload(tmp_path, broker, "--timeout", "2")
    assert result.returncode != 0
    assert "no response on hosvd-edge/pi-01/response/reload within 2s" in result.stderr
    assert time.monotonic() - start < 30


def test_push_fails_clearly_when_the_broker_is_unreachable(tmp_path):
    if shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto-clients not installed")
    result = push_and_reload(tmp_path, free_port(), "--timeout", "2")
    assert result.returncode != 0
    assert "cannot publish" in result.stderr or "no subscription" in result.stderr


# --- device.toml.example -----------------------------------------------------------------------------------


def test_config_example_is_valid_for_the_daemon(tmp_path):
    config = pytest.importorskip("device_app.config")
    cfg = config.load_config(EXAMPLE)
    assert cfg.device.id == "pi-01"
    assert cfg.training.ram_ceiling_mb == 512
    assert cfg.state_dir == Path("/var/lib/hosvd-edge")


def test_config_example_mentions_every_key_of_the_schema():
    config = pytest.importorskip("device_app.config")
    sources = pytest.importorskip("device_app.sources")
    import dataclasses

    text = EXAMPLE.read_text()
    sections = re.split(r"^\[(\w+)\]$", text, flags=re.M)
    body = dict(zip(sections[1::2], sections[2::2], strict=True))
    missing = []
    for name, cls in config.SECTIONS.items():
        for field in dataclasses.fields(cls):
            if not re.search(rf"^(# )?{field.name} = ", body.get(name, ""), flags=re.M):
                missing.append(f"[{name}] {field.name}")
    for kind in sources.SOURCE_TYPES:
        for field in dataclasses.fields(sources.options_class(kind)):
            if not re.search(rf"^#? *{field.name}\b", text, flags=re.M):
                missing.append(f"[[sources]] {kind}: {field.name}")
    assert not missing, f"keys without an entry in {EXAMPLE.name}: {missing}"


# --- Ansible -----------------------------------------------------------------------------------------------


def test_ansible_playbook_syntax():
    playbook = ANSIBLE / "site.yml"
    inventory = ANSIBLE / "inventory.example.ini"
    if shutil.which("ansible-playbook"):
        result = run(["ansible-playbook", "--syntax-check", "-i", inventory, playbook], timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return
    yaml = pytest.importorskip("yaml")
    plays = yaml.safe_load(playbook.read_text())
    assert isinstance(plays, list) and plays
    roles = {r if isinstance(r, str) else r["role"] for play in plays for r in play.get("roles", [])}
    assert "hosvd_device" in roles
    for path in (ANSIBLE / "roles").rglob("*.yml"):
        data = yaml.safe_load(path.read_text())
        if path.parent.name in ("tasks", "handlers"):
            assert isinstance(data, list), path
            for task in data:
                assert "name" in task, f"{path}: task without a name: {task}"


def test_ansible_role_copies_the_files_install_needs():
    tasks = ANSIBLE / "roles" / "hosvd_device" / "tasks"
    text = "\n".join(p.read_text() for p in tasks.glob("*.yml"))
    for needed in ("install.sh", "push-bundle.sh", "device.toml.example", "hosvd-device.service"):
        assert needed in text, f"the role does not copy {needed}"
    assert (ANSIBLE / "roles" / "hosvd_device" / "templates" / "device.toml.j2").is_file()
