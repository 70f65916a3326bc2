"""``python -m bench.layers``: how fast the trainable layers' forward and backward run on ai-edge-litert.

Per trainable layer type (the shapes of MobileNetV2 224²'s last 4 convs + head, batch 32, plus a 3×3 Conv2D and
a Conv1D), one small TFLite model built from the converter's own layer modules, with three signatures: ``forward``,
``weights`` (forward + weight gradient + SGD update) and ``step`` (forward + weight and input gradients +
update); the weight and input gradients are timed as the differences. Each model also holds ``reference``: the
same layer's forward with *constant* weights, the way XNNPACK runs inference (a 1×1 conv or Dense is a constant
matmul), timed in the same process, so ``ratio`` = achieved GMAC/s ÷ the constant-weight rate.

Then the whole ``train_features`` step of MobileNetV2 224², last 4 convs + head (``train_last=5``), batch 32,
``none`` and ``hosvd`` ε 0.8 (calibrated), against the constant-weight 1×1 matmul of its largest layer (Conv_1),
and the streamed step (32 ``features`` invokes + ``train_features``) against batch-32 inference (``infer``), with
the streamed peak RSS of a fresh ``python -m device_app.measure`` process.

MACs come from the converted graphs' op census (:mod:`bench.xnnpack`: matmuls and convolutions from their
shapes, WHILE bodies times their trip count, an elementwise MUL as one per element); the ops left on built-in
kernels are listed from the interpreter's delegated node list. Times are medians of ``--repeats`` rounds that
call each compared function once (2 threads), so both sides of a ratio see the same load: on a shared machine
the ratios are the figures to read, the milliseconds only context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench import xnnpack

THREADS = 2
BATCH = 32
COMPUTE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "BATCH_MATMUL", "MUL")


@dataclass(frozen=True)
class LayerCase:
    """One trainable layer: its Keras type, constructor arguments and input shape (no batch axis)."""

    name: str
    keras_type: str
    kwargs: dict
    in_shape: tuple[int, ...]
    batch: int = BATCH


CASES = (
    LayerCase("block_16_expand 1×1 160→960", "Conv2D", {"filters": 960, "kernel_size": 1, "use_bias": False},
              (7, 7, 160)),
    LayerCase("block_16_depthwise 3×3 960", "DepthwiseConv2D", {"kernel_size": 3, "padding": "same",
                                                                 "use_bias": False}, (7, 7, 960)),
    LayerCase("block_16_project 1×1 960→320", "Conv2D", {"filters": 320, "kernel_size": 1, "use_bias": False},
              (7, 7, 960)),
    LayerCase("Conv_1 1×1 320→1280", "Conv2D", {"filters": 1280, "kernel_size": 1, "use_bias": False}, (7, 7, 320)),
    LayerCase("predictions Dense 1280→10", "Dense", {"units": 10}, (1280,)),
    LayerCase("Conv2D 3×3 256→256 (14², batch 8)", "Conv2D", {"filters": 256, "kernel_size": 3, "padding": "same",
                                                              "use_bias": False}, (14, 14, 256), batch=8),
    LayerCase("Conv1D k5 64→64 (L 128)", "Conv1D", {"filters": 64, "kernel_size": 5, "padding": "same"},
              (128, 64)),
)
CONV_1 = 3  # the index of the layer the whole step is compared with


def median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each function, timed in interleaved rounds (one call of each per round), so a
    load change on a shared machine hits every figure of a ratio alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1e3)
    return {key: statistics.median(t) for key, t in times.items()}


def _node(case: LayerCase):
    import keras

    from converter.graph import parse_model

    keras.utils.set_random_seed(0)
    inp = keras.Input(case.in_shape)
    model = keras.Model(inp, getattr(keras.layers, case.keras_type)(**case.kwargs)(inp))
    node = parse_model(model).nodes[0]
    node.trainable = True
    return node


def layer_model(case: LayerCase) -> bytes:
    """The TFLite model of one layer: ``forward``, ``weights``, ``step`` (variable weights) and ``reference``."""
    import tensorflow as tf

    from converter.engine import frozen_params
    from converter.layers import module_for
    from converter.layers.base import INFERENCE, ForwardContext

    node = _node(case)
    frozen = replace(node, trainable=False)  # constant weights: the layer as inference runs it
    module = module_for(node.kind)
    holder = tf.Module()
    holder.params = {role: tf.Variable(value) for role, value in node.weights.items()}

    def probe(t: tf.Tensor) -> tf.Tensor:  # a few elements: keeps the op that makes t, copies nothing big out
        return tf.reshape(t, [-1])[:4]

    def train(x: tf.Tensor, dy: tf.Tensor, need_dx: bool) -> dict[str, tf.Tensor]:
        y, saved = module.forward(node, holder.params, [x], ForwardContext(training=True))
        dxs, grads = module.backward(node, holder.params, saved, dy, need_dx)
        updates = [holder.params[role].assign_sub(0.01 * grad) for role, grad in grads.items()]
        with tf.control_dependencies(updates):
            out = {"y": probe(y)}
            if need_dx:
                out["dx"] = probe(dxs[0])
            return {k: tf.identity(v) for k, v in out.items()}

    x_spec = tf.TensorSpec([case.batch, *case.in_shape], tf.float32, name="x")
    dy_spec = tf.TensorSpec([case.batch, *node.out_shape], tf.float32, name="dy")
    fns = {
        "forward": tf.function(lambda x: {"y": probe(module.forward(node, holder.params, [x], INFERENCE)[0])},
                               input_signature=[x_spec]),
        "reference": tf.function(lambda x: {"y": probe(module.forward(frozen, frozen_params(node), [x], INFERENCE)[0])},
                                 input_signature=[x_spec]),
        "weights": tf.function(lambda x, dy: train(x, dy, False), input_signature=[x_spec, dy_spec]),
        "step": tf.function(lambda x, dy: train(x, dy, True), input_signature=[x_spec, dy_spec]),
    }
    sigs = {key: fn.get_concrete_function() for key, fn in fns.items()}
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(holder, tmp, signatures=sigs)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(sigs))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        return converter.convert()


def builtin_summary(model: bytes, signature: str) -> dict[str, int]:
    """MACs (and the op count, as ``op#``) per compute op type that the built-in kernels run."""
    out: dict[str, int] = {}
    for p in xnnpack.builtin_ops(xnnpack.placements(model, signature, THREADS), COMPUTE_OPS):
        out[p.op] = out.get(p.op, 0) + p.macs
        out[f"{p.op}#"] = out.get(f"{p.op}#", 0) + 1
    return out


def _rate(macs: int, ms: float) -> float:
    return macs / ms / 1e6 if ms > 0 else float("nan")


def measure_layer(case: LayerCase, repeats: int) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    model = layer_model(case)
    interpreter = Interpreter(model_content=model, num_threads=THREADS)
    rng = np.random.default_rng(0)
    node_out = _node(case).out_shape
    x = rng.standard_normal((case.batch, *case.in_shape), dtype=np.float32)
    dy = rng.standard_normal((case.batch, *node_out), dtype=np.float32)
    keys = ("reference", "forward", "weights", "step")
    runners = {key: interpreter.get_signature_runner(key) for key in keys}
    ms = median_ms({key: (lambda r=runners[key], i=({"x": x} if key in ("reference", "forward") else
                                                    {"x": x, "dy": dy}): r(**i)) for key in keys}, repeats)
    macs = {key: sum(xnnpack.signature_macs(model, key).values()) for key in keys}
    parts = {"forward": (ms["forward"], macs["forward"]),
             "weight_grad": (ms["weights"] - ms["forward"], macs["weights"] - macs["forward"]),
             "input_grad": (ms["step"] - ms["weights"], macs["step"] - macs["weights"]),
             "step": (ms["step"], macs["step"])}
    ref_rate = _rate(macs["reference"], ms["reference"])
    return {
        "layer": case.name, "type": case.keras_type, "batch": case.batch, "reference_ms": ms["reference"],
        "reference_gmacs": ref_rate,
        "parts": {k: {"ms": t, "macs": m, "gmacs": _rate(m, t), "ratio": _rate(m, t) / ref_rate}
                  for k, (t, m) in parts.items()},
        "builtin": builtin_summary(model, "step"),
    }


def measure_model(repeats: int, methods: tuple[str, ...]) -> list[dict]:
    """The whole step of MobileNetV2 224², last 4 convs + head, batch 32, per method."""
    from ai_edge_litert.interpreter import Interpreter

    from bench.archs import build_calibrated
    from converter.convert import convert
    from device_app.bundle import Bundle

    conv1 = CASES[CONV_1]  # the constant-weight matmul of Conv_1's shape, timed alongside every step
    conv1_model = layer_model(conv1)
    reference = Interpreter(model_content=conv1_model, num_threads=THREADS).get_signature_runner("reference")
    conv1_x = np.random.default_rng(1).standard_normal((conv1.batch, *conv1.in_shape), dtype=np.float32)
    conv1_macs = sum(xnnpack.signature_macs(conv1_model, "reference").values())
    model, calibration = build_calibrated("mobilenetv2", 224, seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, 224, 224, 3), dtype=np.float32)
    y = rng.integers(0, 10, BATCH).astype(np.int32)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            path = Path(tmp) / method
            convert(model, path, train_last=5, compression=method, epsilon=0.8, batch_sizes=(BATCH,),
                    calibration_data=calibration, measure_memory=False)
            content = (path / "model.tflite").read_bytes()
            peak = json.loads(subprocess.run(  # a fresh device process, as the converter's planner measures it
                [sys.executable, "-m", "device_app.measure", str(path), "--batch-size", str(BATCH), "--mode",
                 "streamed", "--steps", "2"], capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            bundle = Bundle(path, THREADS)
            feats = bundle.features(x, 1)
            infer = bundle.runner("infer")
            ms = median_ms({"train": lambda b=bundle, f=feats: b.train_step(f, y, from_features=True),
                            "reference": lambda: reference(x=conv1_x), "features": lambda b=bundle: b.features(x, 1),
                            "infer": lambda r=infer: r(x=x)}, repeats, warmup=1)
            train_ms, features_ms, infer_ms = ms["train"], ms["features"], ms["infer"]
            macs = xnnpack.signature_macs(content, "train_features")
            out.append({"method": method, "train_features_ms": train_ms, "features_ms": features_ms,
                        "streamed_step_ms": features_ms + train_ms, "infer_b32_ms": infer_ms,
                        "peak_rss_mib": peak["peak_rss_bytes"] / 2**20,
                        "reference_gmacs": _rate(conv1_macs, ms["reference"]),
                        "macs": sum(macs.values()), "macs_by_op": dict(macs),
                        "builtin": builtin_summary(content, "train_features")})
            del bundle, infer
    return out


def render(layers: list[dict], steps: list[dict]) -> str:
    lines = ["| layer | part | MMAC | ms | GMAC/s | ratio to constant-weight |", "|---|---|---|---|---|---|"]
    for r in layers:
        for part, p in r["parts"].items():
            lines.append(f"| {r['layer']} | {part} | {p['macs'] / 1e6:.1f} | {p['ms']:.2f} | {p['gmacs']:.1f} | "
                         f"{p['ratio']:.2f} |")
        lines.append(f"| {r['layer']} | constant-weight forward | | {r['reference_ms']:.2f} | "
                     f"{r['reference_gmacs']:.1f} | 1 |")
        if r["builtin"]:
            lines.append(f"| {r['layer']} | on built-in kernels | {r['builtin']} | | | |")
    if steps:
        lines += ["", f"Whole step, MobileNetV2 224² train_last=5 batch {BATCH}, against the constant-weight matmul of "
                  "Conv_1's shape timed in the same rounds.", "",
                  "| method | MMAC | train_features ms | GMAC/s | Conv_1 constant GMAC/s | ratio | streamed step ms | "
                  "infer b32 ms | step / infer | streamed peak MiB | built-in compute ops (MMAC) |", "|---" * 11 + "|"]
        for s in steps:
            rate = _rate(s["macs"], s["train_features_ms"])
            builtin = {k: round(v / 1e6, 1) for k, v in s["builtin"].items() if not k.endswith("#")}
            lines.append(f"| {s['method']} | {s['macs'] / 1e6:.0f} | {s['train_features_ms']:.1f} | {rate:.1f} | "
                         f"{s['reference_gmacs']:.1f} | {rate / s['reference_gmacs']:.2f} | "
                         f"{s['streamed_step_ms']:.1f} | {s['infer_b32_ms']:.1f} | "
                         f"{s['streamed_step_ms'] / s['infer_b32_ms']:.2f} | {s['peak_rss_mib']:.1f} | {builtin} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.layers", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed invokes per figure (median)")
    parser.add_argument("--only", action="append", default=[], help="run only layers whose name has this text")
    parser.add_argument("--methods", default="none,hosvd", help="whole-step methods ('' skips MobileNetV2)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.only or any(o in c.name for o in args.only)]
    layers = [measure_layer(case, args.repeats) for case in cases]
    steps = measure_model(args.repeats, tuple(m for m in args.methods.split(",") if m)) if args.methods else []
    print(render(layers, steps))
    if args.json:
        args.json.write_text(json.dumps({"layers": layers, "steps": steps}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
