"""The TFLite interpreter: ai-edge-litert when installed, else tflite-runtime (never TensorFlow)."""

from __future__ import annotations

import importlib
import os
import platform
import struct
from collections.abc import Iterable
from pathlib import Path
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


def load_interpreter(model_path: str | os.PathLike[str], num_threads: int = 2,
                     signatures: Iterable[str] | None = None, fuse: bool = False) -> Any:
    """A new interpreter over ``model_path`` (its arena is allocated at the first invoke).

    On ai-edge-litert: with ``signatures``, only those signatures' subgraphs are delegated to XNNPACK
    (:func:`delegate_only`; the others still run, on the builtin kernels), and unless ``fuse`` XNNPACK takes each
    op on its own (``experimental_disable_delegate_node_fusion``), so the intermediate tensors stay in TFLite's
    arena, which shares memory between them, instead of in each fused partition's own. Both lower the peak of a
    training step (docs/bench.md, "What the device runtime holds"); fusion pays for the frozen prefix's inference
    at micro-batch 1. tflite-runtime 2.14 has no node-fusion option and delegates less by itself: its
    interpreter is loaded as it is. glibc's mmap threshold is fixed first (:func:`device_app.memory.tune_malloc`).
    """
    from device_app.memory import tune_malloc

    tune_malloc()
    name, module = _module()
    if name != "ai-edge-litert":
        return module.Interpreter(model_path=os.fspath(model_path), num_threads=num_threads)
    source: dict[str, Any] = {"model_path": os.fspath(model_path)}
    if signatures is not None:
        source = {"model_content": delegate_only(Path(model_path).read_bytes(), signatures)}
    return module.Interpreter(**source, num_threads=num_threads, experimental_disable_delegate_node_fusion=not fuse)


# A few fields of the TFLite flatbuffer schema (tensorflow/compiler/mlir/lite/schema/schema.fbs), by field index.
_MODEL_SUBGRAPHS, _MODEL_SIGNATURE_DEFS = 2, 7
_SUBGRAPH_NAME = 4
_SIGNATURE_KEY, _SIGNATURE_SUBGRAPH_INDEX = 2, 4
# TFLite never delegates a subgraph whose name starts so (Interpreter::ModifyGraphWithDelegate skips them).
_NOT_DELEGATED = b"VALIDATION:"


def _u32(buf: bytes | bytearray, at: int) -> int:
    return struct.unpack_from("<I", buf, at)[0]


def _field(buf: bytes | bytearray, table: int, index: int) -> int | None:
    """Absolute position of field ``index`` of the table at ``table``, ``None`` when absent."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    size = struct.unpack_from("<H", buf, vtable)[0]
    if 4 + 2 * index >= size:
        return None
    offset = struct.unpack_from("<H", buf, vtable + 4 + 2 * index)[0]
    return table + offset if offset else None


def _tables(buf: bytes | bytearray, at: int | None) -> list[int]:
    """The tables of the vector of tables whose offset field is at ``at``."""
    if at is None:
        return []
    vec = at + _u32(buf, at)
    return [vec + 4 + 4 * i + _u32(buf, vec + 4 + 4 * i) for i in range(_u32(buf, vec))]


def _string(buf: bytes | bytearray, at: int) -> bytes:
    start = at + _u32(buf, at)
    return bytes(buf[start + 4:start + 4 + _u32(buf, start)])


def delegate_only(model: bytes, signatures: Iterable[str]) -> bytes:
    """``model`` with every subgraph but those of ``signatures`` renamed ``VALIDATION:<name>``.

    The default XNNPACK delegate is applied to every subgraph of an interpreter at its first allocation, whichever
    signature runs: it packs a copy of the constant weights of each (the frozen prefix appears in ``infer``,
    ``evaluate``, ``train`` and ``features``). Renamed subgraphs are left to the builtin kernels. That includes
    the control-flow bodies the kept signatures call (hosvd's Gram–Schmidt loops over a few columns): XNNPACK
    holds a few KiB for every op it takes, whatever its size, and gains nothing on ops that small (hosvd, last 20
    layers of MobileNetV2: 11.7 MiB less, step as fast). The new names are appended to the buffer (flatbuffer
    offsets point forward) and only the name offsets change; the result is built in one copy. A subgraph without
    a name field is left as it is.

    Raises:
        BundleError: not a TFLite flatbuffer.
    """
    if model[4:8] != b"TFL3":
        raise BundleError("model.tflite is not a TFLite flatbuffer (no TFL3 identifier)")
    keep = set(signatures)
    root = _u32(model, 0)
    subgraphs = _tables(model, _field(model, root, _MODEL_SUBGRAPHS))
    kept = set()
    for sig in _tables(model, _field(model, root, _MODEL_SIGNATURE_DEFS)):
        key_at = _field(model, sig, _SIGNATURE_KEY)
        if key_at is not None and _string(model, key_at).decode() in keep:
            index_at = _field(model, sig, _SIGNATURE_SUBGRAPH_INDEX)
            kept.add(_u32(model, index_at) if index_at is not None else 0)
    tail = bytearray(b"\0" * (-len(model) % 4))
    patches: dict[int, int] = {}  # position of a name offset -> its new value
    for index, subgraph in enumerate(subgraphs):
        name_at = _field(model, subgraph, _SUBGRAPH_NAME)
        if index in kept or name_at is None or _string(model, name_at).startswith(_NOT_DELEGATED):
            continue
        name = _NOT_DELEGATED + _string(model, name_at)
        patches[name_at] = len(model) + len(tail) - name_at
        tail += struct.pack("<I", len(name)) + name + b"\0" * (4 - len(name) % 4)
    view, pieces, at = memoryview(model), [], 0
    for pos in sorted(patches):
        pieces += [view[at:pos], struct.pack("<I", patches[pos])]
        at = pos + 4
    return b"".join([*pieces, view[at:], tail])


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
