"""``asi``: fixed ranks from a memory budget, one warm-started subspace-iteration step per batch.

After the follow-up paper (ASI, ICML 2025): the ranks are chosen once, at conversion, from calibration data and
a budget for the saved activations (per layer the ε whose measured gradient error is least under the budget, a
knapsack over layers); the bases live in the bundle's state variable (``compression:state`` in ``get_weights``,
:mod:`converter.compression.state`) and each training step refines them with a single multiplication by the
Gram matrix and a Gram–Schmidt pass, so no ε test or sorting runs on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from converter import ops
from converter.compression.factored import Factored, project, tucker_elements
from converter.compression.ranks import EpsRule, mode_spectrum, rank_from_energy
from converter.compression.state import PackedState, StateStep
from converter.compression.subspace import WarmBases, orthonormalize

log = logging.getLogger(__name__)


def ranks_at(spectra: list[np.ndarray | None], eps: float, max_rank: int,
             rule: EpsRule = EpsRule.ENERGY) -> list[int | None]:
    """Per-mode ε-rank under ``rule`` capped at ``max_rank``; ``None`` spectra (whole modes) stay ``None``."""
    return [None if s is None else min(rank_from_energy(s, eps, rule), max_rank) for s in spectra]


EPS_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98)
"""Candidate ε per layer for the budget knapsack (those below the requested ε, and the requested ε itself)."""


@dataclass(frozen=True)
class AsiPlan:
    """The fixed ranks per layer, the ε each layer's ranks come from, their measured gradient error (None when
    not measured) and how they were chosen: ``eps`` (the requested ε fits), ``knapsack`` or ``uniform`` (one ε
    lowered until it fits, when no error could be measured)."""

    ranks: list[list[int | None]]
    epsilons: list[float]
    errors: list[float | None]
    selection: str


def knapsack(options: list[list[tuple[int, float]]], budget: int) -> list[int] | None:
    """Exact multiple-choice knapsack: one ``(bytes, error)`` option per layer, the least summed error whose
    summed bytes fit ``budget``. Dynamic programming over the Pareto frontier of (bytes, error) of the layers
    so far (a state cheaper and no worse than another removes it), so no budget discretisation is needed.

    Returns:
        the chosen option index per layer, or None when nothing fits.
    """
    frontier: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for layer_options in options:
        merged = sorted((b + ob, e + oe, (*picks, i)) for b, e, picks in frontier
                        for i, (ob, oe) in enumerate(layer_options) if b + ob <= budget)
        frontier = []
        for state in merged:  # by bytes: keep a state only if it beats every cheaper one
            if not frontier or state[1] < frontier[-1][1]:
                frontier.append(state)
    return list(frontier[-1][2]) if frontier else None


def choose_ranks(activations: list[np.ndarray], eps: float, budget_bytes: int | None, max_rank: int,
                 gradient_errors: Callable[[list[list[int | None]]], list[float]] | None = None,
                 rule: EpsRule = EpsRule.ENERGY) -> AsiPlan:
    """Fixed ranks for every compressed layer.

    Without a budget (or when the requested ε fits it) each mode gets its ε-rank on the calibration activations.
    Otherwise, as the follow-up paper does, each layer takes the candidate ε (:data:`EPS_GRID` below the requested
    one, plus the single ε lowered by bisection until all layers fit) whose ranks minimise the summed measured
    gradient error under the budget: an exact knapsack over layers. The single-ε plan is one of the choices, so
    the knapsack's summed error is never larger than it.

    Args:
        activations: per layer, a calibration batch of its saved input (B, H, W, C).
        eps: the requested energy share.
        budget_bytes: total bytes allowed for the saved activations of all compressed layers, or None.
        max_rank: static cap per mode.
        gradient_errors: ranks per layer -> the relative weight-gradient error of each layer with its saved input
            truncated to those ranks, measured on calibration data; without it a budget lowers one ε.
        rule: the ε rule every candidate ε is applied with (:class:`~converter.compression.ranks.EpsRule`).

    Raises:
        ValueError: the budget is below what rank 1 in every mode needs.
    """
    spectra = [[mode_spectrum(a, m) if a.shape[m] > 1 else None for m in range(4)] for a in activations]
    sizes = [a.shape for a in activations]

    def plan_at(e: float) -> list[list[int | None]]:
        return [ranks_at(s, e, max_rank, rule) for s in spectra]

    def layer_bytes(ranks: list[list[int | None]]) -> list[int]:
        return [4 * tucker_elements(shape, tuple(r)) for shape, r in zip(sizes, ranks, strict=True)]

    def measured(ranks: list[list[int | None]]) -> list[float | None]:
        return list(gradient_errors(ranks)) if gradient_errors else [None] * len(ranks)

    if budget_bytes is None or sum(layer_bytes(plan_at(eps))) <= budget_bytes:
        ranks = plan_at(eps)
        return AsiPlan(ranks, [eps] * len(ranks), measured(ranks), "eps")
    if sum(layer_bytes(plan_at(0.0))) > budget_bytes:
        raise ValueError(f"--ram-budget-mb {budget_bytes / 2**20:.3f} is below the smallest asi plan "
                         f"(rank 1 everywhere needs {sum(layer_bytes(plan_at(0.0))) / 2**20:.3f} MiB)")
    lo, hi = 0.0, eps
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(layer_bytes(plan_at(mid))) <= budget_bytes else (lo, mid)
    log.info("asi: one ε for all layers would be lowered from %.3f to %.3f to fit %.2f MiB", eps, lo,
             budget_bytes / 2**20)
    if gradient_errors is None:
        ranks = plan_at(lo)
        return AsiPlan(ranks, [lo] * len(ranks), [None] * len(ranks), "uniform")
    candidates = sorted({e for e in EPS_GRID if e < eps} | {eps, lo})
    plans = [plan_at(e) for e in candidates]
    table = [(layer_bytes(p), measured(p)) for p in plans]
    options = [[(table[c][0][layer], table[c][1][layer]) for c in range(len(candidates))]
               for layer in range(len(activations))]
    picks = knapsack(options, budget_bytes)
    assert picks is not None, "the single-ε plan fits, so the knapsack has a solution"
    return AsiPlan([plans[c][layer] for layer, c in enumerate(picks)], [candidates[c] for c in picks],
                   [table[c][1][layer] for layer, c in enumerate(picks)], "knapsack")


class Asi:
    """Per-layer ASI state: fixed ranks and warm-start bases (slots of ``state``)."""

    method = "asi"

    def __init__(self, shape: tuple[int, ...], ranks: list[int | None], calibration: np.ndarray | None,
                 name: str, layer: str = "", state: PackedState | None = None):
        self.shape = shape
        self.ranks = ranks
        self.warm = WarmBases(shape, ranks, name, PackedState() if state is None else state, layer, calibration)

    def compress(self, x: tf.Tensor, step: StateStep | None = None) -> Factored:
        """The saved form of ``x``; the refined bases go to ``step``."""
        factors: list[tf.Tensor | None] = [None] * len(self.shape)
        for mode in self.warm.modes:
            factors[mode] = orthonormalize(ops.gram_times(x, mode, self.warm.start(mode, step)))
            self.warm.update(mode, factors[mode], step, read_later=True)  # also the saved factor
        return project(x, tuple(factors))

    def saved_elements(self, ranks: list[int | None] | None = None) -> int:
        return tucker_elements(self.shape, tuple(self.ranks if ranks is None else ranks))
