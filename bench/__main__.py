"""``python -m bench [--quick | --suite NAME] [--out DIR]``: run a benchmark suite and write its report.

Writes under ``DIR`` (default ``bench/results/<invocation>/``): ``records.jsonl``/``records.json`` (one record
per run), ``machine.json``, ``report.md`` (``python -m bench.report``) and PNG plots.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import time
from pathlib import Path

from bench import suite

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path.home() / ".cache" / "hosvd-bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the quick suite (< 10 minutes on 2 cores)")
    which.add_argument("--suite", choices=sorted(suite.SUITES), default="full", help="suite to run (default full)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<invocation>)")
    parser.add_argument("--only", action="append", default=[],
                        help="run only specs whose model or dataset is this (repeatable)")
    parser.add_argument("--limit", type=int, help="run at most this many specs (in suite order)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="pre-trained real-data models")
    parser.add_argument("--keep-work", action="store_true", help="keep the bundles under <out>/work")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    name = "quick" if args.quick else args.suite
    specs = suite.SUITES[name]()
    if args.only:
        specs = [s for s in specs if s.model in args.only or s.dataset in args.only]
    specs = specs[: args.limit] if args.limit else specs
    invocation = f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = args.out or DEFAULT_RESULTS / invocation
    started = time.monotonic()
    print(f"{invocation}: {len(specs)} runs -> {out}", flush=True)

    from bench import plots, report, runner

    def show(record: dict) -> None:
        print(f"  {record['model']:<12} tl{record['train_last']} {report.setting(record):<12} "
              f"seed {record['seed']}: peak {record['peak_rss_mib']:7.1f} MiB, {record['ms_per_step']:9.2f} ms/step, "
              f"acc {record['accuracy_before']} -> {record['accuracy_after']}  [{time.monotonic() - started:.0f} s]",
              flush=True)

    records = runner.run_suite(specs, out, invocation, args.cache_dir, on_record=show, keep_work=args.keep_work)
    plots.write_plots(records, out)
    (out / "report.md").write_text(report.render(out))
    print(f"{len(records)}/{len(specs)} runs in {time.monotonic() - started:.0f} s; report: {out / 'report.md'}")
    return 0 if len(records) == len(specs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
