"""What holds a train signature's arena: live tensors per op from the flatbuffer, checked against the interpreter.

    python -m bench.arena BUNDLE_OR_TFLITE [--signature train_features] [--top 25]

Prints the subgraph's op count, the peak of the summed live bytes (:func:`converter.measure.live_profile`), the
op running there and the tensors alive at it (shape, bytes, producer, consumers), then the arena the
interpreter really planned for that subgraph (without XNNPACK, so every tensor is in TFLite's arena): the extent
of the arena tensors' data pointers after one invoke, and the node temporaries (im2col and other scratch) among
them, which the flatbuffer does not show.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from converter.measure import live_profile

MIB = 2**20


def called_closure(flatbuffer: bytes, subgraph: int) -> list[int]:
    """``subgraph`` and every subgraph its ops call (WHILE bodies and conditions), recursively."""
    seen, todo = [], [subgraph]
    while todo:
        sub = todo.pop()
        if sub not in seen:
            seen.append(sub)
            todo.extend(live_profile(flatbuffer, subgraph=sub).called)
    return seen


def interpreter_arena(path: Path, signature: str) -> dict[int, dict]:
    """Run ``signature`` once on zeros (ai-edge-litert, no default delegates) and read where the tensors of its
    subgraph sit (each subgraph has its own arena; the views of called subgraphs' tensors gave spans far beyond
    any arena here, so they are not read).

    Returns:
        per subgraph ``{"extent": bytes spanned by its arena tensors' data, "tensors": count,
        "temporaries": [(index, bytes)] (node temporaries: im2col and other scratch, not in the flatbuffer)}``.
    """
    from ai_edge_litert import interpreter as litert
    from tensorflow.lite.python import schema_py_generated as schema

    interp = litert.Interpreter(model_path=str(path), experimental_op_resolver_type=(
        litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
    runner = interp.get_signature_runner(signature)
    inputs = {name: np.zeros(d["shape"], d["dtype"]) for name, d in runner.get_input_details().items()}
    runner(**inputs)
    wrapper = interp._interpreter
    flatbuffer = path.read_bytes()
    model = schema.Model.GetRootAs(flatbuffer, 0)  # accessors: live_profile has the unpacked model already
    out = {}
    for sub in [wrapper.GetSubgraphIndexFromSignature(signature)]:  # called subgraphs' views are not reliable
        arena_ids = {t.index for t in live_profile(flatbuffer, subgraph=sub).tensors}
        known = model.Subgraphs(sub).TensorsLength()
        spans, temporaries = [], []
        for i in range(wrapper.NumTensors(sub)):
            if i < known and i not in arena_ids:
                continue
            try:
                wrapper.TensorType(i, sub)  # a temporary without a type segfaults tensor()
                view = wrapper.tensor(interp, i, sub)
            except (ValueError, RuntimeError):
                continue
            if not isinstance(view, np.ndarray) or view.nbytes == 0:
                continue
            spans.append((view.ctypes.data, view.ctypes.data + view.nbytes))
            if i >= known:
                temporaries.append((i, view.nbytes))
        extent = max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0
        out[sub] = {"extent": extent, "tensors": len(spans), "temporaries": temporaries}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a bundle directory or a .tflite file")
    parser.add_argument("--signature", default="train_features")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-interpreter", action="store_true", help="only the flatbuffer analysis")
    args = parser.parse_args(argv)
    path = args.model / "model.tflite" if args.model.is_dir() else args.model
    profile = live_profile(path.read_bytes(), args.signature)
    peak = profile.peak_op
    print(f"{args.signature}: subgraph {profile.subgraph}, {len(profile.ops)} ops, {len(profile.tensors)} arena "
          f"tensors, called subgraphs {list(profile.called)}")
    print(f"peak live {profile.live[peak] / MIB:.2f} MiB at op {peak} ({profile.ops[peak]})")
    for t in profile.alive_at(peak)[:args.top]:
        users = ", ".join(t.consumers[:3]) + (" ..." if len(t.consumers) > 3 else "")
        print(f"  {t.nbytes / MIB:8.2f} MiB {t.shape!s:22} [{t.producer} -> {users}] {t.name[:80]}")
    flatbuffer = path.read_bytes()
    inner = [live_profile(flatbuffer, subgraph=sub) for sub in called_closure(flatbuffer, profile.subgraph)[1:]]
    if inner:
        largest = max(inner, key=lambda p: max(p.live, default=0))
        print(f"{len(inner)} called subgraphs: summed peaks {sum(max(p.live, default=0) for p in inner) / MIB:.2f} "
              f"MiB, largest {max(largest.live, default=0) / MIB:.2f} MiB (subgraph {largest.subgraph})")
    if not args.no_interpreter:
        arenas = interpreter_arena(path, args.signature)
        main_arena = arenas[profile.subgraph]
        temps = [b for _, b in main_arena["temporaries"]]
        print(f"interpreter (no delegates): subgraph {profile.subgraph}'s arena tensors span "
              f"{main_arena['extent'] / MIB:.2f} MiB ({main_arena['tensors']} tensors; {len(temps)} node "
              f"temporaries, {sum(temps) / MIB:.2f} MiB, largest {max(temps, default=0) / MIB:.2f} MiB)")


if __name__ == "__main__":
    main()
