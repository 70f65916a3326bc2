"""The benchmark harness end to end on the ``tiny`` suite, plus its pure parts (ratios, report) on records."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from bench import report, runner, suite

RECORD_FIELDS = {
    "invocation", "model", "train_last", "method", "epsilon", "batch_size", "input_shape", "runtime",
    "saved_activation_mib", "peak_rss_mib", "ms_per_step", "graph_ops", "convert_s", "dataset", "seed",
    "accuracy_before", "accuracy_after", "ratios",
}


def _record(method: str, peak: float, ms: float, invocation: str = "inv", seed: int = 0, **extra) -> dict:
    base = dict(invocation=invocation, model="m", train_last=2, method=method, epsilon=None, asi_budget=None,
                batch_size=8, input_size=None, input_shape=[8, 8, 1], dataset=None, seed=seed, peak_rss_mib=peak,
                ms_per_step=ms, saved_activation_mib=1.0)
    return base | extra


def test_ratios_use_the_same_invocation_and_group() -> None:
    records = runner.add_ratios([
        _record("recipe", 200.0, 10.0), _record("none", 100.0, 20.0),
        _record("hosvd", 50.0, 5.0, epsilon=0.8, saved_activation_mib=0.25),
        _record("recipe", 1000.0, 1.0, invocation="other"),  # must not be used for "inv"
        _record("hosvd", 80.0, 4.0, seed=1, epsilon=0.8),  # no baseline for seed 1
    ])
    hosvd = records[2]["ratios"]
    assert hosvd["vs_recipe"] == {"peak_rss_mib": 0.25, "ms_per_step": 0.5, "saved_activation_mib": 0.25}
    assert hosvd["vs_none"]["peak_rss_mib"] == pytest.approx(0.5)
    assert records[1]["ratios"]["vs_recipe"]["ms_per_step"] == pytest.approx(2.0)
    assert records[4]["ratios"]["vs_recipe"]["peak_rss_mib"] is None


def test_depth_targets_compare_hosvd_with_none_of_the_same_depth() -> None:
    deep = dict(model="mobilenetv2", input_shape=[224, 224, 3], batch_size=32, cache_speedup=None)
    records = runner.add_ratios([
        _record("none", 250.0, 9.0, train_last=20, **deep),
        _record("hosvd", 140.0, 9.0, epsilon=0.8, train_last=20, **deep),
        _record("none", 400.0, 9.0, train_last=35, **deep),
        _record("hosvd", 280.0, 9.0, epsilon=0.8, train_last=35, **deep),
        _record("hosvd", 10.0, 9.0, epsilon=0.8, train_last=20, cache_speedup=None),  # another model: no target
    ])
    lines = [line for line in report.targets_section(records) if "weighted layers" in line]
    assert lines == [
        "- MobileNetV2 224², last 20 weighted layers, batch 32, hosvd ε 0.8: peak RSS 140.0 MiB, 0.56× of streamed "
        "`none` (target ≤ 0.6: met).",
        "- MobileNetV2 224², last 35 weighted layers, batch 32, hosvd ε 0.8: peak RSS 280.0 MiB, 0.70× of streamed "
        "`none` (target ≤ 0.5: not met).",
    ]


@pytest.mark.parametrize("field", [f for f in runner.GROUP_FIELDS if f != "invocation"])
def test_a_baseline_from_another_setting_is_never_used(field: str) -> None:
    other = {"model": "other", "input_size": 96, "train_last": 5, "batch_size": 32, "dataset": "digits",
             "seed": 7}[field]
    records = runner.add_ratios([_record("recipe", 200.0, 10.0, **{field: other}), _record("none", 100.0, 20.0),
                                 _record("hosvd", 50.0, 5.0, epsilon=0.8)])
    assert records[2]["ratios"]["vs_recipe"]["peak_rss_mib"] is None
    assert records[2]["ratios"]["vs_none"]["peak_rss_mib"] == pytest.approx(0.5)


def test_every_run_of_every_suite_gets_both_baselines() -> None:
    """The suites' specs, turned into records as run_suite records them, all get ratios from add_ratios: the
    grouping the suites are built for is the one the ratios use."""
    for name, make in suite.SUITES.items():
        specs = make()
        assert specs, name
        records = runner.add_ratios([asdict(spec) | {"invocation": name, "peak_rss_mib": 100.0 + i,
                                                     "ms_per_step": 10.0, "saved_activation_mib": 1.0}
                                     for i, spec in enumerate(specs)])
        for spec, record in zip(specs, records, strict=True):
            for base in ("vs_recipe", "vs_none"):
                assert record["ratios"][base]["peak_rss_mib"] is not None, (name, spec, base)
            if spec.method not in ("recipe", "none"):
                assert record["ratios"]["vs_none"]["peak_rss_mib"] != 1.0, (name, spec)  # not its own baseline
    with pytest.raises(ValueError, match="epsilon"):
        suite.RunSpec("m", 2, "hosvd")


@pytest.mark.needs_tf
def test_tiny_suite_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    from bench.__main__ import main

    assert main(["--suite", "tiny", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    records = json.loads((out / "records.json").read_text())
    assert [r["method"] for r in records] == ["recipe", "none", "hosvd"]
    assert len({r["invocation"] for r in records}) == 1
    for r in records:
        assert set(r) >= RECORD_FIELDS, RECORD_FIELDS - set(r)
        assert r["peak_rss_mib"] > r["base_rss_mib"] > 0
        assert r["ms_per_step"] > 0 and r["graph_ops"] > 0 and r["convert_s"] > 0
        assert r["runtime"].startswith("ai-edge-litert")
        assert r["dataset"] == "digits" and r["input_shape"] == [8, 8, 1]
        assert len(r["loss_curve"]) == r["steps"]
    recipe, none, hosvd = records
    # one pre-trained model, measured before any step: compression changes training, not inference
    assert recipe["accuracy_before"] == none["accuracy_before"] == hosvd["accuracy_before"]
    assert recipe["accuracy_after"] > recipe["accuracy_before"]  # fine-tuning on digits helps (0.66 -> 0.79 here)
    assert recipe["plan"] == "whole" and none["plan"] == hosvd["plan"] == "streamed"
    assert hosvd["ratios"]["vs_recipe"]["peak_rss_mib"] == pytest.approx(hosvd["peak_rss_mib"] / recipe["peak_rss_mib"])
    assert hosvd["ratios"]["vs_none"]["ms_per_step"] == pytest.approx(hosvd["ms_per_step"] / none["ms_per_step"])
    assert hosvd["epsilon"] == 0.8 and hosvd["saved_activation_mib"] < hosvd["saved_activation_vanilla_mib"]
    assert none["ms_per_step_cached"] > 0
    # recipe and none share one bundle: the same weights and data give the same accuracy
    assert recipe["accuracy_after"] == pytest.approx(none["accuracy_after"], abs=0.01)
    text = report.render(out)
    assert "| digits_cnn | 8×8×1 | 2 | 8 | hosvd ε0.8 |" in text
    assert "### Accuracy" in text and (out / "pareto.png").is_file() and (out / "loss_curves.png").is_file()
    assert not (out / "work").exists()


def test_fit_table_gives_each_ceilings_deepest_depth_and_the_layer_ratio() -> None:
    from bench.fit import render

    def fitted(method: str, ceiling: float, deepest: int, peak: float = 0.0) -> dict:
        return {"method": method, "ceiling_mb": ceiling, "deepest": deepest, "peak_mib": peak,
                "need_mib": peak + 64}

    table = render([fitted("none", 192, 0), fitted("none", 256, 3, 180.5), fitted("hosvd", 192, 2, 120.0),
                    fitted("hosvd", 256, 7, 189.25)])
    rows = table.splitlines()
    assert rows[0].startswith("| ceiling MiB | `none`: last N") and "`hosvd`" in rows[0]
    assert rows[2] == "| 192 | nothing fits | 2 (120.0 / 184.0) | — |"  # no ratio without a none depth
    assert rows[3] == "| 256 | 3 (180.5 / 244.5) | 7 (189.2 / 253.2) | 2.33 |"
