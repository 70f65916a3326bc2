"""Fixtures for the fleet tests: a factory bundle of the demo's digits model, three users' real data, and a real
Flower SuperLink with SuperNodes as subprocesses on free ports (``hosvd-fleet supernode`` per device).

The data: scikit-learn's 1,797 real handwritten digits. The data set records no writer, so the three "users" are
disjoint class-stratified shares of the digits the factory never saw, each written with its own habit (shifted
another way, with another pen: :func:`habit`), the same kind of change the demo's single new user has
(``demo/shift.py``). Each user's share is cut into the windows its device stores (train/val) and held-out
windows that never enter any store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest

from demo import datasets, models
from tests.device.conftest import broker, free_port, toml_dumps, wait_port  # noqa: F401 - broker: fixture

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
USERS = {"anna": (1, 1, 0.5), "ben": (1, -1, 1.6), "chen": (-1, 0, 0.7)}  # (dy, dx, ink gamma)
BATCH = 16
RAM_CEILING_MB = 640


def habit(x: np.ndarray, dy: int, dx: int, gamma: float) -> np.ndarray:
    """One writer's habit on 8×8 digits in [0, 1]: shifted by ``(dy, dx)`` pixels (zero fill), ink ``v ** gamma``."""
    out = np.zeros_like(x)
    h, w = x.shape[1:3]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return np.power(out, gamma, dtype=np.float32)


@dataclass(frozen=True)
class User:
    name: str
    train: datasets.Dataset  # stored on the device (train and val split by the store)
    holdout: datasets.Dataset  # never stored anywhere


@dataclass(frozen=True)
class FleetData:
    factory: datasets.Dataset
    users: list[User]
    labels: list[str]


@pytest.fixture(scope="session")
def fleet_data() -> FleetData:
    return load_fleet_data()


def load_fleet_data() -> FleetData:
    """The factory digits and the three users' shares (see the module docstring)."""
    data = datasets.load_digits()
    factory_idx, rest = datasets.stratified_split(data.y, (0.4, 0.6), seed=0)
    rest_data = data.subset(rest)
    shares = datasets.stratified_split(rest_data.y, (1 / 3, 1 / 3, 1 / 3), seed=1)
    users = []
    for (name, (dy, dx, gamma)), share in zip(USERS.items(), shares, strict=True):
        part = rest_data.subset(share)
        part = part.with_x(habit(part.x, dy, dx, gamma))
        train, hold = datasets.stratified_split(part.y, (0.5, 0.5), seed=2)
        users.append(User(name, part.subset(train), part.subset(hold)))
    return FleetData(data.subset(factory_idx), users, data.labels)


FLEET_BUNDLE = dict(train_last=2, compression="hosvd", epsilon=0.9, batch_sizes=(BATCH,), optimizer="sgd",
                    learning_rate=0.05, pretrain_epochs=6)


@pytest.fixture(scope="session")
def fleet_bundle(fleet_data: FleetData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The factory bundle: the demo's digits CNN pre-trained on the factory digits, last 2 layers trainable.

    Built once into ``$HOSVD_TEST_BUNDLES/digits_fleet`` when that is set (and rebuilt when the converter's
    sources or these options change, as :mod:`tests.build_bundles` does), else into a session temp directory.
    """
    root = os.environ.get("HOSVD_TEST_BUNDLES")
    return build_fleet_bundle(fleet_data, (Path(root) if root else tmp_path_factory.mktemp("fleet-bundle")))


def build_fleet_bundle(fleet_data: FleetData, root: Path) -> Path:
    """``root/digits_fleet``, converted unless its stamp says it is current."""
    from tests.build_bundles import STAMP, source_digest

    out = root / "digits_fleet"
    spec = json.dumps({"options": FLEET_BUNDLE, "sources": source_digest(), "conftest": _digest(Path(__file__))},
                      sort_keys=True)
    if (out / STAMP).is_file() and (out / STAMP).read_text() == spec:
        return out
    from converter.convert import convert

    options = dict(FLEET_BUNDLE)
    model = models.build("digits", classes=len(fleet_data.labels), seed=0)
    models.pretrain(model, fleet_data.factory.x, fleet_data.factory.y, epochs=options.pop("pretrain_epochs"))
    (out / STAMP).unlink(missing_ok=True)
    convert(model, out, input_spec=dict(layout="NHWC"), labels=fleet_data.labels,
            calibration_data=fleet_data.factory.x[:64], measure_memory=True, **options)
    (out / STAMP).write_text(spec)
    return out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_device(root: Path, name: str, bundle: Path, user: User, steps: int, mqtt_port: int = 1) -> Path:
    """A device's state directory (bundle, store with the user's windows) and config; returns the config path.

    ``mqtt_port`` is the broker its daemon would use (only a test that starts the daemon needs a real one)."""
    from device_app.store import Store

    state = root / name
    shutil.copytree(bundle, state / "bundles" / bundle.name)
    store = Store(state / "store.sqlite", val_fraction=0.25)
    try:
        store.add_many(list(user.train.x), [user.train.labels[k] for k in user.train.y], "fleet-test")
    finally:
        store.close()
    doc = {"device": {"id": name, "state_dir": str(state)}, "mqtt": {"host": "127.0.0.1", "port": mqtt_port},
           "model": {"bundle": bundle.name},
           "training": {"ram_ceiling_mb": RAM_CEILING_MB, "steps": steps, "batch_size": BATCH,
                        "checkpoint_every": 1000, "rollback_tolerance": 1.0}}
    config = root / f"{name}.toml"
    config.write_text(toml_dumps(doc))
    return config


@dataclass
class Proc:
    name: str
    cmd: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> Proc:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=log, stderr=log, start_new_session=True, env=env)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> list[int]:
        """SIGKILL the process and everything it started (a SuperNode's ClientApp and training child run in
        sessions of their own); return the PIDs killed."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(tree, timeout=10)
        self.proc.wait(10)
        return [p.pid for p in tree]


@dataclass
class Federation:
    """A SuperLink and its SuperNodes, all real processes on localhost."""

    root: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)  # Flower 1.42 serves Fleet, Control and Runtime APIs on one port
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_superlink(self) -> None:
        cmd = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        self.procs["superlink"] = Proc("superlink", cmd, self.root / "superlink.log").start(self.env)
        wait_port(self.port, timeout=60)

    def node_config(self, name: str, device_config: Path, bundle: str | None = None) -> Path:
        """A ``fleet.toml`` for one device (``bundle``: the fleet's bundle, else the device config's)."""
        path = self.root / f"{name}-fleet.toml"
        path.write_text(f"device_config = {json.dumps(str(device_config))}\nsuperlink = {json.dumps(self.address)}\n"
                        f"insecure = true\nruntime_port = {free_port()}\n"
                        + (f"bundle = {json.dumps(bundle)}\n" if bundle else ""))
        return path

    def start_daemon(self, name: str, device_config: Path) -> Proc:
        """The device's daemon (``hosvd-device run``), which then holds the state directory."""
        cmd = [sys.executable, "-m", "device_app", "run", "--config", str(device_config)]
        proc = Proc(f"{name}-daemon", cmd, self.root / f"{name}-daemon.log").start(self.env)
        self.procs[proc.name] = proc
        return proc

    def start_node(self, name: str, fleet_config: Path) -> Proc:
        cmd = [sys.executable, "-m", "fleet.cli", "supernode", "--config", str(fleet_config)]
        proc = Proc(name, cmd, self.root / f"{name}-supernode.log").start(self.env)
        self.procs[name] = proc
        return proc

    def start_run(self, bundle: Path, out: Path, **options: object) -> subprocess.Popen:
        """``hosvd-fleet run`` against this SuperLink, in the background (its output in ``out``'s sibling log)."""
        cmd = [sys.executable, "-m", "fleet.cli", "run", "--bundle", str(bundle), "--out", str(out), "--insecure",
               "--superlink", self.address]
        for key, value in options.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        log = open(self.root / "run.log", "wb")  # noqa: SIM115 - lives with the process
        return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=log)

    def finish(self, run: subprocess.Popen, timeout: float) -> None:
        """Wait for a run to end; fail with every log if it did not finish or failed."""
        try:
            code = run.wait(timeout)
        except subprocess.TimeoutExpired as err:
            run.kill()
            raise AssertionError(f"federation did not finish in {timeout} s\n{self.logs()}") from err
        assert code == 0, f"hosvd-fleet run exited {code}\n{self.logs()}"

    def run(self, bundle: Path, out: Path, timeout: float, **options: object) -> None:
        """``hosvd-fleet run`` to its end."""
        self.finish(self.start_run(bundle, out, **options), timeout)

    def logs(self) -> str:
        run = self.root / "run.log"
        tail = run.read_text(errors="replace")[-4000:] if run.is_file() else ""
        return "\n".join(f"--- {name}\n{p.log()}" for name, p in self.procs.items()) + f"\n--- run\n{tail}"

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.kill()  # no graceful shutdown to test here, and SIGTERM costs each Flower process seconds


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    # Flower starts its helpers (flower-superexec, flwr-clientapp, flwr-serverapp) from PATH
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "PYTHONPATH": str(REPO),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    fed = Federation(tmp_path, env)
    fed.start_superlink()
    try:
        yield fed
    finally:
        fed.stop()

