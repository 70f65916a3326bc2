"""The TFLite interpreter: ai-edge-litert when installed, else tflite-runtime (never TensorFlow)."""

from __future__ import annotations

import importlib
import os
import platform
from typing import Any

from hosvd_contract import BundleError

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


def scalar_inputs(interpreter: Any) -> list[str]:
    """``signature/input`` names of every 0-d signature input of a loaded interpreter."""
    found = []
    for key in interpreter.get_signature_list():
        for name, detail in interpreter.get_signature_runner(key).get_input_details().items():
            if len(detail["shape"]) == 0:
                found.append(f"{key}/{name}")
    return found


def check_signature_inputs(interpreter: Any, bundle: str, runtime: str | None = None,
                           machine: str | None = None) -> None:
    """Refuse a bundle this runtime would crash on.

    ai-edge-litert on aarch64 segfaults resizing a 0-d signature input (measured with 2.3 under qemu, Cortex-A72:
    ``set_weights`` of a format-1 bundle, whose learning rate and step were scalars). Format 2 bundles have none;
    older ones work on x86 and on tflite-runtime, so only this combination is refused.

    Raises:
        BundleError: 0-d inputs on aarch64 ai-edge-litert, naming them and the fix.
    """
    runtime = runtime or runtime_name()
    machine = machine or platform.machine()
    if not runtime.startswith("ai-edge-litert") or machine not in ("aarch64", "arm64"):
        return
    scalars = scalar_inputs(interpreter)
    if scalars:
        raise BundleError(f"{bundle}: signature inputs {scalars} are 0-d, which {runtime} on {machine} crashes on "
                          "(segfault in set_weights); convert the model again with this hosvd-convert "
                          "(bundle format 2 passes them as shape [1])")
