"""``python -m bench.fit``: the deepest fine-tuning that fits each RAM ceiling, per method (issue #13).

For one paper-scale model (``bench.archs``: random weights, calibrated BatchNorm, as in the other suites), one
batch size and each method, :func:`converter.fit.fit` finds the deepest trainable suffix whose measured need
(peak RSS of a fresh device-runtime process running one step, + device base + margin) fits the ceiling. The
ceilings are searched in ascending order with one shared set of measured candidates: a depth measured for the
first ceiling is judged again for the next, not converted again. Writes ``fit.json`` (one record per ceiling ×
method, with the candidates that search judged) and ``fit.md`` (the table) under ``--out``.

The models here have random weights, so these rows measure depth, not accuracy; the accuracy a fitted depth
reaches on real data is what ``make demo`` shows (digits-wide under its ceiling).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.runner import machine_info

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fit", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2", help="bench.archs model (default mobilenetv2)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=32, help="calibration images (default 32)")
    parser.add_argument("--ceilings", type=float, nargs="+", default=[192.0, 256.0, 384.0], help="MiB")
    parser.add_argument("--methods", nargs="+", default=["none", "hosvd", "asi"])
    parser.add_argument("--epsilon", type=float, default=0.8)
    parser.add_argument("--device-base-mb", type=float, default=None, help="default: converter.fit's")
    parser.add_argument("--margin-mb", type=float, default=None, help="default: converter.fit's")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/fit-<invocation>)")
    return parser.parse_args(argv)


def search(args: argparse.Namespace, work: Path, on_record: Callable[[list[dict[str, Any]]], None]) -> list[dict]:
    """One record per ceiling × method (ceilings ascending, candidates shared within a method); ``on_record``
    gets the records so far after each one (a long search that is interrupted keeps what it measured)."""
    from bench.archs import build_calibrated
    from converter.fit import DEFAULT_DEVICE_BASE_MB, DEFAULT_MARGIN_MB, FitError, fit

    model, calibration = build_calibrated(args.model, args.input_size, seed=0, calibration=args.calibration)
    base = DEFAULT_DEVICE_BASE_MB if args.device_base_mb is None else args.device_base_mb
    margin = DEFAULT_MARGIN_MB if args.margin_mb is None else args.margin_mb
    records = []
    for method in args.methods:
        known: dict = {}
        for ceiling in sorted(args.ceilings):
            started = time.perf_counter()
            before = len(known)

            def show(c: Any, ceiling: float = ceiling) -> None:
                print(f"  {ceiling:g} MiB {c.method:<5} last {c.train_last:>2}: peak {c.peak_mib:6.1f}, need "
                      f"{c.need_mib:6.1f} MiB, saved {c.saved_bytes_allocated / 2**20:6.2f} MiB "
                      f"{'fits' if c.fits else 'too big'}", flush=True)

            record: dict[str, Any] = {"model": args.model, "input_size": args.input_size,
                                      "batch_size": args.batch_size, "method": method, "ceiling_mb": ceiling,
                                      "epsilon": args.epsilon if method != "none" else None,
                                      "device_base_mb": base, "margin_mb": margin}
            try:
                result = fit(model, work / f"{method}-{ceiling:g}", ram_ceiling_mb=ceiling,
                             batch_size=args.batch_size, calibration_data=calibration, method=method,
                             epsilon=args.epsilon, device_base_mb=base, margin_mb=margin, on_candidate=show,
                             candidates_dir=work / f"candidates-{method}", known=known)
                record |= {"deepest": result.chosen.train_last, "max_train_last": result.max_train_last,
                           "peak_mib": result.chosen.peak_mib, "need_mib": result.chosen.need_mib,
                           "saved_allocated_mib": result.chosen.saved_bytes_allocated / 2**20,
                           "candidates": [dataclasses.asdict(c) for c in result.candidates]}
            except FitError as error:
                record |= {"deepest": 0, "error": str(error)}
            record |= {"new_conversions": len(known) - before, "seconds": time.perf_counter() - started}
            records.append(record)
            on_record(records)
    return records


def render(records: list[dict[str, Any]]) -> str:
    """The table: one row per ceiling, the deepest fitting depth per method and what it measured."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    by = {(r["ceiling_mb"], r["method"]): r for r in records}
    head = "| ceiling MiB | " + " | ".join(f"`{m}`: last N (peak / need MiB)" for m in methods)
    lines = [head + " | hosvd ÷ none layers |", "|---" * (len(methods) + 2) + "|"]
    for ceiling in sorted({r["ceiling_mb"] for r in records}):
        cells = []
        for m in methods:
            r = by.get((ceiling, m))
            if r is None:
                cells.append("—")
            elif not r["deepest"]:
                cells.append("nothing fits")
            else:
                cells.append(f"{r['deepest']} ({r['peak_mib']:.1f} / {r['need_mib']:.1f})")
        none, hosvd = by.get((ceiling, "none")), by.get((ceiling, "hosvd"))
        ratio = (f"{hosvd['deepest'] / none['deepest']:.2f}" if none and hosvd and none["deepest"] else "—")
        lines.append(f"| {ceiling:g} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    invocation = f"fit-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = args.out or DEFAULT_RESULTS / invocation
    out.mkdir(parents=True, exist_ok=True)
    print(f"{invocation}: {args.model} {args.input_size}², batch {args.batch_size}, ceilings "
          f"{sorted(args.ceilings)} MiB, methods {args.methods} -> {out}", flush=True)
    started = time.perf_counter()

    def write(records: list[dict[str, Any]]) -> None:
        wall = time.perf_counter() - started
        (out / "fit.json").write_text(json.dumps({"invocation": invocation, "machine": machine_info(),
                                                  "seconds": wall, "records": records}, indent=1))
        (out / "fit.md").write_text(f"# {invocation}\n\n{args.model} {args.input_size}², batch "
                                    f"{args.batch_size}, ε {args.epsilon}; {wall:.0f} s so far.\n\n"
                                    f"{render(records)}")

    with tempfile.TemporaryDirectory(prefix="bench-fit-") as work:
        records = search(args, Path(work), write)
    print(render(records), f"{time.perf_counter() - started:.0f} s; {out / 'fit.md'}", sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
