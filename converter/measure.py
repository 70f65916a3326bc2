"""Peak RSS of a bundle's train step on the device runtime, measured by the device's own code in a fresh process.

The child is ``python -m device_app.measure`` (:mod:`device_app.measure`): it loads the bundle the way the
device's training child does and steps through :mod:`device_app.steps`, importing no TensorFlow, so
the figure is what a device process would see. The converter only spawns it; it imports nothing of device_app.
"""

from __future__ import annotations

import functools
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
    model = _unpacked(flatbuffer)
    sig = _signature(model, signature)
    graph = model.subgraphs[sig.subgraphIndex]
    labels = {t.tensorIndex for t in sig.inputs if t.name.decode() == Sig.Y}
    data = {t.tensorIndex for t in sig.inputs} - labels
    op_names = _op_names(model)
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
            if op_names[op.opcodeIndex] not in _NOT_SAVED:
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


@dataclass(frozen=True)
class LiveTensor:
    """A tensor of the arena with its lifetime: produced by op ``first`` (-1: a subgraph input), last read by op
    ``last`` (the op count: a subgraph output, alive to the end)."""

    index: int
    name: str
    shape: tuple[int, ...]
    nbytes: int
    first: int
    last: int
    producer: str
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class LiveProfile:
    """Live bytes of one subgraph's arena tensors after each op, in the interpreter's op order.

    ``live[i]`` counts every tensor produced at or before op ``i`` and read at or after it (op ``i``'s inputs and
    outputs are both alive while it runs, as in TFLite's arena planner). Node temporaries (im2col and other
    scratch an op allocates at prepare time) are not in the flatbuffer and not counted; nor are called subgraphs
    (``WHILE`` bodies), whose arenas are separate: see ``called``.
    """

    subgraph: int
    ops: tuple[str, ...]
    live: tuple[int, ...]
    tensors: tuple[LiveTensor, ...]
    called: tuple[int, ...]

    @property
    def peak_op(self) -> int:
        return max(range(len(self.live)), key=self.live.__getitem__)

    def alive_at(self, op: int) -> list[LiveTensor]:
        """The tensors alive while op ``op`` runs, largest first."""
        return sorted((t for t in self.tensors if t.first <= op <= t.last), key=lambda t: -t.nbytes)


def _op_names(model) -> list[str]:
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return [names.get(c, str(c)) for c in codes]


def _signature(model, signature: str):
    sig = next((s for s in model.signatureDefs if s.signatureKey.decode() == signature), None)
    if sig is None:
        raise KeyError(f"no signature {signature!r}")
    return sig


@functools.lru_cache(maxsize=1)
def _unpacked(flatbuffer: bytes) -> schema.ModelT:
    """The model as objects, kept for the next call: a tool profiling a bundle's 100+ subgraphs one by one
    unpacked the whole deep model (≈ 2 s) each time."""
    return schema.ModelT.InitFromPackedBuf(flatbuffer, 0)


def live_profile(flatbuffer: bytes, signature: str | None = None, subgraph: int | None = None) -> LiveProfile:
    """The lifetimes and live bytes of the arena tensors of ``signature``'s subgraph (or subgraph ``subgraph``),
    read off the converted model: which tensors hold the arena's high-water mark, and which op is running then.

    Constants (tensors with a buffer) and variables (VAR_HANDLE outputs, resources) are not arena tensors and
    are left out. The sum of live bytes is a lower bound of the arena: TFLite's planner places tensors at offsets
    (greedy by size), which can leave gaps; compare with the interpreter's arena (``bench/arena.py``).

    Raises:
        KeyError: no signature ``signature``.
    """
    model = _unpacked(flatbuffer)
    index = _signature(model, signature).subgraphIndex if subgraph is None else subgraph
    graph = model.subgraphs[index]
    op_names = _op_names(model)
    ops = list(graph.operators or [])
    end = len(ops)
    first: dict[int, int] = {i: -1 for i in (graph.inputs if graph.inputs is not None else [])}
    last: dict[int, int] = {}
    producer: dict[int, str] = {}
    consumers: dict[int, list[str]] = {}
    called: list[int] = []
    skip: set[int] = set()
    names: list[str] = []
    for n, op in enumerate(ops):
        name = op_names[op.opcodeIndex]
        names.append(name)
        opts = op.builtinOptions
        for attr in ("condSubgraphIndex", "bodySubgraphIndex", "subgraphIndex", "thenSubgraphIndex",
                     "elseSubgraphIndex", "initSubgraphIndex"):
            if opts is not None and hasattr(opts, attr):
                called.append(getattr(opts, attr))
        for i in (op.inputs if op.inputs is not None else []):
            if i >= 0:
                last[i] = n
                consumers.setdefault(i, []).append(f"{n}:{name}")
        for o in (op.outputs if op.outputs is not None else []):
            first.setdefault(o, n)
            producer[o] = f"{n}:{name}"
            if name in _NOT_SAVED:
                skip.add(o)
    for o in (graph.outputs if graph.outputs is not None else []):
        last[o] = end
    tensors = []
    for i, start in first.items():
        tensor = graph.tensors[i]
        buffer = model.buffers[tensor.buffer] if tensor.buffer else None
        if i in skip or tensor.isVariable or tensor.type == schema.TensorType.RESOURCE or (
                buffer is not None and buffer.data is not None and len(buffer.data)) or (buffer and buffer.size):
            continue
        shape = tuple(int(d) for d in (tensor.shape if tensor.shape is not None else []))
        tensors.append(LiveTensor(i, tensor.name.decode(), shape, _DTYPE_BYTES.get(tensor.type, 4) * math.prod(shape),
                                  start, last.get(i, start), producer.get(i, "input"), tuple(consumers.get(i, ()))))
    delta = [0] * (end + 2)
    for t in tensors:
        delta[max(t.first, 0)] += t.nbytes
        delta[min(t.last, end - 1) + 1] -= t.nbytes
    live, running = [], 0
    for n in range(end):
        running += delta[n]
        live.append(running)
    return LiveProfile(index, tuple(names), tuple(live), tuple(tensors), tuple(dict.fromkeys(called)))
