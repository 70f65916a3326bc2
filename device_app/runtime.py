"""The TFLite interpreter: ai-edge-litert when installed, else tflite-runtime (never TensorFlow)."""

from __future__ import annotations

import importlib
import os
from typing import Any

RUNTIMES = (
    ("ai-edge-litert", "ai_edge_litert.interpreter"),
    ("tflite-runtime", "tflite_runtime.interpreter"),
)


class RuntimeMissing(ImportError):
    """Neither runtime is installed."""


def _module() -> tuple[str, Any]:
    for name, module in RUNTIMES:
        try:
            return name, importlib.import_module(module)
        except ImportError:
            continue
    raise RuntimeMissing("no TFLite runtime: install the `device` extra (ai-edge-litert) or `device-legacy` "
                         "(tflite-runtime 2.14)")


def runtime_name() -> str:
    """``"<package> <version>"`` of the runtime :func:`load_interpreter` uses."""
    from importlib.metadata import PackageNotFoundError, version

    name, _ = _module()
    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:  # pragma: no cover - importable but not installed as a distribution
        return name


def load_interpreter(model_path: str | os.PathLike[str], num_threads: int = 2) -> Any:
    """A new interpreter over ``model_path`` (its arena is allocated at the first invoke)."""
    _, module = _module()
    return module.Interpreter(model_path=os.fspath(model_path), num_threads=num_threads)
