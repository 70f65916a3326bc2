"""Run a suite: convert each bundle once, measure every run in a fresh child, write one JSON record per run.

The parent process converts (TensorFlow); each measurement runs ``python -m bench.child`` (numpy + ai-edge-litert
only), so the reported peak RSS is a device process's, not the converter's. Records are appended to
``records.jsonl`` as they finish (a partial run keeps what it measured); :func:`add_ratios` then compares every
run with the ``recipe`` and ``none`` runs of the same invocation and group, and ``records.json`` holds the result.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from bench.suite import PAPER_MODELS, RunSpec

log = logging.getLogger(__name__)
MIB = float(1 << 20)
THREADS = 2
RECORDS_JSONL = "records.jsonl"
RECORDS_JSON = "records.json"
MACHINE_JSON = "machine.json"
RATIO_FIELDS = ("peak_rss_mib", "ms_per_step", "saved_activation_mib")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, RAM and the versions that matter, read from this machine."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return {
        "nproc": os.cpu_count(), "cpu_model": cpu, "ram_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(), "python": platform.python_version(), "numpy": np.__version__,
        "tensorflow": _version("tensorflow-cpu") or _version("tensorflow"), "keras": _version("keras"),
        "ai_edge_litert": _version("ai-edge-litert"), "threads": THREADS,
    }


def _saved_shape(in_shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    # the converter's convention (converter.engine.saved_shape): Conv1D saves (B, 1, L, C)
    return (batch, 1, *in_shape) if len(in_shape) == 2 else (batch, *in_shape)


def layer_figures(manifest: Any, model: Any) -> tuple[dict[str, Any], float, float, float]:
    """Per trainable layer ranks, and the saved-activation MiB: vanilla, compressed (the manifest's paper
    metric, at ε-ranks when calibrated), and at the static maximum ranks the TFLite tensors are sized for.

    Returns:
        ``(layers, vanilla_mib, compressed_mib, static_mib)``.
    """
    from converter.compression.factored import tucker_elements

    batch = manifest.default_batch_size
    layers, vanilla, compressed, static = {}, 0, 0, 0
    for info in manifest.layers:
        if not info.trainable:
            continue
        vanilla += info.saved_bytes_vanilla
        compressed += info.saved_bytes_compressed
        static_bytes = info.saved_bytes_compressed
        if info.ranks is not None and len(info.ranks) == 4:
            shape = _saved_shape(tuple(int(d) for d in model.get_layer(info.name).input.shape[1:]), batch)
            static_bytes = 4 * tucker_elements(shape, tuple(info.ranks))
        static += static_bytes
        layers[info.name] = {"type": info.type, "static_ranks": info.ranks, "calibrated_ranks": info.calibrated_ranks,
                             "saved_vanilla_mib": info.saved_bytes_vanilla / MIB,
                             "saved_compressed_mib": info.saved_bytes_compressed / MIB}
    return layers, vanilla / MIB, compressed / MIB, static / MIB


class Workspace:
    """Models, data and bundles of one invocation, each made once.

    Args:
        work_dir: where bundles and data files go (deleted by the caller when done).
        cache_dir: pre-trained real-data models kept between invocations.
    """

    def __init__(self, work_dir: Path, cache_dir: Path) -> None:
        self.work_dir, self.cache_dir = work_dir, cache_dir
        self._sources: dict[tuple, dict[str, Any]] = {}
        self._bundles: dict[tuple, dict[str, Any]] = {}

    def source(self, spec: RunSpec) -> dict[str, Any]:
        """The Keras model, calibration inputs and (for real data) the data file of a run."""
        key = (spec.model, spec.input_size, spec.dataset, spec.seed)
        if key not in self._sources:
            if spec.model in PAPER_MODELS:
                from bench.archs import build_calibrated

                model, calibration = build_calibrated(spec.model, spec.input_size, spec.seed)
                self._sources[key] = {"model": model, "calibration": calibration, "data": None, "labels": None,
                                      "input_spec": None}
            else:
                from bench import realdata

                real = realdata.load(spec.dataset, spec.seed, self.cache_dir)
                data = self.work_dir / f"data-{spec.dataset}-{spec.seed}.npz"
                np.savez(data, x_train=real.x_train, y_train=real.y_train, x_test=real.x_test, y_test=real.y_test)
                self._sources[key] = {"model": real.model, "calibration": real.calibration, "data": str(data),
                                      "labels": real.labels, "input_spec": real.input_spec}
        return self._sources[key]

    def bundle(self, spec: RunSpec) -> dict[str, Any]:
        """Convert the run's bundle (once per conversion key); asi budgets need the vanilla bytes first."""
        from converter.convert import convert

        key = spec.conversion_key
        if key in self._bundles:
            return self._bundles[key]
        src = self.source(spec)
        budget_mb = None
        if spec.method == "asi":
            vanilla = self.bundle(RunSpec(**(asdict(spec) | {"method": "none", "asi_budget": None})))
            budget_mb = spec.asi_budget * vanilla["vanilla_mib"]
        out = self.work_dir / f"bundle-{len(self._bundles)}"
        log.info("converting %s train_last=%d %s eps=%s budget=%s", spec.model, spec.train_last, spec.compression,
                 spec.epsilon, budget_mb)
        started = time.perf_counter()
        manifest = convert(src["model"], out, train_last=spec.train_last, compression=spec.compression,
                           epsilon=spec.epsilon or 0.8, eps_rule=spec.eps_rule, batch_sizes=(spec.batch_size,),
                           optimizer=spec.optimizer, learning_rate=spec.learning_rate,
                           calibration_data=src["calibration"], ram_budget_mb=budget_mb, labels=src["labels"],
                           input_spec=src["input_spec"], micro_batch=spec.micro_batch,
                           subspace_iters=spec.subspace_iters, measure_memory=False)
        wall = time.perf_counter() - started
        layers, vanilla_mib, compressed_mib, static_mib = layer_figures(manifest, src["model"])
        self._bundles[key] = {
            "path": out, "input_shape": list(manifest.input.shape), "layers": layers,
            "vanilla_mib": vanilla_mib, "compressed_mib": compressed_mib, "static_mib": static_mib,
            "graph_ops": sum(manifest.op_census.values()), "convert_s": float(manifest.versions["convert_seconds"]),
            "convert_wall_s": wall, "ram_budget_mb": budget_mb, "epsilon_used": manifest.compression.get(
                "epsilon_used"), "eps_rule": manifest.eps_rule,
        }
        return self._bundles[key]


def run_child(child_spec: dict[str, Any], spec_path: Path, timeout: float = 3600) -> dict[str, Any]:
    """Run :mod:`bench.child` on ``child_spec`` in a fresh interpreter and return its JSON.

    Raises:
        RuntimeError: the child failed (the message ends with its stderr).
    """
    spec_path.write_text(json.dumps(child_spec))
    proc = subprocess.run([sys.executable, "-m", "bench.child", str(spec_path)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(spec: RunSpec, ws: Workspace, invocation: str) -> dict[str, Any]:
    """Convert (or reuse) the run's bundle, measure it in a child, and return its record (without ratios)."""
    bundle = ws.bundle(spec)
    src = ws.source(spec)
    plan = "whole" if spec.method == "recipe" else "streamed"
    child_spec = {
        "bundle_dir": str(bundle["path"]), "threads": THREADS, "plan": plan, "batch_size": spec.batch_size,
        "micro_batch": spec.micro_batch, "seed": spec.seed, "warmup": spec.warmup, "timed": spec.timed,
        "cached_steps": spec.cached_steps, "data": src["data"],
    }
    out = run_child(child_spec, ws.work_dir / "child-spec.json")
    compressed = spec.method not in ("recipe", "none")
    record = {
        "invocation": invocation, "model": spec.model, "train_last": spec.train_last, "method": spec.method,
        "epsilon": spec.epsilon, "eps_rule": bundle["eps_rule"], "asi_budget": spec.asi_budget,
        "ram_budget_mb": bundle["ram_budget_mb"],
        "epsilon_used": bundle["epsilon_used"], "batch_size": spec.batch_size, "micro_batch": spec.micro_batch,
        "plan": plan, "input_size": spec.input_size, "input_shape": bundle["input_shape"],
        "runtime": f"ai-edge-litert {_version('ai-edge-litert')}", "threads": THREADS,
        "saved_activation_mib": bundle["compressed_mib"] if compressed else bundle["vanilla_mib"],
        "saved_activation_vanilla_mib": bundle["vanilla_mib"],
        "saved_activation_static_mib": bundle["static_mib"] if compressed else bundle["vanilla_mib"],
        "layers": bundle["layers"], "peak_rss_mib": out["peak_rss_mib"], "base_rss_mib": out["base_rss_mib"],
        "anon_rss_mib": out.get("anon_rss_mib"),
        "ms_per_step": out["ms_per_step"], "ms_steps": out["ms_steps"],
        "ms_per_step_cached": out.get("ms_per_step_cached"), "cache_speedup": None,
        "graph_ops": bundle["graph_ops"], "convert_s": bundle["convert_s"], "dataset": spec.dataset,
        "seed": spec.seed, "steps": spec.warmup + spec.timed, "optimizer": spec.optimizer,
        "learning_rate": spec.learning_rate, "subspace_iters": spec.subspace_iters,
        "accuracy_before": out.get("accuracy_before"), "accuracy_after": out.get("accuracy_after"),
        "loss_curve": out.get("loss_curve"),
    }
    if record["ms_per_step_cached"]:
        record["cache_speedup"] = record["ms_per_step"] / record["ms_per_step_cached"]
    return record


# Records compared with each other: same invocation, model, input, setting, data set and seed; any method.
GROUP_FIELDS = ("invocation", "model", "input_size", "train_last", "batch_size", "dataset", "seed")


def _group(record: dict[str, Any]) -> tuple:
    return tuple(record[name] for name in GROUP_FIELDS)


def add_ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``ratios`` on every record: its figures divided by those of the ``recipe`` and of the ``none`` run
    of the same group (:data:`GROUP_FIELDS`: invocation, model, input size, train_last, batch, data set, seed).

    ``ratios = {"vs_recipe": {field: ratio | None}, "vs_none": {...}}``; a missing baseline gives ``None``.
    """
    baselines = {(_group(r), r["method"]): r for r in records if r["method"] in ("recipe", "none")}
    for record in records:
        ratios = {}
        for base_name in ("recipe", "none"):
            base = baselines.get((_group(record), base_name))
            ratios[f"vs_{base_name}"] = {
                name: (record[name] / base[name] if base and base.get(name) else None) for name in RATIO_FIELDS}
        record["ratios"] = ratios
    return records


def run_suite(specs: Iterable[RunSpec], out_dir: Path, invocation: str, cache_dir: Path,
              on_record: Callable[[dict[str, Any]], None] | None = None, keep_work: bool = False) -> list[dict]:
    """Run every spec; write ``machine.json``, ``records.jsonl`` (as runs finish) and ``records.json``.

    A run that fails is logged and skipped, so one broken configuration does not lose the others; an
    interrupt (SIGINT) ends the suite early and still writes the results of the runs done.

    Returns:
        The records with ratios.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MACHINE_JSON).write_text(json.dumps(machine_info(), indent=2))
    work_dir = out_dir / "work"
    work_dir.mkdir(exist_ok=True)
    ws = Workspace(work_dir, cache_dir)
    records = []
    try:
        with open(out_dir / RECORDS_JSONL, "a") as jsonl:
            for spec in specs:
                try:
                    record = measure(spec, ws, invocation)
                except Exception:
                    log.exception("run failed: %s", spec)
                    continue
                records.append(record)
                jsonl.write(json.dumps(record) + "\n")
                jsonl.flush()
                if on_record:
                    on_record(record)
    except KeyboardInterrupt:  # Ctrl-C / SIGINT: keep what was measured, as a partial run
        log.warning("interrupted after %d runs; writing the partial results", len(records))
    finally:
        if not keep_work:
            shutil.rmtree(work_dir, ignore_errors=True)
    add_ratios(records)
    (out_dir / RECORDS_JSON).write_text(json.dumps(records, indent=1))
    return records


def load_records(results_dir: Path, from_jsonl: bool = False) -> list[dict[str, Any]]:
    """The records of a results directory: ``records.json``, else (or with ``from_jsonl``) ``records.jsonl``
    (a run still going or interrupted), with ratios recomputed."""
    path = results_dir / RECORDS_JSON
    if path.is_file() and not from_jsonl:
        return json.loads(path.read_text())
    lines = (results_dir / RECORDS_JSONL).read_text().splitlines()
    return add_ratios([json.loads(line) for line in lines if line.strip()])
