"""What the aarch64 tier prepares on x86 with TensorFlow: ``python -m tests.arm64.fixtures OUT_DIR``.

Writes ``OUT_DIR/format1-scalar.tflite``, a model with a 0-d signature input as format-1 bundles had, so the
refusal of such models is exercised for real on aarch64 (``test_on_aarch64.py``), where no TensorFlow exists.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.runtime.format1 import write_scalar_input_model

SCALAR_MODEL = "format1-scalar.tflite"


def main(out_dir: str) -> Path:
    path = Path(out_dir) / SCALAR_MODEL
    if not path.exists():
        write_scalar_input_model(path)
    return path


if __name__ == "__main__":
    print(main(sys.argv[1]))
