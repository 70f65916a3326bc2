"""``hosvd-convert``: convert a Keras model into a training bundle, inspect a bundle, export weights back."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CHOICES = ("auto", "sparse_categorical_crossentropy", "categorical_crossentropy", "mse")  # converter.losses.CHOICES
EPS_RULES = ("energy", "centred")  # converter.compression.ranks.EpsRule (importing it would load TensorFlow)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-size takes integers like 32 or 32,8; got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--batch-size must be positive, got {text!r}")
    return sizes


def _bundle_options(parser: argparse.ArgumentParser) -> None:
    """The options ``convert`` and ``fit`` share: the model, the bundle to write, and how it trains."""
    parser.add_argument("model", help=".keras/.h5 file, or a directory holding one")
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--epsilon", type=float, default=0.8, help="energy share kept per mode (default 0.8)")
    parser.add_argument("--eps-rule", default="energy", choices=EPS_RULES,
                        help="which energy --epsilon is a share of: energy (default, the paper's rule: all of it) or "
                             "centred (always keep the leading component, ~ the batch mean of post-ReLU inputs, "
                             "and apply ε to the energy beyond it; keeps more components)")
    parser.add_argument("--batch-size", type=_batch_sizes, default=[32], metavar="B[,B2...]",
                        help="static train batch size(s); the first is the default signature (default 32)")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate (changeable on the device)")
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-rank", type=int, default=32,
                        help="cap on the static rank per mode (default 32); the static ranks are sized from the "
                             "ε-ranks on --calibration-data below it (the table notes where it binds)")
    parser.add_argument("--subspace-iters", type=int, default=1,
                        help="subspace-iteration steps per mode, each a Gram multiplication + Gram-Schmidt "
                             "(default 1)")
    parser.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                        help="hosvd: start every step's subspace iteration cold instead of from the previous bases")
    parser.add_argument("--oversample", type=int, default=4, metavar="P",
                        help="hosvd: columns iterated beyond each static rank, not saved (default 4)")
    parser.add_argument("--batch-mode-iters", type=int, default=3, metavar="N",
                        help="hosvd: subspace-iteration steps of the batch mode, which starts cold at every step "
                             "(default 3)")
    parser.add_argument("--labels", help="comma-separated class names")
    parser.add_argument("--loss", default="auto", choices=CHOICES,
                        help="auto (default): the loss the .keras model was compiled with, else cross-entropy if it "
                             "ends in softmax, else an error; cross-entropy on a model without a final softmax "
                             "trains its logits (from_logits=True) and infer still returns probabilities")
    parser.add_argument("--micro-batch", type=int, default=1, help="prefix micro-batch of the measured streamed plan")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hosvd-convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="Keras model -> training bundle (model.tflite + manifest.json)")
    conv.add_argument("--train-last", type=int, required=True, metavar="N",
                      help="train the last N weighted layers (Conv/Depthwise/Dense) and everything after them")
    conv.add_argument("--compression", default="hosvd", choices=["none", "svd", "hosvd", "asi"])
    conv.add_argument("--calibration-data",
                      help=".npz (array 'x') or .npy of representative inputs, at least one train batch; required "
                           "for svd/hosvd/asi (the static ranks, i.e. the memory allocated, are sized on all of it)")
    conv.add_argument("--ram-budget-mb", type=float, help="asi: budget for all saved activations (MiB)")
    conv.add_argument("--no-measure", action="store_true", help="skip measuring peak RSS on ai-edge-litert")
    conv.add_argument("--no-compare-vanilla", action="store_true",
                      help="do not also convert and measure the uncompressed (none) bundle for comparison")
    _bundle_options(conv)

    fit = sub.add_parser("fit", help="the deepest fine-tuning whose measured training peak fits a RAM ceiling")
    fit.add_argument("--ram-ceiling-mb", type=float, required=True, metavar="M",
                     help="the device's [training] ram_ceiling_mb")
    fit.add_argument("--calibration-data", required=True, help=".npz (array 'x') or .npy of representative inputs")
    fit.add_argument("--method", default="hosvd", choices=["hosvd", "asi", "svd", "none", "auto"],
                     help="compression; auto searches none, hosvd and asi and keeps the deepest (default hosvd)")
    fit.add_argument("--margin-mb", type=float,
                     help="safety margin added to each candidate's need (default 16, as the device's)")
    fit.add_argument("--device-base-mb", type=float,
                     help="what the device holds besides the training step: daemon, evaluation, data buffers "
                          "(the device planner's refusal names it; default 48)")
    _bundle_options(fit)

    insp = sub.add_parser("inspect", help="print a bundle's manifest summary and op census")
    insp.add_argument("bundle")

    exp = sub.add_parser("export-keras", help="write device-trained weights back into the Keras model")
    exp.add_argument("bundle")
    exp.add_argument("weights", help=".npz keyed by the manifest's weight names (a device checkpoint)")
    exp.add_argument("--out", required=True, help=".keras file to write")
    exp.add_argument("--model", help="the original .keras model, if the bundle has no source.keras")
    return parser


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def _dims(values) -> str:
    return "x".join(map(str, values)) if values else "-"


def layer_table(manifest) -> str:
    """What the bundle keeps for backward, per trained layer and per mask-keeping node.

    Columns: the saved input's shape (batch first), the method, the static ranks it allocates, the ε-ranks on the
    calibration data, the allocated KiB at the static ranks (the headline), the vanilla KiB (the float32 input),
    the bit-packed mask KiB (ReLU/ReLU6/max-pool nodes), and a note where the layer is saved differently from
    the method asked for.
    """
    rows = [("layer", "type", "saved input", "method", "static ranks", "ε-ranks", "allocated KiB", "vanilla KiB",
             "masks KiB", "note")]
    for info in manifest.layers:
        if not (info.trainable or info.saved_bytes_masks):
            continue
        if info.trainable:
            rows.append((info.name, info.type, _dims(info.saved_shape), info.compression or "-", _dims(info.ranks),
                         _dims(info.calibrated_ranks), _kib(info.saved_bytes_compressed),
                         _kib(info.saved_bytes_vanilla), "-", info.note or ""))
        else:
            rows.append((info.name, info.type, _dims(info.saved_shape), "mask", "-", "-", "-", "-",
                         _kib(info.saved_bytes_masks), "bit-packed"))
    total_v = sum(i.saved_bytes_vanilla for i in manifest.layers)
    total_c = sum(i.saved_bytes_compressed for i in manifest.layers)
    total_m = sum(i.saved_bytes_masks for i in manifest.layers)
    rows.append(("total", "", "", "", "", "", _kib(total_c), _kib(total_v), _kib(total_m),
                 f"saved for backward: {_kib(total_c + total_m)} KiB"))
    return _aligned(rows)


def _aligned(rows: list[tuple]) -> str:
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _memory_table(manifest) -> str:
    """Estimated and measured peak per plan (VmHWM and RssAnon), and the uncompressed bundle's beside it."""
    rows = [("batch", "mode", "micro", "estimated MiB", "measured peak MiB", "anon MiB", "base MiB",
             "none: peak MiB", "none: anon MiB")]
    for m in manifest.memory_plan:
        rows.append((m.batch_size, m.mode, m.micro_batch, _mib(m.estimated_peak_bytes),
                     _mib(m.measured_peak_rss_bytes), _mib(m.measured_anon_rss_bytes), _mib(m.measured_base_rss_bytes),
                     _mib(m.vanilla_peak_rss_bytes), _mib(m.vanilla_anon_rss_bytes)))
    return _aligned(rows)


def _convert(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from converter.calibration import load_calibration
    from converter.convert import STAGES, convert

    calibration = load_calibration(args.calibration_data) if args.calibration_data else None
    bar = tqdm(total=len(STAGES), desc="converting", unit="stage", file=sys.stderr)

    def progress(stage: str) -> None:
        bar.set_postfix_str(stage)
        if stage != STAGES[0]:
            bar.update(1)

    try:
        manifest = convert(
            args.model, args.out, train_last=args.train_last, compression=args.compression, epsilon=args.epsilon,
            eps_rule=args.eps_rule, batch_sizes=args.batch_size, optimizer=args.optimizer, learning_rate=args.lr,
            momentum=args.momentum, weight_decay=args.weight_decay, max_rank=args.max_rank,
            subspace_iters=args.subspace_iters, warm_start=args.warm_start, oversample=args.oversample,
            batch_iters=args.batch_mode_iters,
            calibration_data=None if calibration is None else np.asarray(calibration),
            ram_budget_mb=args.ram_budget_mb, labels=args.labels.split(",") if args.labels else None,
            loss=args.loss, micro_batch=args.micro_batch, measure_memory=not args.no_measure,
            compare_vanilla=not args.no_compare_vanilla, progress=progress)
    finally:
        bar.update(bar.total - bar.n)
        bar.close()
    print(layer_table(manifest))
    print()
    print(_memory_table(manifest))
    print(f"\nbundle: {Path(args.out).resolve()}  ({sum(manifest.op_census.values())} ops, "
          f"converted in {manifest.versions['convert_seconds']} s)")
    return 0


def _fit(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from converter.calibration import load_calibration
    from converter.convert import load_model
    from converter.fit import AUTO_METHODS, candidate_table, fit, max_train_last, search_steps

    if len(args.batch_size) != 1:
        raise ValueError(f"fit takes one --batch-size, got {args.batch_size}")
    model = load_model(args.model)
    methods = len(AUTO_METHODS) if args.method == "auto" else 1
    bar = tqdm(total=methods * search_steps(max_train_last(model)), desc="fitting", unit="bundle",
               file=sys.stderr)

    def measured(candidate) -> None:
        bar.set_postfix_str(f"{candidate.method} last {candidate.train_last}: {candidate.need_mib:.0f} MiB "
                            f"{'fits' if candidate.fits else 'too big'}")
        bar.update(1)

    defaults = {k: v for k, v in (("margin_mb", args.margin_mb), ("device_base_mb", args.device_base_mb))
                if v is not None}
    try:
        result = fit(
            model, args.out, ram_ceiling_mb=args.ram_ceiling_mb, batch_size=args.batch_size[0],
            calibration_data=np.asarray(load_calibration(args.calibration_data)), method=args.method,
            epsilon=args.epsilon, eps_rule=args.eps_rule, on_candidate=measured, optimizer=args.optimizer,
            learning_rate=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, max_rank=args.max_rank,
            subspace_iters=args.subspace_iters, warm_start=args.warm_start, oversample=args.oversample,
            batch_iters=args.batch_mode_iters, labels=args.labels.split(",") if args.labels else None,
            loss=args.loss, micro_batch=args.micro_batch, **defaults)
    finally:
        bar.update(bar.total - bar.n)
        bar.close()
    print(candidate_table(result.candidates, result.ceiling_mb))
    print(f"\nneed = measured peak + device base {result.device_base_mb:g} MiB + safety margin "
          f"{result.margin_mb:g} MiB, against the ceiling {result.ceiling_mb:g} MiB")
    if len(result.deepest) > 1:
        ranked = sorted(result.deepest.items(), key=lambda kv: -kv[1])
        print("deepest fitting: " + ", ".join(f"{m} {d} layers" for m, d in ranked)
              + f"; {result.chosen.method} trains the most")
    c = result.chosen
    print(f"chosen: {c.method}, the last {c.train_last} of {result.max_train_last} weighted layers, measured peak "
          f"{c.peak_mib:.1f} MiB ({c.mode}), need {c.need_mib:.1f} MiB <= {result.ceiling_mb:g} MiB")
    print(f"bundle: {Path(args.out).resolve()}  (fit in {result.seconds:.0f} s, {len(result.candidates)} bundles "
          "measured)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from hosvd_contract import load_manifest

    m = load_manifest(args.bundle)
    print(f"model        {m.model_name}  (format {m.format_version}, sha256 {m.sha256[:16]}…)")
    print(f"input        {m.input.shape} {m.input.dtype} {m.input.layout}"
          + (f" channels={m.input.channels}" if m.input.channels else "")
          + (f" rate={m.input.rate_hz} Hz" if m.input.rate_hz else ""))
    print(f"features     {m.features_shape}   output {m.output_shape}   task {m.task} ({m.loss})")
    print(f"labels       {', '.join(m.labels)}")
    print(f"optimizer    {m.optimizer}")
    print(f"compression  {m.compression}   train_last {m.train_last}")
    print("train        " + ", ".join(f"{s.train}/{s.train_features} (batch {s.batch_size})"
                                       for s in m.train_signatures))
    print(f"weights      {len(m.weights)} tensors, {sum(1 for w in m.weights if w.trainable)} trainable")
    if m.fit:
        print(f"fit          {m.fit['method']} train_last {m.fit['train_last']} for ram_ceiling_mb "
              f"{m.fit['ram_ceiling_mb']:g} (device base {m.fit['device_base_mb']:g} + margin "
              f"{m.fit['margin_mb']:g} MiB; {len(m.fit['candidates'])} candidates measured)")
    print(f"versions     {m.versions}   created {m.created}\n")
    print(layer_table(m) + "\n")
    print(_memory_table(m) + "\n")
    print(f"op census ({sum(m.op_census.values())} ops, every subgraph):")
    for op, count in m.op_census.items():
        print(f"  {op:<24} {count}")
    return 0


def _export_keras(args: argparse.Namespace) -> int:
    from converter.export_keras import export_keras

    written = export_keras(args.bundle, args.weights, args.out, args.model)
    print(f"wrote {len(written)} trained weights into {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hosvd-convert``; errors about the model or options exit 2 with one clear line."""
    from converter.errors import ConversionError
    from hosvd_contract import BundleError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    handler = {"convert": _convert, "fit": _fit, "inspect": _inspect, "export-keras": _export_keras}[args.command]
    try:
        return handler(args)
    except (ConversionError, BundleError, FileNotFoundError, ValueError) as err:
        print(f"hosvd-convert {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
