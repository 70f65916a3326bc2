"""``hosvd-fleet``: run a federation from a bundle in one line, or start a device's SuperNode from its config.

- ``hosvd-fleet run --bundle DIR --out DIR --rounds N ...``: submits the fleet app (``fleet/app``) to a running
  SuperLink with ``flwr run`` (a private Flower CLI home holds the connection), streams its log, and exits 0 once
  the ServerApp wrote ``result.json``.
- ``hosvd-fleet supernode --config /etc/hosvd-edge/fleet.toml``: replaces itself with ``flower-supernode`` for
  the device whose config the fleet config names (what ``systemd/hosvd-fleet.service`` runs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from device_app.config import NAME_PATTERN

APP_DIR = Path(__file__).resolve().parent / "app"
CONNECTION = "hosvd-fleet"


def _bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (or PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"hosvd-fleet: {name} not found: install hosvd-edge with the 'fleet' extra")
    return found


def _env(**extra: str) -> dict[str, str]:
    """This environment with this interpreter's bin directory first on PATH: Flower starts its helper processes
    (``flower-superexec``, ``flwr-clientapp``, ``flwr-serverapp``) by name."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **extra}


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def run_command(args: argparse.Namespace, flwr_home: Path) -> list[str]:
    """The ``flwr run`` command line for ``args`` (writes the connection into ``flwr_home/config.toml``)."""
    tls = "insecure = true" if args.insecure else f"root-certificates = {_toml(str(Path(args.root_certificates)))}"
    (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                           f"address = {_toml(args.superlink)}\n{tls}\n")
    config = {"bundle": str(Path(args.bundle).resolve()), "out-dir": str(Path(args.out).resolve()),
              "rounds": args.rounds, "strategy": args.strategy, "fraction-train": args.fraction_train,
              "fraction-evaluate": args.fraction_train if args.fraction_evaluate is None else args.fraction_evaluate,
              "min-nodes": args.min_nodes, "local-steps": args.local_steps, "learning-rate": args.learning_rate,
              "server-learning-rate": args.server_learning_rate, "round-timeout": args.round_timeout,
              "install": not args.no_install}
    overrides = [item for key, value in config.items() for item in ("--run-config", f"{key}={_toml(value)}")]
    return [_bin("flwr"), "run", str(APP_DIR), CONNECTION, *overrides, "--stream"]


def cmd_run(args: argparse.Namespace) -> int:
    if not (Path(args.bundle) / "manifest.json").is_file():
        print(f"hosvd-fleet run: {args.bundle} is not a bundle (no manifest.json)", file=sys.stderr)
        return 2
    if not args.insecure and not args.root_certificates:
        print("hosvd-fleet run: give --root-certificates CA.pem (TLS) or --insecure", file=sys.stderr)
        return 2
    result = Path(args.out) / "result.json"
    result.unlink(missing_ok=True)
    import subprocess

    with tempfile.TemporaryDirectory(prefix="hosvd-fleet-") as home:
        cmd = run_command(args, Path(home))
        code = subprocess.call(cmd, env=_env(FLWR_HOME=home))
    if not result.is_file():
        print(f"hosvd-fleet run: the federation did not finish (flwr run exited {code}; no {result})",
              file=sys.stderr)
        return code or 1
    summary = json.loads(result.read_text())
    if len(summary["rounds_aggregated"]) < summary["rounds"]:
        print(f"hosvd-fleet run: only rounds {summary['rounds_aggregated']} of {summary['rounds']} had replies to "
              f"aggregate; the nodes' errors are in {Path(args.out) / 'received.json'}", file=sys.stderr)
        return 1
    print(f"federation done: {summary['rounds']} rounds, global model {summary['final_checkpoint']}")
    return 0


@dataclass(frozen=True)
class NodeConfig:
    """``fleet.toml`` of one device: where its SuperLink is and how to reach it safely."""

    device_config: str
    superlink: str
    root_certificates: str | None = None
    insecure: bool = False
    auth_private_key: str | None = None
    auth_public_key: str | None = None
    runtime_port: int = 9094
    bundle: str | None = None

    @classmethod
    def load(cls, path: Path) -> NodeConfig:
        """Read and check a fleet config.

        Raises:
            ValueError: unreadable TOML, unknown or missing keys, TLS neither configured nor waived, or a file it
                names that does not exist.
        """
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"{path}: {err}") from err
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        if missing := [k for k in ("device_config", "superlink") if k not in data]:
            raise ValueError(f"{path}: missing {missing}")
        cfg = cls(**data)
        if not cfg.insecure and not cfg.root_certificates:
            raise ValueError(f"{path}: set root_certificates (the SuperLink's CA, PEM) or insecure = true")
        if cfg.bundle is not None and not re.fullmatch(NAME_PATTERN, cfg.bundle):
            raise ValueError(f"{path}: bundle must be a plain bundle name inside the bundles directory, got "
                             f"{cfg.bundle!r}")
        if bool(cfg.auth_private_key) != bool(cfg.auth_public_key):
            raise ValueError(f"{path}: auth_private_key and auth_public_key go together")
        for key in ("device_config", "root_certificates", "auth_private_key", "auth_public_key"):
            value = getattr(cfg, key)
            if value and not (path.parent / value).is_file():
                raise ValueError(f"{path}: {key} {value} does not exist")
        return cfg

    def command(self, base: Path) -> list[str]:
        """The ``flower-supernode`` command line (relative paths are relative to the fleet config's directory)."""
        def path(value: str) -> str:
            return str((base / value).resolve())

        cmd = [_bin("flower-supernode"), "--superlink", self.superlink, "--host", "127.0.0.1",
               "--port", str(self.runtime_port),
               "--node-config", f"device-config={_toml(path(self.device_config))}"
               + (f" bundle={_toml(self.bundle)}" if self.bundle else "")]
        cmd += ["--insecure"] if self.insecure else ["--root-certificates", path(str(self.root_certificates))]
        if self.auth_private_key and self.auth_public_key:
            cmd += ["--auth-supernode-private-key", path(self.auth_private_key),
                    "--auth-supernode-public-key", path(self.auth_public_key)]
        return cmd


def cmd_supernode(args: argparse.Namespace) -> int:
    try:
        cfg = NodeConfig.load(Path(args.config))
    except ValueError as err:
        print(f"hosvd-fleet supernode: {err}", file=sys.stderr)
        return 2
    cmd = cfg.command(Path(args.config).resolve().parent)
    os.execve(cmd[0], cmd, _env())
    return 0  # not reached: execv replaces this process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hosvd-fleet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federation on a running SuperLink (flwr run of fleet/app)")
    run.add_argument("--bundle", required=True, help="the bundle directory; the global model starts from it")
    run.add_argument("--out", required=True, help="where round checkpoints, rounds.csv/json and the plot go")
    run.add_argument("--rounds", type=int, default=3)
    run.add_argument("--strategy", choices=["fedavg", "fedadam"], default="fedavg")
    run.add_argument("--min-nodes", type=int, default=2, help="nodes a round needs (and samples at least)")
    run.add_argument("--fraction-train", type=float, default=1.0, help="share of connected nodes per round")
    run.add_argument("--fraction-evaluate", type=float, default=None,
                     help="share of nodes that evaluate each round's global model (default: --fraction-train; 0: none)")
    run.add_argument("--local-steps", type=int, default=0, help="steps per node and round (0: its config's)")
    run.add_argument("--learning-rate", type=float, default=0.0, help="device learning rate (0: its config's)")
    run.add_argument("--server-learning-rate", type=float, default=0.1, help="FedAdam's server step (eta)")
    run.add_argument("--round-timeout", type=float, default=600.0, help="seconds a round waits for replies")
    run.add_argument("--no-install", action="store_true",
                     help="do not make the final global weights every node's newest checkpoint")
    run.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's address host:port")
    tls = run.add_mutually_exclusive_group()
    tls.add_argument("--root-certificates", help="CA certificate (PEM) of the SuperLink's TLS certificate")
    tls.add_argument("--insecure", action="store_true", help="no TLS (localhost tests only)")
    node = sub.add_parser("supernode", help="start flower-supernode for a device (its fleet.toml)")
    node.add_argument("--config", default="/etc/hosvd-edge/fleet.toml")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cmd_run(args) if args.command == "run" else cmd_supernode(args)


if __name__ == "__main__":
    raise SystemExit(main())
