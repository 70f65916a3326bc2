"""A converter-built bundle trains where TensorFlow cannot be imported, on whichever device runtime is installed.

The main run uses ai-edge-litert (numpy 2); ``make test`` runs this file again in .venv-legacy with
tflite-runtime 2.14 and numpy < 2 (HOSVD_EXPECT_RUNTIME=tflite-runtime), where TensorFlow is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, sys
    sys.modules["tensorflow"] = None  # any import of TensorFlow now raises ImportError
    import numpy as np
    try:
        from ai_edge_litert.interpreter import Interpreter
        runtime = "ai-edge-litert"
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
        runtime = "tflite-runtime"
    from hosvd_contract import load_manifest

    bundle = sys.argv[1]
    manifest = load_manifest(bundle)
    batch = manifest.default_batch_size
    interpreter = Interpreter(model_path=bundle + "/model.tflite", num_threads=2)
    rng = np.random.default_rng(0)
    length, channels = manifest.input.shape
    t = np.arange(length) / manifest.input.rate_hz

    def windows(n):
        y = rng.integers(0, 3, n).astype(np.int32)
        base = rng.normal(0, 0.1, (n, length, channels))
        freq = np.where(y == 2, 8.0, 2.0)[:, None, None]
        amp = np.where(y == 0, 0.0, 1.0)[:, None, None]
        return (base + amp * np.sin(2 * np.pi * freq * t[None, :, None])).astype(np.float32), y

    train = interpreter.get_signature_runner("train")
    losses = []
    for step in range(200):
        x, y = windows(batch)
        losses.append(float(train(x=x, y=y)["loss"]))
    x, y = windows(64)
    evaluation = interpreter.get_signature_runner("evaluate")(x=x, y=y)
    tf_importable = True
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        tf_importable = False
    print(json.dumps({"runtime": runtime, "numpy": np.__version__, "losses": losses,
                      "accuracy": float(evaluation["correct"]) / 64, "tf_importable": tf_importable}))
""")


def test_bundle_trains_without_tensorflow(imu_bundle):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(imu_bundle)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tf_importable"] is False
    expected = os.environ.get("HOSVD_EXPECT_RUNTIME")
    if expected:
        assert result["runtime"] == expected
    if result["runtime"] == "tflite-runtime":
        assert result["numpy"].startswith("1.")
    first, last = sum(result["losses"][:10]) / 10, sum(result["losses"][-10:]) / 10
    assert last < 0.7 * first, f"loss should fall on a learnable task: {first:.3f} -> {last:.3f}"
    assert result["accuracy"] > 0.6
