"""``asi`` under a memory budget: per layer the candidate ε that minimises the summed weight-gradient error measured
on calibration data (an exact knapsack), against one ε lowered until everything fits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from converter.calibration import calibrate
from converter.compression.asi import choose_ranks, knapsack
from converter.compression.factored import tucker_elements
from converter.convert import convert
from converter.engine import COMPRESSIBLE
from converter.gradient_error import gradient_errors
from converter.graph import parse_model, split
from converter.losses import Loss
from tests.converter.fidelity import digits, pretrained

BATCH = 32


def test_knapsack_is_exact_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        options = [[(int(rng.integers(1, 50)), float(rng.random())) for _ in range(4)] for _ in range(4)]
        budget = int(rng.integers(20, 120))
        fits = [p for p in itertools.product(range(4), repeat=4)
                if sum(options[layer][c][0] for layer, c in enumerate(p)) <= budget]
        picks = knapsack(options, budget)
        if not fits:
            assert picks is None
            continue
        best = min(sum(options[layer][c][1] for layer, c in enumerate(p)) for p in fits)
        assert sum(options[layer][c][0] for layer, c in enumerate(picks)) <= budget
        assert sum(options[layer][c][1] for layer, c in enumerate(picks)) == pytest.approx(best)


def test_budget_knapsack_beats_one_lowered_epsilon(tmp_path):
    """On a model pre-trained on real digits, at a budget half of what ε 0.9 needs: the knapsack's summed
    measured gradient error is no larger than the single lowered ε's at the same budget, it fits, and the manifest
    records each layer's ε and measured error."""
    model = pretrained("2d")
    x, _ = digits("2d")
    calib = x[:64]
    graph = parse_model(model)
    sp = split(graph, 4)
    nodes = [n for n in sp.trainable if n.keras_type in COMPRESSIBLE]
    recorded = calibrate(graph, sp, calib, BATCH).first_batch
    acts = [recorded[n.name] for n in nodes]
    errors = gradient_errors(graph, sp, Loss.CROSSENTROPY, calib, BATCH, nodes)
    full = choose_ranks(acts, 0.9, None, 32)
    budget = sum(4 * tucker_elements(a.shape, tuple(r)) for a, r in zip(acts, full.ranks, strict=True)) // 2

    uniform = choose_ranks(acts, 0.9, budget, 32)
    chosen = choose_ranks(acts, 0.9, budget, 32, errors)
    assert uniform.selection == "uniform" and chosen.selection == "knapsack"
    uniform_error = sum(errors(uniform.ranks))
    chosen_error = sum(chosen.errors)
    assert chosen_error == pytest.approx(sum(errors(chosen.ranks)))  # the recorded errors are the measured ones
    assert chosen_error <= uniform_error + 1e-9, f"knapsack {chosen_error:.3f} > one ε {uniform_error:.3f}"
    print(f"summed gradient error at {budget} B: knapsack {chosen_error:.3f} (ε {chosen.epsilons}), "
          f"one ε {uniform.epsilons[0]:.3f}: {uniform_error:.3f}")

    manifest = convert(model, tmp_path, train_last=4, compression="asi", epsilon=0.9, batch_sizes=(BATCH,),
                       calibration_data=calib, ram_budget_mb=budget / 2**20, loss="sparse_categorical_crossentropy",
                       measure_memory=False)
    layers = [i for i in manifest.layers if i.compression == "asi"]
    assert [i.name for i in layers] == [n.name for n in nodes]
    assert sum(i.saved_bytes_compressed for i in layers) <= budget
    assert [i.epsilon for i in layers] == chosen.epsilons
    assert [i.gradient_error for i in layers] == pytest.approx(chosen.errors, rel=1e-4)
    assert manifest.compression["selection"] == "knapsack"
