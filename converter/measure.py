"""Peak RSS of a bundle's train step on the device runtime, measured by the device's own code in a fresh process.

The child is ``python -m device_app.measure`` (:mod:`device_app.measure`): it loads the bundle the way the
device's training child does and steps through :func:`device_app.steps.train_step`, importing no TensorFlow, so
the figure is what a device process would see. The converter only spawns it; it imports nothing of device_app.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def measure(bundle_dir: str | Path, batch_size: int, mode: str, micro_batch: int, threads: int = 2,
            timeout: float = 600) -> dict:
    """Run one train step of the bundle (``mode`` ``whole`` or ``streamed``) in a child and return its figures.

    Returns:
        ``{"base_rss_bytes", "peak_rss_bytes", "base_anon_rss_bytes", "anon_rss_bytes", "runtime"}``.

    Raises:
        RuntimeError: the child failed (its stderr tail is in the message).
    """
    cmd = [sys.executable, "-m", "device_app.measure", str(bundle_dir), "--batch-size", str(batch_size),
           "--mode", mode, "--micro-batch", str(micro_batch), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {mode} b{batch_size} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
