"""The benchmark harness end to end on the ``tiny`` suite, plus its pure parts (ratios, report) on records."""

from __future__ import annotations

import json
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
                batch_size=8, input_shape=[8, 8, 1], dataset=None, seed=seed, peak_rss_mib=peak, ms_per_step=ms,
                saved_activation_mib=1.0)
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
    assert records[4]["ratios"]["vs_recipe"]["peak_rss_mib"] is None


def test_suites_are_well_formed() -> None:
    for name, make in suite.SUITES.items():
        specs = make()
        assert specs, name
        groups = {s.group_key for s in specs}
        for key in groups:  # every group has its baselines, so every ratio has a reference
            methods = {s.method for s in specs if s.group_key == key}
            assert {"recipe", "none"} <= methods, (name, key)
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
        assert 0.0 <= r["accuracy_before"] <= 1.0 and 0.0 <= r["accuracy_after"] <= 1.0
        assert r["runtime"].startswith("ai-edge-litert")
        assert r["dataset"] == "digits" and r["input_shape"] == [8, 8, 1]
        assert len(r["loss_curve"]) == r["steps"]
    recipe, none, hosvd = records
    assert recipe["plan"] == "whole" and none["plan"] == hosvd["plan"] == "streamed"
    assert recipe["ratios"]["vs_recipe"]["peak_rss_mib"] == 1.0
    assert hosvd["ratios"]["vs_recipe"]["peak_rss_mib"] == pytest.approx(hosvd["peak_rss_mib"] / recipe["peak_rss_mib"])
    assert hosvd["epsilon"] == 0.8 and hosvd["saved_activation_mib"] < hosvd["saved_activation_vanilla_mib"]
    assert none["ms_per_step_cached"] > 0
    # recipe and none share one bundle: the same weights and data give the same accuracy
    assert recipe["accuracy_after"] == pytest.approx(none["accuracy_after"], abs=0.01)
    text = report.render(out)
    assert "| digits_cnn | 8×8×1 | 2 | 8 | hosvd ε0.8 |" in text
    assert "### Accuracy" in text and (out / "pareto.png").is_file() and (out / "loss_curves.png").is_file()
    assert not (out / "work").exists()
