"""``python -m bench.accuracy_why [--dataset digits] [--seeds 0 1 2]``: where hosvd ε 0.8's accuracy gap to
``none`` comes from (issue 11), measured rather than tuned.

Every variant changes one thing of the data set's fine-tuning recipe (``demo.run.SETTINGS``) and runs on every
seed, each paired with a ``none`` run of the same steps and learning rate:

- ``base``: the recipe (hosvd ε 0.8, one subspace iteration per mode);
- ``iters3``: three subspace iterations per mode (closer to the exact HOSVD's bases and ranks);
- ``eps0.95``: ε 0.95 (how the gap falls as more energy is kept);
- ``steps×2``: twice the fine-tuning steps (a slower start, or a lasting bias?);
- ``lr/3``: a third of the learning rate (gradient noise amplified by the step size?).

Writes ``records.jsonl``/``records.json`` (the harness's records) and ``why.md`` (the gap table) under
``bench/results/why-<dataset>-<time>/``.

``--ranks`` measures instead, in numpy on the pre-trained models, the exact ε-ranks per mode (B, H, W, C) of the
first trainable layer's input, batch by batch, on the factory calibration data (what sizes the static ranks) and
on the new user's shifted training data (what the device compresses), and the share of each batch's energy that
its batch mean holds (post-ReLU activations are non-negative, so their mean is one dominant component).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.__main__ import DEFAULT_CACHE, DEFAULT_RESULTS
from bench.suite import DATA_MODELS, RunSpec

VARIANTS = ("base", "iters3", "eps0.95", "steps×2", "lr/3")


def specs(dataset: str, seeds: tuple[int, ...]) -> list[tuple[str, RunSpec, RunSpec]]:
    """``(variant, none spec, hosvd spec)`` for every variant and seed."""
    from demo.run import SETTINGS

    s = SETTINGS[dataset]
    out = []
    for seed in seeds:
        none = RunSpec(model=DATA_MODELS[dataset], train_last=s.train_last, method="none", dataset=dataset,
                       seed=seed, batch_size=s.batch_size, warmup=5, timed=s.steps - 5, optimizer=s.optimizer,
                       learning_rate=s.learning_rate, cached_steps=0)
        hosvd = replace(none, method="hosvd", epsilon=0.8)
        longer = {"timed": 2 * s.steps - 5}
        slower = {"learning_rate": s.learning_rate / 3}
        out += [("base", none, hosvd), ("iters3", none, replace(hosvd, subspace_iters=3)),
                ("eps0.95", none, replace(hosvd, epsilon=0.95)),
                ("steps×2", replace(none, **longer), replace(hosvd, **longer)),
                ("lr/3", replace(none, **slower), replace(hosvd, **slower))]
    return out


def gap_table(pairs: list[tuple[str, RunSpec, RunSpec]], records: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: per variant, none and hosvd accuracy after (mean over seeds) and the paired gap."""
    def find(spec: RunSpec) -> dict[str, Any] | None:
        keys = ("method", "epsilon", "seed", "learning_rate", "subspace_iters")
        return next((r for r in records if all(r[k] == getattr(spec, k) for k in keys)
                     and r["steps"] == spec.warmup + spec.timed), None)

    rows = ["| variant | seeds | steps | lr | none after % | hosvd after % | gap (points) per seed | mean gap |",
            "|---|---|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        found = [(find(n), find(h)) for v, n, h in pairs if v == variant]
        found = [(n, h) for n, h in found if n and h]
        if not found:
            continue
        gaps = [100 * (h["accuracy_after"] - n["accuracy_after"]) for n, h in found]
        rows.append(f"| {variant} | {len(found)} | {found[0][1]['steps']} | {found[0][1]['learning_rate']:g} | "
                    f"{100 * statistics.fmean(n['accuracy_after'] for n, _ in found):.1f} | "
                    f"{100 * statistics.fmean(h['accuracy_after'] for _, h in found):.1f} | "
                    f"{', '.join(f'{g:+.1f}' for g in gaps)} | {statistics.fmean(gaps):+.1f} |")
    return rows


def eps_rank(t: np.ndarray, mode: int, eps: float) -> int:
    """Smallest k with Σσ²(top k) / Σσ² ≥ ε for the mode-``mode`` unfolding of ``t`` (the paper's rule)."""
    s2 = np.linalg.svd(np.moveaxis(t, mode, 0).reshape(t.shape[mode], -1), compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(s2) / s2.sum(), eps - 1e-12) + 1)


def rank_table(dataset: str, seeds: tuple[int, ...], cache_dir: Path, eps: float = 0.8) -> list[str]:
    """Markdown rows: mean (max) ε-ranks per mode and the batch mean's energy share, factory vs new user."""
    import keras

    from bench import realdata
    from demo.run import SETTINGS

    batch, layer = SETTINGS[dataset].batch_size, "conv3"
    rows = [f"| seed | data | ε{eps:g}-ranks B, H, W, C: mean over batches (max) | batch mean's energy share |",
            "|---|---|---|---|"]
    for seed in seeds:
        real = realdata.load(dataset, seed, cache_dir)
        prefix = keras.Model(real.model.inputs, real.model.get_layer(layer).input)
        for name, x in (("factory calibration", real.calibration), ("new user, shifted", real.x_train)):
            acts = prefix.predict(x, verbose=0)
            acts = acts[:, None] if acts.ndim == 3 else acts  # Conv1D: (B, 1, L, C), the converter's layout
            blocks = [acts[i:i + batch] for i in range(0, len(acts) - batch + 1, batch)]
            ranks = np.array([[eps_rank(b, mode, eps) for mode in range(4)] for b in blocks])
            share = statistics.fmean(float(len(b) * np.sum(b.mean(0) ** 2) / np.sum(b**2)) for b in blocks)
            text = ", ".join(f"{m:.1f} ({x})" for m, x in zip(ranks.mean(0), ranks.max(0), strict=True))
            rows.append(f"| {seed} | {name} | {text} | {share:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy_why", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=sorted(DATA_MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ranks", action="store_true", help="measure the ε-ranks of conv3's input instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.ranks:
        print(f"Command: `python -m bench.accuracy_why --ranks --dataset {args.dataset}`\n")
        print("\n".join(rank_table(args.dataset, tuple(args.seeds), args.cache_dir)))
        return 0
    from bench import runner

    pairs = specs(args.dataset, tuple(args.seeds))
    unique = list(dict.fromkeys(spec for _, n, h in pairs for spec in (n, h)))
    invocation = f"why-{args.dataset}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = args.out or DEFAULT_RESULTS / invocation
    records = runner.run_suite(unique, out, invocation, args.cache_dir)
    table = gap_table(pairs, records)
    (out / "why.md").write_text(f"Command: `python -m bench.accuracy_why --dataset {args.dataset} --seeds "
                                f"{' '.join(map(str, args.seeds))}`\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))
    return 0 if len(records) == len(unique) else 1


if __name__ == "__main__":
    raise SystemExit(main())
