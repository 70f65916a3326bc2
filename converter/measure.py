"""Peak RSS of one train step on the device runtime, measured in a fresh child process.

Run as ``python -m converter.measure MODEL.tflite SIGNATURE_JSON``; it imports only numpy and the LiteRT
interpreter (never TensorFlow), so the figure is what a device process would see. Prints one JSON line:
``{"base_rss_bytes": …, "peak_rss_bytes": …, "runtime": …}``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(model_path: str, spec: dict) -> dict:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=model_path, num_threads=spec.get("threads", 2))
    base = _status_bytes("VmRSS")
    rng = np.random.default_rng(0)
    batch = spec["batch_size"]
    x = rng.random((batch, *spec["input_shape"]), dtype=np.float32)
    if spec["label_dtype"] == "int32":
        y = rng.integers(0, spec["classes"], batch).astype(np.int32)
    else:
        y = rng.random((batch, *spec["label_shape"]), dtype=np.float32)
    if spec["mode"] == "whole":
        interpreter.get_signature_runner(spec["train"])(x=x, y=y)
    else:
        features = interpreter.get_signature_runner("features")
        micro = spec["micro_batch"]
        feats = np.concatenate([features(x=x[i: i + micro])["features"] for i in range(0, batch, micro)])
        interpreter.get_signature_runner(spec["train_features"])(features=feats, y=y)
    return {"base_rss_bytes": base, "peak_rss_bytes": _status_bytes("VmHWM"), "runtime": "ai-edge-litert"}


def measure(model_path: str | Path, spec: dict, timeout: float = 600) -> dict:
    """Run one train step as described by ``spec`` in a child process and return its RSS figures.

    Raises:
        RuntimeError: the child failed (its stderr tail is in the message).
    """
    proc = subprocess.run([sys.executable, "-m", "converter.measure", str(model_path), json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {spec.get('mode')} b{spec.get('batch_size')} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], json.loads(sys.argv[2]))))
