"""Memory of the fleet pieces on a device, measured: the SuperNode, Flower's SuperExec, each ClientApp process and
the training child, while a real federation (a SuperLink and two SuperNodes on localhost, the fleet test's digits
bundle and users) runs.

``python -m bench.fleet_rss [--rounds 2] [--bundles DIR]`` prints the peak RSS of each kind of process and the
bytes a node sent per round (docs/fleet.md quotes its output). Nothing here is a pass/fail target.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil

from tests.fleet.conftest import Federation, build_fleet_bundle, load_fleet_data, write_device

KINDS = {"flower-supernode": "SuperNode", "flower-superexec": "SuperExec", "flwr-clientapp": "ClientApp",
         "multiprocessing": "training/probe child"}


def kind(proc: psutil.Process) -> str | None:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    return next((name for key, name in KINDS.items() if key in cmd), None)


def sample(roots: list[int], peaks: dict[str, float], stop: threading.Event) -> None:
    """Every 0.1 s: the RSS of every process under ``roots`` by kind; keep each kind's peak (MiB)."""
    while not stop.is_set():
        for root in roots:
            try:
                tree = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
            except psutil.Error:
                continue
            for proc in tree:
                name = kind(proc)
                try:
                    rss = proc.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                if name:
                    peaks[name] = max(peaks.get(name, 0.0), rss)
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bundles", default=None, help="where the digits bundle is built/cached")
    args = parser.parse_args()
    import os
    import sys

    with tempfile.TemporaryDirectory(prefix="fleet-rss-") as tmp:
        root = Path(tmp)
        data = load_fleet_data()
        bundle = build_fleet_bundle(data, Path(args.bundles) if args.bundles else root)
        env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        fed = Federation(root, env)
        fed.start_superlink()
        peaks: dict[str, float] = {}
        stop = threading.Event()
        try:
            nodes = []
            for user in data.users[:2]:
                config = write_device(root / "devices", user.name, bundle, user, 25)
                nodes.append(fed.start_node(user.name, fed.node_config(user.name, config)).proc.pid)
            watcher = threading.Thread(target=sample, args=(nodes, peaks, stop), daemon=True)
            watcher.start()
            out = root / "out"
            fed.run(bundle, out, timeout=600, rounds=args.rounds, min_nodes=2, local_steps=25)
        finally:
            stop.set()
            fed.stop()
        received = [e for e in json.loads((out / "received.json").read_text()) if e["phase"] == "train"]
    print(json.dumps({"peak_rss_mib": {k: round(v, 1) for k, v in sorted(peaks.items())},
                      "child_peak_rss_mib_reported": max(e["metrics"]["peak-rss-mb"] for e in received),
                      "clientapp_rss_mib_reported": max(e["metrics"]["clientapp-rss-mb"] for e in received),
                      "bytes_sent_per_round_per_node": sorted({e["bytes"] for e in received})}, indent=1))


if __name__ == "__main__":
    main()
