"""Which kernel runs each op of a signature (XNNPACK or the built-in one), and its multiply-accumulates.

ai-edge-litert has no per-op profiler in Python, but its interpreter lists the nodes of the primary subgraph
after delegation (``NodeName``/``NodeInputs``/``NodeOutputs``). With ``experimental_disable_delegate_node_fusion``
XNNPACK takes every op it accepts as its own ``DELEGATE`` node, which has exactly that op's inputs and outputs, so an
op is delegated iff a ``DELEGATE`` node carries its operands. Only the primary subgraph is listed, so the signature's
subgraph (and each WHILE/IF body it calls) is moved to index 0 in a copy of the flatbuffer (subgraph indices in the
control-flow options and signature defs renumbered), then loaded. Delegation is decided per subgraph, on the
static/dynamic kind of each operand, so the answer is the one the real model gets.

Imports numpy, flatbuffers and ai-edge-litert only (never TensorFlow): it runs on a device too.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter
from ai_edge_litert.tools import flatbuffer_utils

OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
# ops whose body subgraphs run as part of the op (CALL_ONCE runs the variable initialiser: not part of a step)
_CALLS = {"WHILE": ("condSubgraphIndex", "bodySubgraphIndex"), "IF": ("thenSubgraphIndex", "elseSubgraphIndex"),
          "CALL": ("subgraph",)}
_INDEX_FIELDS = (*{f for fields in _CALLS.values() for f in fields}, "initSubgraphIndex")


@dataclass(frozen=True)
class Placement:
    """One op of a signature: where it runs and what it computes."""

    subgraph: int
    index: int
    op: str
    delegated: bool
    macs: int
    out_shape: tuple[int, ...]


def read(model: bytes) -> schema.ModelT:
    return flatbuffer_utils.convert_bytearray_to_object(bytearray(model))


def op_name(model: schema.ModelT, op: schema.OperatorT) -> str:
    code = model.operatorCodes[op.opcodeIndex]
    return OP_NAMES.get(max(code.builtinCode, code.deprecatedBuiltinCode), str(code.builtinCode))


def signature_subgraph(model: schema.ModelT, signature: str) -> int:
    for sig in model.signatureDefs:
        key = sig.signatureKey.decode() if isinstance(sig.signatureKey, bytes) else sig.signatureKey
        if key == signature:
            return sig.subgraphIndex
    raise KeyError(f"no signature {signature!r} in the model")


def called_subgraphs(model: schema.ModelT, index: int) -> list[int]:
    """Subgraphs run by the control-flow ops of subgraph ``index``, recursively (CALL_ONCE excluded)."""
    found: list[int] = []
    for op in model.subgraphs[index].operators or []:
        for field in _CALLS.get(op_name(model, op), ()):
            sub = getattr(op.builtinOptions, field)
            if sub not in found:
                found += [sub, *[s for s in called_subgraphs(model, sub) if s != sub]]
    return found


def _swap(model: schema.ModelT, index: int) -> None:
    """Exchange subgraphs 0 and ``index`` in place, renumbering control-flow options and signature defs."""
    swap = {0: index, index: 0}
    model.subgraphs[0], model.subgraphs[index] = model.subgraphs[index], model.subgraphs[0]
    for sub in model.subgraphs:
        for op in sub.operators or []:
            for field in _INDEX_FIELDS:
                if hasattr(op.builtinOptions, field):
                    value = getattr(op.builtinOptions, field)
                    setattr(op.builtinOptions, field, swap.get(value, value))
    for sig in model.signatureDefs or []:
        sig.subgraphIndex = swap.get(sig.subgraphIndex, sig.subgraphIndex)


def _reachable(model: schema.ModelT, index: int) -> set[int]:
    """Subgraph ``index`` and every subgraph its ops run, the CALL_ONCE initialiser included."""
    found = {index, *called_subgraphs(model, index)}
    for sub in list(found):
        for op in model.subgraphs[sub].operators or []:
            if op_name(model, op) == "CALL_ONCE":
                found |= _reachable(model, op.builtinOptions.initSubgraphIndex)
    return found


def with_primary(model: schema.ModelT, index: int) -> bytes:
    """The flatbuffer of ``model`` with its subgraph ``index`` as subgraph 0 (``model`` itself is unchanged).

    Subgraphs the new primary never runs are emptied, so loading the copy delegates only what matters (a hosvd
    graph has ~100 loop bodies; delegating all of them for each one made the listing quadratic).
    """
    _swap(model, index)
    keep = _reachable(model, 0)
    dropped = {i: model.subgraphs[i].operators for i in range(len(model.subgraphs)) if i not in keep}
    try:
        for i in dropped:
            model.subgraphs[i].operators = []
        return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    finally:
        for i, ops in dropped.items():
            model.subgraphs[i].operators = ops
        _swap(model, index)


def _shape(sub: schema.SubGraphT, tensor: int) -> tuple[int, ...]:
    return tuple(int(d) for d in sub.tensors[tensor].shape) if tensor >= 0 and sub.tensors[tensor].shape is not None \
        else ()


def op_macs(model: schema.ModelT, sub: schema.SubGraphT, op: schema.OperatorT) -> int:
    """Multiply-accumulates of one op from its static shapes; elementwise MUL counts one per output element."""
    name = op_name(model, op)
    out = math.prod(_shape(sub, op.outputs[0])) if op.outputs is not None and len(op.outputs) else 0
    if name == "FULLY_CONNECTED":
        return out * _shape(sub, op.inputs[1])[-1]
    if name == "BATCH_MATMUL":
        rhs = _shape(sub, op.inputs[1])  # static even where a loop body's lhs is not
        return out * (rhs[-1] if op.builtinOptions.adjY else rhs[-2])
    if name == "CONV_2D":
        return out * math.prod(_shape(sub, op.inputs[1])[1:])
    if name == "DEPTHWISE_CONV_2D":
        return out * math.prod(_shape(sub, op.inputs[1])[1:3])
    if name == "TRANSPOSE_CONV":  # inputs: output shape, weights (C_out, KH, KW, C_in), input
        return math.prod(_shape(sub, op.inputs[2])) * math.prod(_shape(sub, op.inputs[1])[:3])
    if name == "MUL":
        return out
    return 0


def trip_count(model: schema.ModelT, cond: int) -> int:
    """Iterations of a WHILE whose condition compares counters from 0 with constants (``i < n``): the smallest n.

    Raises:
        ValueError: the condition has no constant bound (this census cannot count such a loop).
    """
    sub = model.subgraphs[cond]
    bounds = []
    for op in sub.operators or []:
        if op_name(model, op) in ("LESS", "LESS_EQUAL"):
            buffer = model.buffers[sub.tensors[op.inputs[1]].buffer]
            if buffer.data is not None and len(buffer.data):
                value = int(buffer.data.view("int32")[0])
                bounds.append(value + (op_name(model, op) == "LESS_EQUAL"))
    if not bounds:
        raise ValueError(f"WHILE condition subgraph {cond} has no constant bound")
    return min(bounds)


def subgraph_macs(model: schema.ModelT, index: int) -> Counter[str]:
    """MACs per op name of a subgraph, WHILE bodies included (times their trip count)."""
    sub = model.subgraphs[index]
    counts: Counter[str] = Counter()
    for op in sub.operators or []:
        name = op_name(model, op)
        counts[name] += op_macs(model, sub, op)
        if name == "WHILE":
            body = subgraph_macs(model, op.builtinOptions.bodySubgraphIndex)
            for key, value in body.items():
                counts[key] += value * trip_count(model, op.builtinOptions.condSubgraphIndex)
    return +counts


def signature_macs(model_bytes: bytes, signature: str) -> Counter[str]:
    model = read(model_bytes)
    return subgraph_macs(model, signature_subgraph(model, signature))


def _delegated_ops(content: bytes, threads: int) -> list[bool]:
    """For each op of subgraph 0 of ``content``: whether XNNPACK took it."""
    interpreter = Interpreter(model_content=content, num_threads=threads,
                              experimental_disable_delegate_node_fusion=True)
    interpreter.allocate_tensors()
    wrapper = interpreter._interpreter  # the node list is only reachable through the wrapper
    nodes = [(wrapper.NodeName(i), frozenset(int(t) for t in wrapper.NodeInputs(i) if t >= 0),
              tuple(int(t) for t in wrapper.NodeOutputs(i))) for i in range(wrapper.NumNodes())]
    delegates = {(ins, outs) for name, ins, outs in nodes if name == "DELEGATE"}
    originals = [n for n in nodes if n[0] != "DELEGATE"]
    return [(ins, outs) in delegates for _, ins, outs in originals]


def placements(model_bytes: bytes, signature: str, threads: int = 2) -> list[Placement]:
    """Every op of ``signature`` and of the loop bodies it runs, with its kernel and MACs."""
    model = read(model_bytes)
    root = signature_subgraph(model, signature)
    out = []
    for index in [root, *called_subgraphs(model, root)]:
        sub = model.subgraphs[index]
        delegated = _delegated_ops(with_primary(model, index), threads)
        for i, (op, on_xnnpack) in enumerate(zip(sub.operators or [], delegated, strict=True)):
            shape = _shape(sub, op.outputs[0]) if op.outputs is not None and len(op.outputs) else ()
            out.append(Placement(index, i, op_name(model, op), on_xnnpack, op_macs(model, sub, op), shape))
    return out


def builtin_ops(found: list[Placement], kinds: tuple[str, ...]) -> list[Placement]:
    """The ops of ``kinds`` (e.g. ``("CONV_2D", "FULLY_CONNECTED")``) that run on the built-in kernels."""
    return [p for p in found if p.op in kinds and not p.delegated]
