"""Peak RSS of a bundle's train step on the device runtime, measured by the device's own code in a fresh process.

The child is ``python -m device_app.measure`` (:mod:`device_app.measure`): it loads the bundle the way the
device's training child does and steps through :mod:`device_app.steps`, importing no TensorFlow, so
the figure is what a device process would see. The converter only spawns it; it imports nothing of device_app.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tensorflow.lite.python import schema_py_generated as schema

from hosvd_contract import Sig


def measure(bundle_dir: str | Path, batch_size: int, mode: str, micro_batch: int, threads: int = 2,
            timeout: float = 600, steps: int = 2) -> dict:
    """Run ``steps`` train steps of the bundle (``mode`` ``whole`` or ``streamed``) in a child and return its
    figures. Two by default: the second step can allocate what the first did not (glibc's heap grew by ~70 MiB
    at step 2 on MobileNetV2 224², last 20 layers, before ``device_app.memory.tune_malloc``), and the device
    runs many.

    Returns:
        ``{"base_rss_bytes", "peak_rss_bytes", "base_anon_rss_bytes", "anon_rss_bytes", "runtime"}``.

    Raises:
        RuntimeError: the child failed (its stderr tail is in the message).
    """
    cmd = [sys.executable, "-m", "device_app.measure", str(bundle_dir), "--batch-size", str(batch_size),
           "--mode", mode, "--micro-batch", str(micro_batch), "--threads", str(threads), "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {mode} b{batch_size} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


_NOT_SAVED = ("VAR_HANDLE", "READ_VARIABLE")  # weights: variables and their reads, not saved activations
_DTYPE_BYTES = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 9: 1, 10: 8}  # FLOAT32 FLOAT16 INT32 UINT8 INT64 BOOL ...


@dataclass(frozen=True)
class SavedTensor:
    """A tensor the train graph keeps from its forward half for its backward half."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


def saved_for_backward(flatbuffer: bytes, signature: str) -> list[SavedTensor]:
    """The tensors of ``signature``'s main subgraph that live across from its forward half to its backward half,
    in the order the interpreter runs the ops.

    The backward half starts at the first op that reads both something computed from the labels ``y`` and
    something computed from the data input (the loss). A saved tensor is one produced before that op (or a
    signature input) and read at or after it; weights (variable handles and reads) and constants are not
    counted. Read off the converted model, independently of the converter's own bookkeeping: a compression that
    the converter scheduled after the loss shows up here as the full activation it left alive.

    Raises:
        KeyError: no signature ``signature``.
    """
    model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    sig = next((s for s in model.signatureDefs if s.signatureKey.decode() == signature), None)
    if sig is None:
        raise KeyError(f"no signature {signature!r}")
    graph = model.subgraphs[sig.subgraphIndex]
    labels = {t.tensorIndex for t in sig.inputs if t.name.decode() == Sig.Y}
    data = {t.tensorIndex for t in sig.inputs} - labels
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    produced_before: set[int] = set(data)
    read_after: set[int] = set()
    boundary = None
    for op in graph.operators:
        inputs = [i for i in (op.inputs if op.inputs is not None else []) if i >= 0]
        outputs = list(op.outputs if op.outputs is not None else [])
        from_labels, from_data = any(i in labels for i in inputs), any(i in data for i in inputs)
        if from_labels:
            labels.update(outputs)
        if from_data:
            data.update(outputs)
        if boundary is None and from_labels and from_data:
            boundary = op
        if boundary is None:
            if names.get(codes[op.opcodeIndex]) not in _NOT_SAVED:
                produced_before.update(outputs)
        else:
            read_after.update(inputs)
    tensor_types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    saved = []
    for index in sorted(produced_before & read_after):
        tensor = graph.tensors[index]
        shape = tuple(int(d) for d in (tensor.shape if tensor.shape is not None else []))
        saved.append(SavedTensor(tensor.name.decode(), shape, tensor_types.get(tensor.type, "?"),
                                 _DTYPE_BYTES.get(tensor.type, 4) * math.prod(shape)))
    return saved
