"""What only aarch64 can show, run in the tier's arm64 root filesystem on both runtimes.

- The tier emulates the CPU it claims (a Pi 4's Cortex-A72 by default, ``QEMU_CPU``), not qemu's "max" CPU.
- A format-1 model (0-d signature input, built on x86 by ``tests/arm64/fixtures.py``) is refused on
  ai-edge-litert with the message that names the fix, and accepted on tflite-runtime; and the refusal guards a
  real crash: feeding that input segfaults ai-edge-litert here, while tflite-runtime runs it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from device_app.runtime import check_signature_inputs, load_interpreter, runtime_name, scalar_inputs
from hosvd_contract import BundleError
from tests.arm64.fixtures import SCALAR_MODEL

AT_HWCAP = 16
# arch/arm64/include/uapi/asm/hwcap.h
HWCAP = {"asimd": 1 << 1, "crc32": 1 << 7, "atomics": 1 << 8, "fphp": 1 << 9, "asimddp": 1 << 20}
# ARMv8.0 (Pi 4) lacks the v8.2 features a Pi 5's Cortex-A76 (and qemu's default "max" CPU) has.
EXPECTED = {
    "cortex-a72": {"asimd": True, "crc32": True, "atomics": False, "fphp": False, "asimddp": False},
    "cortex-a76": {"asimd": True, "crc32": True, "atomics": True, "fphp": True, "asimddp": True},
}
LITERT = runtime_name().startswith("ai-edge-litert")


@pytest.fixture(scope="module")
def scalar_model() -> Path:
    path = Path(os.environ["HOSVD_ARM64_FIXTURES"]) / SCALAR_MODEL
    assert path.is_file(), f"{path} is missing: make test-arm64 writes it (python -m tests.arm64.fixtures)"
    return path


def test_the_cpu_is_the_emulated_pi_cpu() -> None:
    cpu = os.environ.get("QEMU_CPU", "")
    assert cpu in EXPECTED, f"QEMU_CPU={cpu!r}: the tier emulates one of {sorted(EXPECTED)}"
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    hwcap = libc.getauxval(AT_HWCAP)
    assert {name: bool(hwcap & bit) for name, bit in HWCAP.items()} == EXPECTED[cpu]


def test_a_format1_model_is_refused_on_ai_edge_litert_only(scalar_model: Path) -> None:
    interpreter = load_interpreter(scalar_model)
    assert scalar_inputs(interpreter) == ["serving_default/optimizer__learning_rate"]
    if LITERT:
        with pytest.raises(BundleError, match=r"0-d.*on aarch64 crashes on.*convert the model again"):
            check_signature_inputs(interpreter, "old")
    else:
        check_signature_inputs(interpreter, "old")


FEED_0D = """
import sys
import numpy as np
from device_app.runtime import load_interpreter
runner = load_interpreter(sys.argv[1]).get_signature_runner("serving_default")
print(int(runner(optimizer__learning_rate=np.array(0.5, np.float32))["ok"]))
"""


def test_feeding_a_0d_input_crashes_ai_edge_litert_here(scalar_model: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", FEED_0D, str(scalar_model)], capture_output=True, text=True,
                          timeout=300, check=False)
    if LITERT:
        # If this ever stops crashing, check_signature_inputs may be relaxed for the fixed version.
        assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr[-2000:])
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == "1"
