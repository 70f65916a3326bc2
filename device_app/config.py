"""The daemon's TOML configuration (``/etc/hosvd-edge/device.toml`` by default), validated once at start-up.

Each section is a frozen dataclass whose fields are the allowed keys (see :mod:`device_app.schema`); every
problem in the file is reported at once, naming section and key. Relative paths are resolved against the
directory of the config file. After :func:`load_config` returns, the rest of the daemon trusts the values.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_app.schema import collect, spec
from device_app.sources import SOURCE_TYPES, SourceOptions, options_class

DEFAULT_CONFIG = "/etc/hosvd-edge/device.toml"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


class ConfigError(ValueError):
    """The config file is missing, unreadable or invalid; the message lists every problem."""


@dataclass(frozen=True, kw_only=True)
class DeviceSection:
    id: str = spec(doc="device id: the <device_id> level of every MQTT topic", pattern=r"[A-Za-z0-9_-]{1,64}")
    state_dir: str = spec("/var/lib/hosvd-edge", doc="SQLite store, checkpoints and bundles live here")
    log_level: str = spec("INFO", doc="logging level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


@dataclass(frozen=True, kw_only=True)
class MqttSection:
    host: str = spec("localhost", doc="broker host name or address")
    port: int = spec(1883, doc="broker port (8883 is usual with TLS)", min=1, max=65535)
    username: str | None = spec(None, doc="user name, if the broker requires one")
    password: str | None = spec(None, doc="password (prefer password_file)")
    password_file: str | None = spec(None, doc="file holding the password (first line)")
    tls: bool = spec(False, doc="connect with TLS")
    ca_file: str | None = spec(None, doc="CA certificate (PEM) to verify the broker; system CAs when unset")
    cert_file: str | None = spec(None, doc="client certificate (PEM) for mutual TLS")
    key_file: str | None = spec(None, doc="client key (PEM) for mutual TLS")
    tls_insecure: bool = spec(False, doc="skip the broker host name check (testing only)")
    base_topic: str = spec("hosvd-edge", doc="first topic level", pattern=r"[^#+\s]+")
    client_id: str | None = spec(None, doc="MQTT client id; default hosvd-edge-<device id>")
    protocol: str = spec("5", doc="MQTT protocol version", choices=["5", "3.1.1"])
    keepalive: int = spec(30, doc="keep-alive seconds", min=5, max=3600)
    max_payload_bytes: int = spec(
        65536, doc="largest request payload: MQTT 5 asks the broker (Maximum Packet Size) to drop larger ones, "
                   "and one that still arrives is refused with an error before it is queued", min=256)
    response_topic_prefixes: list[str] = spec(  # noqa: RUF009 - spec() copies list defaults
        [], doc="topic prefixes an MQTT 5 response topic may start with besides <base>/<id>/response/ "
                "(e.g. 'replies/'); never list another device's topics")
    reconnect_min_s: float = spec(1.0, doc="first reconnect delay; doubles up to reconnect_max_s", min=0.1)
    reconnect_max_s: float = spec(60.0, doc="longest reconnect delay", min=0.1)


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    bundle: str = spec(doc="bundle name: a directory inside bundles_dir", pattern=NAME_PATTERN)
    bundles_dir: str | None = spec(None, doc="where bundles live; default <state_dir>/bundles")
    threads: int = spec(2, doc="interpreter threads", min=1, max=64)


@dataclass(frozen=True, kw_only=True)
class StoreSection:
    max_samples: int = spec(5000, doc="windows kept; beyond it the largest class loses its oldest", min=10)
    val_fraction: float = spec(0.2, doc="share of each class's windows put in the validation split", min=0.0,
                               max=0.9)
    feature_cache: bool = spec(True, doc="cache frozen-prefix features per window (bundles with `features`)")


@dataclass(frozen=True, kw_only=True)
class TrainingSection:
    ram_ceiling_mb: int = spec(0, doc="RAM for daemon + training child; 0 = no ceiling", min=0)
    batch_size: int = spec(0, doc="train batch; 0 = the largest the bundle has that fits the ceiling", min=0)
    steps: int = spec(100, doc="optimizer steps per train request (a request may override)", min=1)
    learning_rate: float | None = spec(None, doc="learning rate; default the bundle's", min=0.0)
    checkpoint_every: int = spec(50, doc="steps between checkpoints (and one at the end)", min=1)
    keep_checkpoints: int = spec(3, doc="checkpoints kept (the newest K)", min=1)
    rollback_tolerance: float | None = spec(
        0.1, doc="roll back when validation accuracy drops by more than this; unset disables", min=0.0)
    progress_every: int = spec(10, doc="steps between MQTT progress messages", min=1)
    safety_margin_mb: int = spec(16, doc="added to each plan's need before comparing with the ceiling", min=0)
    rss_poll_s: float = spec(0.05, doc="how often the child's RSS is sampled", min=0.005)
    seed: int = spec(0, doc="seed for batch sampling")


@dataclass(frozen=True, kw_only=True)
class HomeAssistantSection:
    enabled: bool = spec(False, doc="announce the device to Home Assistant (MQTT discovery)")
    discovery_prefix: str = spec("homeassistant", doc="Home Assistant's discovery prefix",
                                 pattern=r"[^#+\s]+")
    status_topic: str = spec("homeassistant/status", doc="Home Assistant's birth topic: the device is "
                             "announced again when it says online", pattern=r"[^#+\s]+")
    device_name: str | None = spec(None, doc="the device's name in Home Assistant; default the device id",
                                   min_len=1, max_len=64)


@dataclass(frozen=True)
class Config:
    """The whole validated configuration, with absolute paths."""

    device: DeviceSection
    mqtt: MqttSection
    model: ModelSection
    store: StoreSection
    training: TrainingSection
    homeassistant: HomeAssistantSection
    sources: list[SourceOptions]
    path: Path

    @property
    def state_dir(self) -> Path:
        return Path(self.device.state_dir)

    @property
    def bundles_dir(self) -> Path:
        return Path(self.model.bundles_dir) if self.model.bundles_dir else self.state_dir / "bundles"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "store.sqlite"

    @property
    def checkpoints_dir(self) -> Path:
        return self.state_dir / "checkpoints"

    def mqtt_password(self) -> str | None:
        """The password from ``password`` or the first line of ``password_file``."""
        if self.mqtt.password_file:
            return Path(self.mqtt.password_file).read_text().splitlines()[0]
        return self.mqtt.password


SECTIONS = {"device": DeviceSection, "mqtt": MqttSection, "model": ModelSection, "store": StoreSection,
            "training": TrainingSection, "homeassistant": HomeAssistantSection}
PATH_KEYS = {"device": ["state_dir"], "mqtt": ["password_file", "ca_file", "cert_file", "key_file"],
             "model": ["bundles_dir"]}


def _absolute(table: dict[str, Any], keys: list[str], base: Path) -> dict[str, Any]:
    out = dict(table)
    for key in keys:
        if isinstance(out.get(key), str):
            out[key] = str((base / out[key]).resolve())
    return out


def _cross_checks(cfg: Config) -> list[str]:
    problems = []
    m = cfg.mqtt
    if m.password_file and m.password:
        problems.append("[mqtt] password and password_file: give one, not both")
    if m.password_file and not Path(m.password_file).is_file():
        problems.append(f"[mqtt] password_file: {m.password_file} does not exist")
    if (m.password or m.password_file) and not m.username:
        problems.append("[mqtt] password is set but username is not")
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(m, key)
        if value and not m.tls:
            problems.append(f"[mqtt] {key} is set but tls = false")
        if value and not Path(value).is_file():
            problems.append(f"[mqtt] {key}: {value} does not exist")
    if bool(m.cert_file) != bool(m.key_file):
        problems.append("[mqtt] cert_file and key_file go together")
    if m.reconnect_min_s > m.reconnect_max_s:
        problems.append("[mqtt] reconnect_min_s must be <= reconnect_max_s")
    for prefix in m.response_topic_prefixes:
        if not prefix or "#" in prefix or "+" in prefix:
            problems.append(f"[mqtt] response_topic_prefixes: {prefix!r} must be a non-empty topic prefix without "
                            "wildcards")
    names = [s.name for s in cfg.sources]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"[[sources]] name {name!r} is used more than once")
    return problems


def _sources(raw: Any, base: Path) -> tuple[list[SourceOptions], list[str]]:
    if not isinstance(raw, list):
        return [], [f"[[sources]] must be an array of tables, got {type(raw).__name__}"]
    out: list[SourceOptions] = []
    problems: list[str] = []
    for i, table in enumerate(raw):
        where = f"[[sources]] #{i + 1}"
        if not isinstance(table, dict) or "type" not in table:
            problems.append(f"{where}: needs type = one of {sorted(SOURCE_TYPES)}")
            continue
        kind = table["type"]
        if kind not in SOURCE_TYPES:
            problems.append(f"{where} type: must be one of {sorted(SOURCE_TYPES)}, got {kind!r}")
            continue
        cls = options_class(kind)
        table = {"name": f"{kind}{i + 1}", **table}
        table = _absolute(table, [f.name for f in dataclasses.fields(cls) if f.name.endswith("path")], base)
        options, errs = collect(cls, table, f"{where} ({kind})")
        problems += errs
        if options is not None:
            out.append(options)
    return out, problems


def parse_config(data: dict[str, Any], path: Path) -> Config:
    """Validate a parsed TOML document.

    Args:
        data: the parsed file.
        path: the file's path; relative paths in it are resolved against its directory.

    Returns:
        The validated config.

    Raises:
        ConfigError: listing every problem found.
    """
    base = path.parent
    allowed = [*SECTIONS, "sources"]
    problems = [f"unknown section [{key}]; allowed: {allowed}" for key in data if key not in allowed]
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        table = data.get(name, {})
        if isinstance(table, dict):
            table = _absolute(table, PATH_KEYS.get(name, []), base)
        sections[name], errs = collect(cls, table, f"[{name}]")
        problems += errs
    sources, errs = _sources(data.get("sources", []), base)
    problems += errs
    if problems:
        raise ConfigError(f"{path}: " + "\n  ".join(["invalid configuration:", *problems]))
    cfg = Config(sources=sources, path=path, **sections)
    problems = _cross_checks(cfg)
    if problems:
        raise ConfigError(f"{path}: " + "\n  ".join(["invalid configuration:", *problems]))
    return cfg


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG) -> Config:
    """Read and validate a config file.

    Raises:
        ConfigError: the file is missing, is not TOML, or breaks a rule (all problems listed).
    """
    file = Path(path).resolve()
    try:
        data = tomllib.loads(file.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"config file {file} does not exist") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{file} is not valid TOML: {err}") from err
    return parse_config(data, file)
