"""deploy/: install.sh (dry run, and a real run into tmp_path that installs a wheel of this checkout and validates
with its real ``hosvd-device check-config``), push-bundle.sh copying real bundles and asking the real daemon to
reload over a real Mosquitto, the config example against the daemon's schema, and the Ansible playbook
(``ansible-playbook --syntax-check``; ansible-core comes with the ``dev`` extra)."""

from __future__ import annotations

import dataclasses
import grp
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from conftest import BUNDLE_NAME, free_port, idle

from device_app import config as device_config
from device_app import sources as device_sources
from hosvd_contract import load_manifest

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


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (apt-get install shellcheck; .ci/run does)")
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


@pytest.fixture(scope="module")
def checkout_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout, built offline from a copy of its packages (the build never writes into the repo)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for package in ("converter", "device_app", "hosvd_contract", "bench", "demo"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "results"))
    result = run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                  "--wheel-dir", root / "dist", src], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (root / "dist").glob("hosvd_edge-*.whl")
    return wheel


SEES_TEST_PACKAGES = """\
#!/bin/sh
# This Python, except that a virtual environment it creates also imports from {packages} (the test
# environment's packages: numpy, paho-mqtt, pip itself, ...), so install.sh installs the real wheel offline
# with --no-deps, and the venv needs no pip of its own (ensurepip is most of the time a venv takes).
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    shift 2
    "{python}" -m venv --without-pip "$@" || exit $?
    echo "{packages}" > "$1/lib/python{version}/site-packages/test-packages.pth"
    exit 0
fi
exec "{python}" "$@"
"""


def python_seeing_test_packages(directory: Path) -> Path:
    """A ``--python`` for install.sh whose venvs can import this environment's packages (import packages only:
    no ``*.dist-info``, so pip sees neither them nor this environment's own hosvd-edge)."""
    packages = directory / "test-packages"
    packages.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.endswith((".dist-info", ".pth")) and entry.name not in ("__pycache__", "_virtualenv.py") \
                and not entry.name.startswith("__editable__"):
            (packages / entry.name).symlink_to(entry)
    python = directory / "python"
    python.write_text(SEES_TEST_PACKAGES.format(python=sys.executable, packages=packages,
                                                version=f"{sys.version_info[0]}.{sys.version_info[1]}"))
    python.chmod(0o755)
    return python


def test_install_real_run_into_tmp_is_idempotent_and_keeps_the_config(tmp_path, checkout_wheel):
    args = [
        *install_args(tmp_path, "--no-system", "--device-id", "pi-kitchen"),
        "--python", python_seeing_test_packages(tmp_path),
        "--pip-option=--no-index",
        "--pip-option=--no-deps",
        str(checkout_wheel),
    ]
    conf = tmp_path / "etc" / "hosvd-edge" / "device.toml"
    unit = tmp_path / "units" / "hosvd-device.service"
    dropin = tmp_path / "units" / "hosvd-device.service.d" / "50-memory.conf"
    venv = tmp_path / "opt" / "venv"

    first = run(args, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (venv / "bin" / "hosvd-device").is_file()
    assert f"{conf}: OK" in first.stdout  # the installed hosvd-device check-config accepted the new config
    assert "device pi-kitchen, state in /var/lib/hosvd-edge" in first.stdout
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

    # A config the daemon would refuse stops the install before the unit is (re)written: TOML that does not
    # parse, and TOML that parses but breaks the schema (only the daemon's own validator knows that).
    for broken, message in [("[device\n", "device.toml"),
                            (conf.read_text().replace("ram_ceiling_mb = 300", "ram_ceiling_mb = -5"),
                             "[training] ram_ceiling_mb: must be >= 0, got -5")]:
        conf.write_text(broken)
        unit.unlink(missing_ok=True)
        fourth = run(args, timeout=300)
        assert fourth.returncode != 0
        assert message in fourth.stdout + fourth.stderr, fourth.stdout + fourth.stderr
        assert f"{conf} is invalid" in fourth.stderr
        assert not unit.exists()


# --- push-bundle.sh ----------------------------------------------------------------------------------------


def make_bundle(path: Path, bundles_dir: Path, name: str = BUNDLE_NAME) -> Path:
    """A copy of the converter-built test bundle ``name`` at ``path``."""
    shutil.copytree(bundles_dir / name, path, dirs_exist_ok=True)
    return path


@pytest.fixture
def fake_ssh(tmp_path) -> dict[str, str]:
    """HOSVD_SSH stand-in that runs the 'remote' command here, as ssh's remote shell would."""
    script = tmp_path / "fake-ssh"
    script.write_text('#!/bin/sh\nshift\nexec sh -c "$*"\n')
    script.chmod(0o755)
    return {"HOSVD_SSH": str(script)}


def test_push_copies_over_ssh_and_replaces_atomically(tmp_path, fake_ssh, bundles_dir):
    bundles = tmp_path / "device" / "bundles"
    source = make_bundle(tmp_path / "har-v1", bundles_dir, "imu_hosvd")
    result = run([PUSH, "pi-01", source, "--name", "har", "--bundles-dir", bundles], env=fake_ssh)
    assert result.returncode == 0, result.stderr
    assert (bundles / "har" / "model.tflite").read_bytes() == (source / "model.tflite").read_bytes()
    assert "not asking for a reload" in result.stdout

    source = make_bundle(tmp_path / "har-v2", bundles_dir, "imu_none")
    result = run([PUSH, "pi-01", source, "--name", "har", "--bundles-dir", bundles], env=fake_ssh)
    assert result.returncode == 0, result.stderr
    assert (bundles / "har" / "model.tflite").read_bytes() == (source / "model.tflite").read_bytes()
    assert load_manifest(bundles / "har").sha256 == load_manifest(bundles_dir / "imu_none").sha256
    assert os.listdir(bundles) == ["har"], "temporary or replaced directories left behind"
    assert stat.S_IMODE((bundles / "har" / "model.tflite").stat().st_mode) == 0o644


def test_push_defaults_the_name_to_the_directory_name(tmp_path, bundles_dir):
    bundles = tmp_path / "bundles"
    source = make_bundle(tmp_path / "digits-v3", bundles_dir)
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
def test_push_refuses_bad_arguments_before_copying(tmp_path, args, message, bundles_dir):
    bundles = tmp_path / "bundles"
    source = make_bundle(tmp_path / "har", bundles_dir)
    result = run([PUSH, "--local", source, "--bundles-dir", bundles, *args])
    assert result.returncode != 0
    assert message in result.stderr
    assert not bundles.exists()


def test_push_refuses_a_directory_that_is_not_a_bundle(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run([PUSH, "--local", tmp_path / "empty", "--bundles-dir", tmp_path / "bundles"])
    assert result.returncode != 0
    assert "no manifest.json" in result.stderr


def push_and_reload(tmp_path: Path, port: int, source: Path, bundles: Path, *extra: str) -> subprocess.Popen:
    """push-bundle.sh --local SOURCE as bundle ``har`` into ``bundles``, asking device ``dev1`` to reload it."""
    cmd = [PUSH, "--local", source, "--name", "har", "--bundles-dir", bundles,
           "--broker", "127.0.0.1", "--port", str(port), "--device-id", "dev1", *extra]  # fmt: skip
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_push_then_the_daemon_reloads_and_the_script_waits_for_its_answer(tmp_path, broker, device_factory,
                                                                           client_factory, bundles_dir):
    dev = device_factory(broker.port)
    dev.start()
    cl = client_factory(broker.port)
    cl.wait("status", idle, timeout=60)
    new = load_manifest(bundles_dir / "imu_none")
    proc = push_and_reload(tmp_path, broker.port, make_bundle(tmp_path / "har-v2", bundles_dir, "imu_none"),
                           dev.state_dir / "bundles", "--timeout", "60")
    request = cl.wait("request/reload", timeout=60)
    # an answer to somebody else's request arrives first: the script must wait for its own transaction
    cl.publish("response/reload", {"transaction": "someone-else", "status": "error", "error": "not yours"})
    code, out, err = finish(proc)
    assert code == 0, out + err
    assert request["bundle"] == "har" and request["transaction"].startswith("push-har-")
    cl.wait("response/reload", lambda p: p["transaction"] == request["transaction"])
    answers = [p for t, p in cl.seen if t.endswith("/response/reload")]
    assert [a["transaction"] for a in answers] == ["someone-else", request["transaction"]], answers
    assert answers[1]["status"] == "ok" and answers[1]["data"]["sha256"] == new.sha256
    assert f'"transaction": "{request["transaction"]}"' in out
    assert "device dev1 reloaded bundle 'har'" in out
    status = cl.request("status")["data"]
    assert (status["bundle"], status["sha256"], status["model_name"]) == ("har", new.sha256, new.model_name)


def test_push_reports_the_daemons_refusal_and_the_daemon_keeps_its_bundle(tmp_path, broker, device_factory,
                                                                          client_factory, bundles_dir):
    dev = device_factory(broker.port)
    dev.start()
    cl = client_factory(broker.port)
    before = cl.wait("status", idle, timeout=60)
    source = make_bundle(tmp_path / "har-v2", bundles_dir, "imu_none")
    with open(source / "model.tflite", "ab") as f:  # no longer the file the manifest's sha256 names
        f.write(b"tampered")
    code, out, err = finish(push_and_reload(tmp_path, broker.port, source, dev.state_dir / "bundles",
                                            "--timeout", "60"))
    assert code != 0
    assert "refused to reload 'har'" in err
    assert "sha256" in out  # the daemon's error, printed by the script
    assert (dev.state_dir / "bundles" / "har" / "model.tflite").is_file()  # the copy itself stays
    status = cl.request("status")["data"]
    assert (status["bundle"], status["sha256"], status["state"]) == (BUNDLE_NAME, before["sha256"], "idle")


def test_push_times_out_when_no_daemon_answers(tmp_path, broker, bundles_dir):
    code, _, err = finish(push_and_reload(tmp_path, broker.port, make_bundle(tmp_path / "har", bundles_dir),
                                          tmp_path / "bundles", "--timeout", "2"), timeout=30)
    assert code != 0
    assert "no response on hosvd-edge/dev1/response/reload within 2s" in err


def test_push_fails_clearly_when_the_broker_is_unreachable(tmp_path, bundles_dir):
    code, _, err = finish(push_and_reload(tmp_path, free_port(), make_bundle(tmp_path / "har", bundles_dir),
                                          tmp_path / "bundles", "--timeout", "2"), timeout=30)
    assert code != 0
    assert "cannot publish" in err or "no subscription" in err


# --- device.toml.example -----------------------------------------------------------------------------------


def test_config_example_is_valid_for_the_daemon():
    cfg = device_config.load_config(EXAMPLE)
    assert cfg.device.id == "pi-01"
    assert cfg.training.ram_ceiling_mb == 512
    assert cfg.state_dir == Path("/var/lib/hosvd-edge")


def test_config_example_mentions_every_key_of_the_schema():
    text = EXAMPLE.read_text()
    sections = re.split(r"^\[(\w+)\]$", text, flags=re.M)
    body = dict(zip(sections[1::2], sections[2::2], strict=True))
    missing = []
    for name, cls in device_config.SECTIONS.items():
        for field in dataclasses.fields(cls):
            if not re.search(rf"^(# )?{field.name} = ", body.get(name, ""), flags=re.M):
                missing.append(f"[{name}] {field.name}")
    for kind in device_sources.SOURCE_TYPES:
        for field in dataclasses.fields(device_sources.options_class(kind)):
            if not re.search(rf"^#? *{field.name}\b", text, flags=re.M):
                missing.append(f"[[sources]] {kind}: {field.name}")
    assert not missing, f"keys without an entry in {EXAMPLE.name}: {missing}"


# --- Ansible -----------------------------------------------------------------------------------------------


def ansible_playbook() -> str:
    """ansible-playbook of this environment (the ``dev`` extra installs ansible-core), else from PATH."""
    found = shutil.which("ansible-playbook", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                   os.environ.get("PATH", "")]))
    if found is None:
        pytest.skip("ansible-playbook not found: pip install -e '.[dev]' installs ansible-core")
    return found


def test_ansible_playbook_passes_the_syntax_check(tmp_path):
    result = run([ansible_playbook(), "--syntax-check", "-i", ANSIBLE / "inventory.example.ini",
                  ANSIBLE / "site.yml"], env={"ANSIBLE_HOME": str(tmp_path), "ANSIBLE_LOCAL_TEMP": str(tmp_path)},
                 timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "playbook: " in result.stdout


def test_ansible_tasks_have_names_and_the_play_uses_the_role():
    import yaml  # PyYAML, a dependency of ansible-core

    plays = yaml.safe_load((ANSIBLE / "site.yml").read_text())
    roles = {r if isinstance(r, str) else r["role"] for play in plays for r in play.get("roles", [])}
    assert roles == {"hosvd_device"}
    for path in sorted((ANSIBLE / "roles").rglob("*.yml")):
        if path.parent.name in ("tasks", "handlers"):
            for task in yaml.safe_load(path.read_text()):
                assert "name" in task, f"{path}: task without a name: {task}"


def test_ansible_role_copies_the_files_install_needs():
    tasks = ANSIBLE / "roles" / "hosvd_device" / "tasks"
    text = "\n".join(p.read_text() for p in tasks.glob("*.yml"))
    for needed in ("install.sh", "push-bundle.sh", "device.toml.example", "hosvd-device.service"):
        assert needed in text, f"the role does not copy {needed}"
    assert (ANSIBLE / "roles" / "hosvd_device" / "templates" / "device.toml.j2").is_file()
