"""One copy of each distinct control-flow subgraph: the converted model's identical loop bodies and conditions
shared by every WHILE that runs them.

The TFLite converter writes a cond and a body subgraph for every ``tf.while_loop`` of every signature, and
hosvd's Gram–Schmidt loops repeat the same few shapes across modes, layers and signatures (MobileNetV2's last 28
layers: 533 such subgraphs, 23 distinct). The interpreter builds a ``Subgraph`` for each at load, ≈ 25 KiB
each whatever its size (it reserves room for 128 tensors and nodes), in every interpreter a process creates:
measured, 208 more loop subgraphs grew the loaded interpreter's RssAnon 5.8 MiB. A body runs one WHILE at a
time and gets its inputs copied in at each run, so WHILEs of the same shapes can share one.

The flatbuffer is patched in place, not rebuilt, so the buffers keep the converter's alignment: the subgraph
vector is shortened to the kept tables (its entries point forward to them, as before) and the subgraph indices of
the WHILE/IF/CALL_ONCE/CALL options and of the signature defs are rewritten. The dropped copies stay in the file,
unread.
"""

from __future__ import annotations

import hashlib
import struct

from tensorflow.lite.python import schema_py_generated as schema

# (options type, vtable slots of its subgraph-index fields), from the schema's accessors
_INDEX_SLOTS = {
    schema.BuiltinOptions.WhileOptions: (schema.WhileOptions, (4, 6)),
    schema.BuiltinOptions.IfOptions: (schema.IfOptions, (4, 6)),
    schema.BuiltinOptions.CallOnceOptions: (schema.CallOnceOptions, (4,)),
    schema.BuiltinOptions.CallOptions: (schema.CallOptions, (4,)),
}
_MODEL_SUBGRAPHS, _SIGNATURE_SUBGRAPH_INDEX = 8, 12


def _index_fields(op: schema.Operator) -> list[int]:
    """Absolute positions of the subgraph-index fields of ``op``'s options (absent fields hold the default 0)."""
    found = _INDEX_SLOTS.get(op.BuiltinOptionsType())
    table = op.BuiltinOptions()
    if found is None or table is None:
        return []
    options = found[0]()
    options.Init(table.Bytes, table.Pos)
    return [options._tab.Pos + o for slot in found[1] if (o := options._tab.Offset(slot))]


def _subgraph_key(model: schema.Model, sub: schema.SubGraph, buf: bytes, canonical: list[int]) -> bytes:
    """What a subgraph computes: tensors (shape, type, constant data), operators (code, operands, options with
    subgraph indices read through ``canonical``), inputs and outputs; names left out."""
    h = hashlib.sha256()
    for t in range(sub.TensorsLength()):
        tensor = sub.Tensors(t)
        data = model.Buffers(tensor.Buffer()).DataAsNumpy() if tensor.Buffer() else 0
        h.update(repr((tensor.ShapeAsNumpy().tolist() if tensor.ShapeLength() else [], tensor.Type(),
                       tensor.IsVariable(), tensor.ShapeSignatureAsNumpy().tolist()
                       if tensor.ShapeSignatureLength() else [])).encode())
        h.update(data.tobytes() if not isinstance(data, int) else b"")
    for o in range(sub.OperatorsLength()):
        op = sub.Operators(o)
        fields = _index_fields(op)
        table = op.BuiltinOptions()
        h.update(repr((op.OpcodeIndex(), op.InputsAsNumpy().tolist() if op.InputsLength() else [],
                       op.OutputsAsNumpy().tolist() if op.OutputsLength() else [], op.BuiltinOptionsType(),
                       [canonical[struct.unpack_from("<i", buf, p)[0]] for p in fields])).encode())
        if table is not None and not fields:  # the options' values (their table holds offsets, not values)
            options = schema.BuiltinOptionsCreator(op.BuiltinOptionsType(), table)
            h.update(repr(sorted((k, v.tolist() if hasattr(v, "tolist") else v)
                                 for k, v in vars(options).items())).encode())
    h.update(repr((sub.InputsAsNumpy().tolist() if sub.InputsLength() else [],
                   sub.OutputsAsNumpy().tolist() if sub.OutputsLength() else [])).encode())
    return h.digest()


def share_identical_subgraphs(flatbuffer: bytes) -> bytes:
    """``flatbuffer`` with each set of identical non-signature subgraphs reduced to its first member; unchanged
    when there is nothing to share."""
    buf = bytes(flatbuffer)
    model = schema.Model.GetRootAs(buf, 0)
    count = model.SubgraphsLength()
    fixed = {0} | {model.SignatureDefs(s).SubgraphIndex() for s in range(model.SignatureDefsLength())}
    subs = [model.Subgraphs(i) for i in range(count)]
    canonical = list(range(count))
    while True:  # nested loops: a body's key reads its inner loops' canonical indices, so repeat to a fixed point
        first: dict[bytes, int] = {}
        updated = [i if i in fixed else first.setdefault(_subgraph_key(model, subs[i], buf, canonical), i)
                   for i in range(count)]
        if updated == canonical:
            break
        canonical = updated
    kept = [i for i in range(count) if canonical[i] == i]
    if len(kept) == count:
        return flatbuffer
    position = {k: n for n, k in enumerate(kept)}
    new_index = {i: position[canonical[i]] for i in range(count)}

    out = bytearray(buf)
    for i in kept:
        for o in range(subs[i].OperatorsLength()):
            for pos in _index_fields(subs[i].Operators(o)):
                struct.pack_into("<i", out, pos, new_index[struct.unpack_from("<i", buf, pos)[0]])
    for s in range(model.SignatureDefsLength()):
        sig = model.SignatureDefs(s)
        if o := sig._tab.Offset(_SIGNATURE_SUBGRAPH_INDEX):
            struct.pack_into("<I", out, sig._tab.Pos + o, new_index[sig.SubgraphIndex()])
    # the subgraph vector shortened in place: its entries point forward to the kept tables, which lie after it
    field = model._tab.Pos + model._tab.Offset(_MODEL_SUBGRAPHS)
    vector = field + struct.unpack_from("<I", buf, field)[0]
    tables = [vector + 4 + 4 * i + struct.unpack_from("<I", buf, vector + 4 + 4 * i)[0] for i in kept]
    struct.pack_into("<I", out, vector, len(kept))
    for n, table in enumerate(tables):
        struct.pack_into("<I", out, vector + 4 + 4 * n, table - (vector + 4 + 4 * n))
    return bytes(out)

