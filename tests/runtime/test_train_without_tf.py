"""A converter-built bundle trains through the device's own code without TensorFlow, on whichever device runtime
is installed.

The main run uses ai-edge-litert (numpy 2) in an environment where TensorFlow *is* installed: the child imports
the daemon, trains through ``device_app.steps`` (the device's step, streamed plan), then lists the
TensorFlow/Keras modules it loaded, which must be none. ``make test`` runs this file again in .venv-legacy with
tflite-runtime 2.14 and numpy < 2 (HOSVD_EXPECT_RUNTIME=tflite-runtime), where TensorFlow is not installed at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import device_app.daemon  # noqa: F401 - everything the daemon imports
    from device_app import steps
    from device_app.bundle import Bundle
    from device_app.runtime import runtime_name

    bundle = Bundle(sys.argv[1], 2)
    manifest = bundle.manifest
    batch = manifest.default_batch_size
    rng = np.random.default_rng(0)
    length, channels = manifest.input.shape
    t = np.arange(length) / manifest.input.rate_hz

    def windows(n):
        y = rng.integers(0, 3, n).astype(np.int32)
        base = rng.normal(0, 0.1, (n, length, channels))
        freq = np.where(y == 2, 8.0, 2.0)[:, None, None]
        amp = np.where(y == 0, 0.0, 1.0)[:, None, None]
        return (base + amp * np.sin(2 * np.pi * freq * t[None, :, None])).astype(np.float32), y

    losses = [steps.train_step(bundle, *windows(batch), "streamed", 1)[0] for _ in range(200)]
    evaluation = steps.evaluate(bundle, *windows(64), "streamed", 1)
    tf_modules = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))
    print(json.dumps({"runtime": runtime_name(), "numpy": np.__version__, "losses": losses,
                      "accuracy": evaluation["accuracy"], "tf_modules": tf_modules}))
""")


def test_bundle_trains_without_tensorflow(imu_bundle):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(imu_bundle)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tf_modules"] == [], "the device side imported TensorFlow"
    runtime = result["runtime"].split()[0]
    expected = os.environ.get("HOSVD_EXPECT_RUNTIME")
    if expected:
        assert runtime == expected
    if runtime == "tflite-runtime":
        assert result["numpy"].startswith("1.")
    first, last = sum(result["losses"][:10]) / 10, sum(result["losses"][-10:]) / 10
    assert last < 0.7 * first, f"loss should fall on a learnable task: {first:.3f} -> {last:.3f}"
    assert result["accuracy"] > 0.6
