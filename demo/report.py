"""The demo's results: ``demo-summary.json``, the PNG report and the short text summary.

The PNG has four panels: the training loss (and batch accuracy) from the device's progress messages,
accuracy on the new user's held-out recordings before and after on-device training, the measured peak RSS
(daemon + training child) against the RAM ceiling, and the saved activations, HOSVD vs vanilla, by the
paper's formula.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUMMARY_FILE = "demo-summary.json"
REPORT_FILE = "demo-report.png"


@dataclass
class Summary:
    """Everything the demo measured; written as ``demo-summary.json``.

    Accuracies are fractions in ``[0, 1]`` on the held-out part of the new user's data; memory in MiB
    (2**20 bytes). ``peak_rss_mib`` is the training child's peak RSS; the ceiling covers it plus the daemon
    (``daemon_rss_mib``, resting). ``device_report`` is the device's retained training report,
    ``device_evaluate`` its answer to an ``evaluate`` request on its own validation windows, and ``progress``
    its progress messages as received.
    """

    dataset: str
    accuracy_before: float
    accuracy_after: float
    peak_rss_mib: float | None
    ram_ceiling_mib: float
    saved_activation_mib: float
    saved_activation_mib_vanilla: float
    daemon_rss_mib: float | None = None
    factory_accuracy: float | None = None
    holdout_samples: int = 0
    device_train_windows: int = 0
    train_steps: int = 0
    batch_size: int = 0
    compression: str = "hosvd"
    epsilon: float | None = None
    broker: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    device_report: dict[str, Any] | None = None
    device_evaluate: dict[str, Any] | None = None
    progress: list[dict[str, Any]] = field(default_factory=list)
    train_last: int = 0
    ceiling: dict[str, Any] | None = None


def write_summary(summary: Summary, out_dir: Path) -> Path:
    """Write ``demo-summary.json`` into ``out_dir`` and return its path."""
    path = out_dir / SUMMARY_FILE
    path.write_text(json.dumps(asdict(summary), indent=2, default=str) + "\n")
    log.info("Wrote %s", path)
    return path


def plot_report(summary: Summary, path: Path) -> Path:
    """Draw the four-panel PNG report.

    Args:
        summary: the measured results (``progress`` gives the loss curve).
        path: the PNG file to write.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_mem, ax_saved) = plt.subplots(
        1, 4, figsize=(17, 4.2), gridspec_kw={"width_ratios": [2.2, 1.4, 1, 1]}
    )
    steps = [p["step"] for p in summary.progress if "step" in p and "loss" in p]
    losses = [p["loss"] for p in summary.progress if "step" in p and "loss" in p]
    ax_loss.plot(steps, losses, marker="o", ms=3, label="train loss")
    ax_loss.set_xlabel("optimizer step on the device")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("On-device training (from MQTT progress)")
    ax_loss.grid(alpha=0.3)
    accs = [(p["step"], p["accuracy"]) for p in summary.progress if p.get("accuracy") is not None]
    if accs:
        twin = ax_loss.twinx()
        twin.plot(*zip(*accs, strict=True), color="tab:green", alpha=0.6, label="batch accuracy")
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("batch accuracy", color="tab:green")

    bars = ax_acc.bar(
        ["factory model", "after on-device\ntraining"],
        [summary.accuracy_before, summary.accuracy_after],
        color=["tab:gray", "tab:blue"],
    )
    ax_acc.bar_label(bars, labels=[f"{v:.0%}" for v in (summary.accuracy_before, summary.accuracy_after)])
    ax_acc.set_ylim(0, 1.1)
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title(f"New user's held-out data (n={summary.holdout_samples})")

    peak = summary.peak_rss_mib or 0.0
    daemon = summary.daemon_rss_mib or 0.0
    ax_mem.bar(["device"], [daemon], color="tab:gray", label=f"daemon {daemon:.0f} MiB")
    ax_mem.bar(["device"], [peak], bottom=[daemon], color="tab:blue", label=f"training child {peak:.0f} MiB")
    ax_mem.axhline(
        summary.ram_ceiling_mib, color="tab:red", ls="--", label=f"RAM ceiling {summary.ram_ceiling_mib:.0f} MiB"
    )
    ax_mem.set_ylim(0, summary.ram_ceiling_mib * 1.25)
    ax_mem.set_ylabel("MiB")
    ax_mem.set_title("Peak RSS vs ceiling")
    ax_mem.legend(loc="upper right", fontsize=8)

    kib = [summary.saved_activation_mib_vanilla * 1024, summary.saved_activation_mib * 1024]
    bars = ax_saved.bar(["vanilla", summary.compression], kib, color=["tab:gray", "tab:orange"])
    ax_saved.bar_label(bars, labels=[f"{v:.1f}" for v in kib])
    ax_saved.set_ylabel("KiB, float32 (paper's formula)")
    ax_saved.set_title("Saved activations")

    fig.suptitle(f"hosvd-edge demo: {summary.dataset}, {summary.train_steps} steps, batch {summary.batch_size}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("Wrote %s", path)
    return path


def ceiling_lines(ceiling: dict[str, Any] | None) -> list[str]:
    """What ``fit`` found under the RAM ceiling and what the device did with it (empty without a fit stage)."""
    if not ceiling:
        return []
    hosvd, vanilla, refused = ceiling["hosvd"], ceiling["vanilla"], ceiling["vanilla_refused"]
    of, full = ceiling["max_train_last"], ceiling["full_depth_need_mib"]
    return [
        f"The device holds {ceiling['device_base_mb']:g} MiB besides the training step (its planner's refusal under "
        f"a 1 MiB ceiling); all {of} weighted layers need {full['hosvd']:.1f} MiB with hosvd, {full['vanilla']:.1f} "
        f"MiB vanilla: the ceiling is set between them",
        f"RAM ceiling {ceiling['ram_ceiling_mb']:g} MiB (fit counts device base {ceiling['device_base_mb']:g} + "
        f"margin {ceiling['margin_mb']:g} MiB): hosvd trains the last {hosvd['train_last']} of {of} weighted "
        f"layers (needs {hosvd['need_mib']:.1f} MiB), vanilla the last {vanilla['train_last']} "
        f"({vanilla['need_mib']:.1f} MiB)",
        f"Vanilla with the last {refused['train_last']} layers would need {refused['need_mib']:.1f} MiB: the "
        f"device refused it: {refused['device_message']}",
        f"hosvd used {ceiling['hosvd_used_mib']} MiB on the device (daemon + training child)",
    ]


def summary_text(summary: Summary) -> str:
    """A few lines for the terminal."""
    peak = f"{summary.peak_rss_mib:.0f} MiB" if summary.peak_rss_mib is not None else "n/a"
    daemon = f"{summary.daemon_rss_mib:.0f} MiB" if summary.daemon_rss_mib is not None else "n/a"
    saved_ratio = (
        summary.saved_activation_mib_vanilla / summary.saved_activation_mib
        if summary.saved_activation_mib
        else float("nan")
    )
    lines = [
        f"Accuracy on the new user's held-out data ({summary.holdout_samples} samples):",
        f"  factory model {summary.accuracy_before:.1%}  ->  after on-device training {summary.accuracy_after:.1%}",
        f"Peak RSS of the training process: {peak}, daemon {daemon} "
        f"(RAM ceiling for both: {summary.ram_ceiling_mib:.0f} MiB)",
        f"Saved activations: {summary.saved_activation_mib * 1024:.1f} KiB with {summary.compression} vs "
        f"{summary.saved_activation_mib_vanilla * 1024:.1f} KiB vanilla ({saved_ratio:.1f}x smaller)",
        *ceiling_lines(summary.ceiling),
        f"Summary: {summary.paths.get('summary', '')}",
        f"Report:  {summary.paths.get('report', '')}",
    ]
    return "\n".join(lines)
