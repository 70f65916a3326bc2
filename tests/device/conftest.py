"""Fixtures for the device tests: a real Mosquitto per test on a free port, a paho test client, generated CSV
sensor files, config files, and the daemon as a real subprocess.

The converter-built bundle comes from the shared ``imu_bundle`` fixture (``tests/conftest.py``:
``$HOSVD_TEST_BUNDLES`` when ``make test`` built them, else built once per session with TensorFlow).
"""

from __future__ import annotations

import getpass
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from hosvd_contract import Manifest, load_manifest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
REPO = Path(__file__).resolve().parents[2]
BUNDLE_NAME = "imu_hosvd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float = 30.0, what: str = "the condition",
               detail: Callable[[], str] = str) -> None:
    """Poll ``condition`` until it is true (never a fixed sleep); after ``timeout`` seconds fail naming ``what``,
    followed by ``detail()`` (e.g. the end of a daemon's log)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s\n{detail()}".rstrip())
        time.sleep(0.02)


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


# --- broker ------------------------------------------------------------------------------------------------


@dataclass
class Broker:
    """A mosquitto process with a generated config; ``restart`` keeps the port (no persistence)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        # `user`: a root mosquitto would drop to user "mosquitto", who cannot read files under the test's tmp.
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1", "persistence false",
                 "log_dest stderr", *self.extra]
        if not any(line.startswith(("allow_anonymous", "password_file")) for line in self.extra):
            lines.append("allow_anonymous true")
        conf.write_text("\n".join(lines) + "\n")
        log = open(self.workdir / f"mosquitto-{self.port}.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path).start()
    yield b
    b.stop()


def idle(p: object) -> bool:
    """Status predicate: the daemon is idle and holds windows."""
    return isinstance(p, dict) and p.get("state") == "idle" and p["samples"]["total"] > 0


# --- test client -------------------------------------------------------------------------------------------


class Client:
    """A paho client that records every message it receives, per topic, for ``wait``/``request``."""

    def __init__(self, port: int, base: str, **connect: Any) -> None:
        self.base = base
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.seen: list[tuple[str, Any]] = []
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}",
                             protocol=MQTTProtocolVersion.MQTTv5)
        if connect.get("username"):
            self.c.username_pw_set(connect["username"], connect.get("password"))
        if connect.get("ca_file"):
            self.c.tls_set(ca_certs=connect["ca_file"])
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(f"{base}/#", qos=1)
        self.c.loop_start()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    def _drain(self, timeout: float) -> None:
        try:
            m = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        try:
            payload = json.loads(m.payload) if m.payload else None
        except (ValueError, RecursionError):  # the fuzz tests send such requests: keep them as bytes
            payload = m.payload
        self.seen.append((m.topic, payload))

    def wait(self, suffix: str, pred: Callable[[Any], bool] = lambda p: True, timeout: float = 30.0,
             start: int = 0) -> Any:
        """The first payload on ``<base>/<suffix>`` matching ``pred``, from index ``start`` of ``seen``."""
        topic = f"{self.base}/{suffix}"
        deadline = time.monotonic() + timeout
        i = start
        while True:
            while i < len(self.seen):
                t, p = self.seen[i]
                i += 1
                if t == topic and pred(p):
                    return p
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching message on {topic} in {timeout} s; saw "
                                   f"{[(t, str(p)[:120]) for t, p in self.seen[-10:]]}")
            self._drain(0.05)

    def all(self, suffix: str) -> list[Any]:
        self._drain(0.05)
        return [p for t, p in self.seen if t == f"{self.base}/{suffix}"]

    def publish(self, suffix: str, payload: bytes | str | dict, **kw: Any) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        self.c.publish(f"{self.base}/{suffix}", payload, qos=1, **kw).wait_for_publish(5)

    def request(self, command: str, payload: dict | bytes | str | None = None, timeout: float = 30.0) -> Any:
        """Send a request with a fresh transaction and return its response."""
        if payload is None or isinstance(payload, dict):
            payload = {"transaction": uuid.uuid4().hex[:10], **(payload or {})}
            match = payload["transaction"]
        else:
            match = None
        mark = len(self.seen)
        self.publish(f"request/{command}", payload)
        return self.wait(f"response/{command}",
                         lambda p: match is None or (isinstance(p, dict) and p.get("transaction") == match),
                         timeout, start=mark)


@pytest.fixture
def client_factory() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(port: int, device_id: str = "dev1", **connect: Any) -> Client:
        c = Client(port, f"hosvd-edge/{device_id}", **connect)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# --- bundle ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def imu_manifest(imu_bundle: Path) -> Manifest:
    return load_manifest(imu_bundle)


# --- sensor data and config --------------------------------------------------------------------------------


def class_signal(k: int, n: int, channels: int, rng: np.random.Generator,
                 rate_hz: float = 50.0) -> np.ndarray:
    """``(n, channels)`` samples of class ``k``: a sine of (k+1)·1.5 Hz, amplitude 1+k/2, plus noise 0.1."""
    t = np.arange(n) / rate_hz
    phase = rng.uniform(0, 2 * np.pi, channels)
    clean = np.sin(2 * np.pi * 1.5 * (k + 1) * t[:, None] + phase) * (1.0 + 0.5 * k)
    return (clean + rng.normal(0, 0.1, clean.shape)).astype(np.float32)


def write_csvs(directory: Path, manifest: Manifest, windows_per_class: int, seed: int = 0,
               label_column: bool = True) -> Path:
    """Edge Impulse style CSVs, one per class: ``timestamp`` (ms), one column per channel, ``label``."""
    directory.mkdir(parents=True, exist_ok=True)
    length, n_ch = manifest.input.shape[0], manifest.input.shape[-1]
    channels = manifest.input.channels or [f"ch{i}" for i in range(n_ch)]
    rate = manifest.input.rate_hz or 50.0
    rng = np.random.default_rng(seed)
    for k, label in enumerate(manifest.labels):
        data = class_signal(k, length * windows_per_class, n_ch, rng, rate)
        header = ["timestamp", *channels] + (["label"] if label_column else [])
        rows = [",".join(header)]
        for i, row in enumerate(data):
            cells = [str(round(i * 1000 / rate)), *(f"{v:.5f}" for v in row)]
            rows.append(",".join(cells + ([label] if label_column else [])))
        (directory / f"{label}.{k}.csv").write_text("\n".join(rows) + "\n")
    return directory


def toml_dumps(doc: dict[str, Any]) -> str:
    """Just enough TOML for the configs here: tables of scalars/lists, and arrays of tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    out = []
    for name, table in doc.items():
        tables = table if isinstance(table, list) else [table]
        for t in tables:
            out.append(f"[[{name}]]" if isinstance(table, list) else f"[{name}]")
            out += [f"{k} = {value(v)}" for k, v in t.items() if v is not None]
            out.append("")
    return "\n".join(out)


@dataclass
class Device:
    """A daemon's files: config, state directory; ``start`` runs it as a subprocess."""

    config: Path
    state_dir: Path
    doc: dict[str, Any]
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def db(self) -> Path:
        return self.state_dir / "store.sqlite"

    def rewrite(self, **sections: Any) -> None:
        """Update config sections (a list replaces ``[[name]]`` arrays) and write the file again."""
        for name, values in sections.items():
            if isinstance(values, list):
                self.doc[name] = values
            else:
                self.doc.setdefault(name, {}).update(values)
        self.config.write_text(toml_dumps(self.doc))

    def start(self, env: dict[str, str] | None = None, entry: Sequence[str] = ("-m", "device_app")) -> Device:
        """Run ``python <entry> run --config <config>``: the daemon, or a script that wraps its CLI."""
        self.log_path = self.state_dir.parent / f"daemon-{int(time.time() * 1000)}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives with the process
        cmd = [sys.executable, *entry, "run", "--config", str(self.config)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL the daemon and its children (its process group)."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def device_factory(tmp_path: Path, imu_bundle: Path,
                   imu_manifest: Manifest) -> Iterator[Callable[..., Device]]:
    """``make(broker_port, **sections)`` writes a config for a daemon with a CSV replay source."""
    made: list[Device] = []

    def make(port: int, windows_per_class: int = 16, **sections: dict[str, Any]) -> Device:
        root = tmp_path / f"device{len(made)}"
        state = root / "state"
        (state / "bundles").mkdir(parents=True)
        shutil.copytree(imu_bundle, state / "bundles" / BUNDLE_NAME)
        csv_dir = write_csvs(root / "csv", imu_manifest, windows_per_class)
        doc: dict[str, Any] = {
            "device": {"id": "dev1", "state_dir": str(state), "log_level": "INFO"},
            "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "model": {"bundle": BUNDLE_NAME, "threads": 1},
            "store": {"max_samples": 1000, "val_fraction": 0.25},
            "training": {"steps": 40, "checkpoint_every": 10, "progress_every": 5, "learning_rate": 0.05},
            "sources": [{"type": "csv", "name": "replay", "path": str(csv_dir), "pacing": "fast"}],
        }
        for name, values in sections.items():
            if isinstance(values, list):
                doc[name] = values
            else:
                doc.setdefault(name, {}).update(values)
        config = root / "device.toml"
        config.write_text(toml_dumps(doc))
        dev = Device(config, state, doc)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        dev.stop()


# --- security ----------------------------------------------------------------------------------------------


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost signed by it (openssl CLI)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt, ext = directory / "server.key", directory / "server.csr", directory / "server.crt", \
        directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_crt),
            "-days", "2", "-subj", "/CN=hosvd-edge test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj",
            "/CN=localhost")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(crt), "-days", "2", "-extfile", str(ext))
    return {"ca": ca_crt, "cert": crt, "key": key}


def make_password_file(directory: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file (hashed with mosquitto_passwd)."""
    path = directory / "passwords"
    for i, (user, password) in enumerate(users.items()):
        flags = ["-c"] if i == 0 else []
        subprocess.run(["mosquitto_passwd", "-b", *flags, str(path), user, password], check=True,
                       capture_output=True)
    return path
