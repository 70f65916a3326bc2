"""The ε rank rules (issue 11): the paper's ``energy`` and ``centred`` (the leading component kept, ε of the energy
beyond it), in numpy (static ranks) and at run time in the converted graph, and ``--eps-rule`` into the bundle."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from converter.cli import main
from converter.compression.hosvd import hosvd, max_ranks
from converter.compression.ranks import EpsRule, eps_mask, mode_basis, mode_spectrum, rank_from_energy, unfolding
from converter.compression.subspace import start_matrix
from hosvd_contract import Manifest, load_manifest
from tests.converter.builtin import run_builtin
from tests.converter.fidelity import BATCH, digits, pretrained
from tests.converter.test_convert import small_cnn

DOMINANT = np.array([8.0, 1.0, 0.5, 0.3, 0.2])  # the first component holds 80 % of the energy, as a batch mean does


def reference_rank(sigma2: np.ndarray, eps: float, rule: str) -> int:
    """The rules written out as a loop: the smallest k (≥ 1) whose first k components (beyond the first for
    ``centred``) hold ε of all the energy (of the energy beyond the first)."""
    s = np.sort(np.asarray(sigma2, np.float64))[::-1]
    lead = 1 if rule == "centred" else 0
    target = eps * (s.sum() - s[:lead].sum())
    k = max(lead, 1)
    while k < len(s) and s[lead:k].sum() < target - 1e-12 * s.sum():
        k += 1
    return k


@pytest.mark.parametrize(("eps", "energy", "centred"), [(0.5, 1, 2), (0.8, 1, 4), (0.9, 2, 4), (0.95, 3, 5),
                                                        (1.0, 5, 5)])
def test_rules_on_a_dominant_first_component(eps, energy, centred):
    """ε 0.8 of all the energy is the first component alone; ε 0.8 of the 2.0 beyond it needs 1 + 0.5 + 0.3."""
    assert rank_from_energy(DOMINANT, eps) == rank_from_energy(DOMINANT, eps, EpsRule.ENERGY) == energy
    assert rank_from_energy(DOMINANT, eps, EpsRule.CENTRED) == centred
    assert reference_rank(DOMINANT, eps, "energy") == energy and reference_rank(DOMINANT, eps, "centred") == centred


def test_degenerate_spectra():
    for rule in EpsRule:
        assert rank_from_energy(np.array([3.0]), 0.8, rule) == 1
        assert rank_from_energy(np.array([3.0, 0.0, 0.0]), 0.8, rule) == 1  # nothing beyond the first component
        assert rank_from_energy(np.zeros(4), 0.8, rule) == 1


@pytest.mark.parametrize("rule", list(EpsRule))
def test_run_time_rule_is_the_numpy_rule(rule):
    """``eps_mask`` on sorted quotients with ``total`` = their sum picks numpy's k and masks the rest; with a
    larger ``total`` (energy beyond a capped static rank) it keeps more, as the full spectrum would."""
    rng = np.random.default_rng(0)
    spectra = [DOMINANT, np.ones(6), *(np.sort(rng.gamma(0.5, size=12))[::-1] for _ in range(20))]
    spectra += [np.concatenate([[20.0 * s.sum()], s]) for s in spectra[2:6]]  # a dominant mean on top
    for lam in spectra:
        for eps in (0.3, 0.5, 0.8, 0.9, 0.95, 1.0):
            mask, k = eps_mask(tf.constant(lam, tf.float32), tf.constant(lam.sum(), tf.float32), eps, rule)
            expected = rank_from_energy(lam, eps, rule)
            assert int(k) == expected == reference_rank(lam, eps, rule.value), (lam, eps)
            assert mask.numpy().tolist() == [1.0] * expected + [0.0] * (len(lam) - expected)
    _, capped = eps_mask(tf.constant(DOMINANT[:3], tf.float32), tf.constant(DOMINANT.sum(), tf.float32), 0.8,
                         EpsRule.CENTRED)
    assert int(capped) == 3  # λ2 + λ3 = 1.5 < 0.8 · (10 − 8): all three static columns


@functools.cache
def conv_b_input() -> np.ndarray:
    """A real post-ReLU activation: the input of ``conv_b`` of a small CNN pre-trained on digits, for one train
    batch of held-out digits (32, 8, 8, 16)."""
    h = tf.constant(digits("2d")[0][1200:1200 + BATCH])
    for layer in pretrained("2d").layers:
        if layer.name == "conv_b":
            return h.numpy()
        h = layer(h)
    raise AssertionError("the model has no conv_b")


def test_calibration_spectra_and_bases_are_the_exact_svds():
    """The Gram-matrix shortcut in ``mode_spectrum``/``mode_basis`` gives the SVD's squared singular values and
    the span of its leading left singular vectors, on a real activation (every mode, every ε-rank it yields)."""
    x = conv_b_input()
    for mode in range(4):
        u, s, _ = np.linalg.svd(unfolding(x, mode), full_matrices=False)
        spectrum = mode_spectrum(x, mode)
        assert spectrum.shape == s.shape and np.all(np.diff(spectrum) <= 0)
        np.testing.assert_allclose(spectrum, s ** 2, rtol=1e-7, atol=1e-9 * s[0] ** 2)
        for eps in (0.5, 0.8, 0.9):
            rank = rank_from_energy(spectrum, eps)
            assert rank == rank_from_energy(s ** 2, eps)
            basis = mode_basis(x, mode, rank).astype(np.float64)
            assert basis.shape == (x.shape[mode], rank)
            np.testing.assert_allclose(basis.T @ basis, np.eye(rank), atol=1e-5)
            if rank < len(s) and s[rank - 1] > 1.01 * s[rank]:  # a well-separated subspace is unique
                np.testing.assert_allclose(basis @ basis.T, u[:, :rank] @ u[:, :rank].T, atol=1e-4)


def test_converted_graph_ranks_follow_the_centred_rule_on_real_activations():
    """``hosvd`` converted with builtin ops and run on ai-edge-litert: its effective ranks on a real post-ReLU
    batch are the exact SVD's ε-ranks under each rule (converged iteration), and centred keeps more in every mode."""
    x = conv_b_input()
    assert x.min() >= 0 and x.shape == (BATCH, 8, 8, 16)
    ranks = max_ranks(x.shape, 32, (0, 1, 2, 3))
    starts = [start_matrix(x.shape[m], r, seed=m) for m, r in enumerate(ranks)]

    def run_time_ranks(rule: EpsRule) -> list[int]:
        @tf.function(input_signature=[tf.TensorSpec(x.shape, tf.float32)], autograph=False)
        def decompose(t):
            return {"ranks": hosvd(t, 0.8, starts, 12, rule=rule)[1]}

        return run_builtin(decompose, x)[0].tolist()

    spectra = [np.linalg.svd(unfolding(x, m), compute_uv=False) ** 2 for m in range(4)]
    mean_share = np.linalg.norm(x.mean(0)) ** 2 * BATCH / np.linalg.norm(x) ** 2
    assert mean_share > 0.6  # the batch mean dominates, as in the benchmark's conv3 (docs/bench.md)
    energy, centred = run_time_ranks(EpsRule.ENERGY), run_time_ranks(EpsRule.CENTRED)
    assert energy == [reference_rank(s, 0.8, "energy") for s in spectra] == [3, 2, 3, 2]
    assert centred == [reference_rank(s, 0.8, "centred") for s in spectra] == [6, 4, 4, 3]


def test_cli_eps_rule_reaches_the_manifest_and_the_static_ranks(tmp_path):
    """``--eps-rule centred`` is recorded in the manifest, and the calibrated ranks of the compressed layer (c2,
    whose input is c1's ReLU output) are the centred rule's on the calibration activations (modes H, W, C pooled
    over all samples, the batch mode the largest over whole batches); the default stays the paper's rule."""
    model = small_cnn()
    model.save(tmp_path / "model.keras")
    calib = np.random.default_rng(1).random((16, 8, 8, 1), dtype=np.float32)
    np.savez(tmp_path / "calib.npz", x=calib)
    saved_input = keras.Model(model.input, model.get_layer("c2").input)(calib).numpy()
    manifests = {}
    for rule in ("energy", "centred", None):
        out = tmp_path / str(rule)
        flag = [] if rule is None else ["--eps-rule", rule]
        assert main(["convert", str(tmp_path / "model.keras"), "--out", str(out), "--train-last", "2",
                     "--compression", "hosvd", "--batch-size", "8", "--no-measure",
                     "--calibration-data", str(tmp_path / "calib.npz"), *flag]) == 0
        manifests[rule] = load_manifest(out)
    for rule in ("energy", "centred"):
        manifest = manifests[rule]
        assert manifest.compression["eps_rule"] == manifest.eps_rule == rule
        c2 = next(i for i in manifest.layers if i.name == "c2")
        batch_rank = max(reference_rank(np.linalg.svd(unfolding(b, 0), compute_uv=False) ** 2, 0.8, rule)
                         for b in (saved_input[:8], saved_input[8:]))
        pooled = [reference_rank(np.linalg.svd(unfolding(saved_input, m), compute_uv=False) ** 2, 0.8, rule)
                  for m in (1, 2, 3)]
        assert c2.calibrated_ranks == [batch_rank, *pooled], rule
    assert manifests[None].eps_rule == "energy"
    assert manifests[None].layers == manifests["energy"].layers
    energy, centred = (next(i for i in manifests[r].layers if i.name == "c2") for r in ("energy", "centred"))
    assert energy.calibrated_ranks == [3, 4, 3, 2] and centred.calibrated_ranks == [6, 7, 6, 3]
    assert centred.saved_bytes_compressed > energy.saved_bytes_compressed

    older = manifests["centred"].to_dict()
    del older["compression"]["eps_rule"]  # a bundle converted before the field existed
    assert Manifest.from_dict(older).eps_rule == "energy"


def test_an_unknown_rule_is_refused_listing_the_rules(tmp_path):
    from converter.convert import convert
    from converter.errors import ConversionError

    with pytest.raises(ConversionError, match="unknown ε rule 'centered'; choose one of: energy, centred"):
        convert(small_cnn(), tmp_path, train_last=2, eps_rule="centered", measure_memory=False)
