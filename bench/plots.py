"""PNG plots of a results directory: the accuracy-vs-memory Pareto front, loss curves, memory vs time."""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.report import accuracy_rows, setting

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy after fine-tuning vs saved-activation MiB (paper's metric) and vs measured peak RSS."""
    groups = accuracy_rows(records)
    if not groups:
        return None
    plt = _pyplot()
    datasets = sorted({key[0] for key in groups})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 4 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets, strict=True):
        for (ds, _model, name), runs in groups.items():
            if ds != dataset:
                continue
            acc = 100 * statistics.fmean(r["accuracy_after"] for r in runs)
            for ax, field in zip(row, ("saved_activation_mib", "peak_rss_mib"), strict=True):
                ax.scatter(statistics.fmean(r[field] for r in runs), acc, label=name)
                ax.annotate(name, (statistics.fmean(r[field] for r in runs), acc), fontsize=7)
        row[0].set(title=f"{dataset}: accuracy vs saved activations", xlabel="saved activations MiB (analytic)",
                   ylabel="accuracy after fine-tuning %")
        row[1].set(title=f"{dataset}: accuracy vs measured peak RSS", xlabel="peak RSS MiB (VmHWM)")
        row[0].set_xscale("log")
    axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Mean training loss per step over seeds, one panel per data set, one line per setting."""
    curves: dict[str, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("loss_curve"):
            curves[r["dataset"]][setting(r)].append(r["loss_curve"])
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (dataset, by_setting) in zip(axes[0], sorted(curves.items()), strict=True):
        for name, runs in by_setting.items():
            n = min(len(c) for c in runs)
            ax.plot([statistics.fmean(c[i] for c in runs) for i in range(n)], label=name, linewidth=1)
        ax.set(title=f"{dataset}: on-device training loss (mean over seeds)", xlabel="step", ylabel="loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_time(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Peak RSS vs ms per step for the paper-scale runs, one marker per setting."""
    runs = [r for r in records if r["dataset"] is None]
    if not runs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        label = f"{r['model']} {r['input_shape'][0]}² tl{r['train_last']} {setting(r)}"
        ax.scatter(r["ms_per_step"], r["peak_rss_mib"], s=18)
        ax.annotate(label, (r["ms_per_step"], r["peak_rss_mib"]), fontsize=6)
    ax.set(xscale="log", xlabel="median ms per train step", ylabel="peak RSS MiB (VmHWM)",
           title="Device runtime: memory vs time per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write every plot that has data; return the files written."""
    written = [fn(records, out_dir / name) for fn, name in
               ((pareto, "pareto.png"), (loss_curves, "loss_curves.png"), (memory_time, "memory_time.png"))]
    return [p for p in written if p is not None]
