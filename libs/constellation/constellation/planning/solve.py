"""Cost-minimal query plans under the per-label surrogate bound.

Problem (see :mod:`constellation.planning.surrogate`): minimise ``sum_m c_m n_m`` over integer counts
``0 <= n_m <= cap_m`` subject to ``g_theta(n) = sum_{theta'} exp(-E_{theta theta'}(n)) <= alpha_theta``
for every label, where ``E_pair(n) = sum_m n_m w_m,pair`` and ``w = -log rho >= 0``. ``cap_m = 1`` is the
one-call-per-model case (the recorded pools hold one answer per model and prompt); larger caps plan
repeated samples of live models.

Two solvers:

* :func:`solve_exact` - depth-first branch and bound over the counts. A node fixes ``n_1..n_i``; it is
  pruned when even ``n_m = cap_m`` for every later model is infeasible (each ``g_theta`` is decreasing),
  or when its lower bound reaches the incumbent. The lower bound is ``cost so far + max over pairs of
  (missing exponent) x (cheapest cost per unit of that pair's exponent among later models)``, where a
  pair's needed exponent is ``log(1 / min(alpha_i, alpha_j))`` (each term alone must fit). With
  ``eps > 0`` nodes are pruned once ``(1 + eps) x bound >= incumbent``, so the result costs at most
  ``(1 + eps)`` times the surrogate optimum; ``eps = 0`` is exact. A node budget turns it into an
  anytime search (``optimal=False`` in the result).
* :func:`solve_grid` - dynamic programming over the discretised constraint space. Every weight is
  rounded *down* to a multiple of ``delta`` and every pair exponent is capped at a saturation level
  ``L delta``; both only raise the evaluated ``g``, so a plan the DP accepts is surrogate-feasible for
  the real weights. States are the integer exponent vectors (one entry per label pair), each keeping
  its cheapest plan; models are added one at a time. Guarantee: with ``N`` the most calls any plan
  cheaper than the greedy incumbent can make, ``delta = eps log(1/alpha_max) / N`` and ``L delta >=
  log((K-1) / (eps alpha_min))``, the returned plan costs at most ``OPT(alpha^(1+eps) (1-eps))``, the
  surrogate optimum at the tightened tolerances. Since scaling a plan by ``t`` raises each ``g`` to at
  most its ``t``-th power, this is a ``(1 + O(eps))`` factor of ``OPT(alpha)`` as alphas shrink, up to
  rounding counts to integers (asymptotic, and only where caps do not bind). The state count is at
  most ``(L + 1)^P`` (``P = K(K-1)/2`` pairs): small for two or three labels, large for four; a state
  budget guards it.

Both return None when even every model at its cap cannot meet the bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from constellation.planning.surrogate import PairTable


@dataclass(frozen=True)
class SolveResult:
    """Counts found by a solver, with how they were found."""

    counts: tuple[int, ...]
    cost: float
    optimal: bool
    nodes: int
    seconds: float
    complete: bool = True
    """False when the search stopped at its node budget (then no gap is guaranteed)."""


@dataclass(frozen=True)
class Problem:
    """One planning instance in solver form."""

    table: PairTable
    costs: np.ndarray
    alpha: np.ndarray
    caps: np.ndarray

    @classmethod
    def build(
        cls,
        table: PairTable,
        costs: Sequence[float] | np.ndarray,
        alpha: Sequence[float] | np.ndarray,
        caps: Sequence[int] | np.ndarray,
    ) -> Problem:
        """A problem from plain sequences (converted to arrays)."""
        return cls(table, np.asarray(costs, float), np.asarray(alpha, float), np.asarray(caps, int))

    def bounds(self, exponents: np.ndarray) -> np.ndarray:
        """``g_theta`` per label from pair exponents (length P)."""
        return self.table.incidence() @ np.exp(-exponents)

    def feasible(self, exponents: np.ndarray) -> bool:
        return bool((self.bounds(exponents) <= self.alpha * (1 + 1e-12)).all())

    def pair_need(self) -> np.ndarray:
        """Per pair, the exponent it needs at least: ``log(1 / min(alpha_i, alpha_j))``."""
        return np.array([math.log(1.0 / min(self.alpha[i], self.alpha[j])) for i, j in self.table.pairs])


def greedy(problem: Problem) -> tuple[int, ...] | None:
    """A feasible plan by repeatedly adding the call with the largest drop of total log-excess per cost."""
    weights = problem.table.weights
    counts = np.zeros(len(problem.costs), int)
    exponents = np.zeros(weights.shape[1])

    def excess(e: np.ndarray) -> float:
        return float(np.maximum(np.log(problem.bounds(e) / problem.alpha), 0.0).sum())

    if not problem.feasible(problem.caps @ weights):
        return None
    while not problem.feasible(exponents):
        current = excess(exponents)
        best, best_gain = -1, -1.0
        for m in np.flatnonzero(counts < problem.caps):
            gain = (current - excess(exponents + weights[m])) / max(problem.costs[m], 1e-300)
            if gain > best_gain:
                best, best_gain = int(m), gain
        counts[best] += 1
        exponents = exponents + weights[best]
    return tuple(int(c) for c in counts)


class _Search:
    """State of one branch-and-bound run (models visited in ``order``)."""

    def __init__(self, problem: Problem, eps: float, max_nodes: int) -> None:
        self.p = problem
        self.eps = eps
        self.max_nodes = max_nodes
        weights = problem.table.weights
        ratio = np.where(weights > 0, problem.costs[:, None] / np.maximum(weights, 1e-300), np.inf)
        self.order = np.argsort(ratio.min(axis=1), kind="stable")
        self.w = weights[self.order]
        self.c = problem.costs[self.order]
        self.cap = problem.caps[self.order]
        m = len(self.order)
        self.suffix_max = np.zeros((m + 1, self.w.shape[1]))
        self.suffix_ratio = np.full((m + 1, self.w.shape[1]), np.inf)
        for i in range(m - 1, -1, -1):
            self.suffix_max[i] = self.suffix_max[i + 1] + self.cap[i] * self.w[i]
            self.suffix_ratio[i] = np.minimum(self.suffix_ratio[i + 1], ratio[self.order[i]])
        self.need = problem.pair_need()
        self.nodes = 0
        self.best_cost = math.inf
        self.best: np.ndarray | None = None
        self.complete = True

    def lower_bound(self, i: int, cost: float, exponents: np.ndarray) -> float:
        missing = np.maximum(self.need - exponents, 0.0)
        with np.errstate(invalid="ignore"):
            extra = np.where(missing > 0, missing * self.suffix_ratio[i], 0.0)
        return cost + float(extra.max(initial=0.0))

    def visit(self, i: int, cost: float, exponents: np.ndarray, counts: np.ndarray) -> None:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            self.complete = False
            return
        if self.p.feasible(exponents):
            if cost < self.best_cost:
                self.best_cost, self.best = cost, counts.copy()
            return
        if i == len(self.order) or not self.p.feasible(exponents + self.suffix_max[i]):
            return
        if self.lower_bound(i, cost, exponents) * (1.0 + self.eps) >= self.best_cost:
            return
        for k in range(int(self.cap[i]), -1, -1):
            counts[i] = k
            self.visit(i + 1, cost + k * self.c[i], exponents + k * self.w[i], counts)
        counts[i] = 0


def solve_exact(problem: Problem, *, eps: float = 0.0, max_nodes: int = 2_000_000) -> SolveResult | None:
    """Branch and bound (see the module docstring); ``optimal`` is False when ``max_nodes`` ran out."""
    started = time.perf_counter()
    search = _Search(problem, eps, max_nodes)
    incumbent = greedy(problem)
    if incumbent is None:
        return None
    search.best = np.asarray(incumbent)[search.order]
    search.best_cost = float(np.dot(incumbent, problem.costs))
    m = len(search.order)
    search.visit(0, 0.0, np.zeros(search.w.shape[1]), np.zeros(m, int))
    counts = np.zeros(m, int)
    counts[search.order] = search.best
    return SolveResult(
        tuple(int(c) for c in counts),
        float(np.dot(counts, problem.costs)),
        search.complete and eps == 0.0,
        search.nodes,
        time.perf_counter() - started,
        search.complete,
    )


class StateBudgetExceeded(RuntimeError):
    """The grid DP would keep more states than its budget allows (raise eps or use the search)."""


def _grid_levels(problem: Problem, eps: float, incumbent_cost: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Integer weights (rounded down) and per-pair saturation levels for :func:`solve_grid`."""
    positive = problem.costs[problem.costs > 0]
    most_calls = int(problem.caps.sum())
    if positive.size == len(problem.costs):
        most_calls = min(most_calls, int(incumbent_cost / positive.min() + 1e-9))
    most_calls = max(most_calls, 1)
    delta = eps * math.log(1.0 / problem.alpha.max()) / most_calls
    k = len(problem.table.labels)
    saturation = math.log(max(k - 1, 1) / (eps * problem.alpha.min()))
    levels = np.floor(problem.table.weights / delta).astype(np.int64)
    cap_level = np.full(len(problem.table.pairs), math.ceil(saturation / delta), dtype=np.int64)
    return levels, cap_level, delta


def solve_grid(problem: Problem, *, eps: float = 0.1, max_states: int = 2_000_000) -> SolveResult | None:
    """The grid DP (see the module docstring). Raises :class:`StateBudgetExceeded` past ``max_states``."""
    started = time.perf_counter()
    incumbent = greedy(problem)
    if incumbent is None:
        return None
    incumbent_cost = float(np.dot(incumbent, problem.costs))
    levels, cap_level, delta = _grid_levels(problem, eps, incumbent_cost)
    layers: list[dict[tuple[int, ...], tuple[float, tuple[int, ...] | None, int]]] = []
    current: dict[tuple[int, ...], tuple[float, tuple[int, ...] | None, int]] = {
        tuple(0 for _ in cap_level): (0.0, None, 0)
    }
    suffix = np.zeros((len(problem.costs) + 1, len(cap_level)))
    for m in range(len(problem.costs) - 1, -1, -1):
        suffix[m] = suffix[m + 1] + problem.caps[m] * problem.table.weights[m]
    for m in range(len(problem.costs)):
        nxt: dict[tuple[int, ...], tuple[float, tuple[int, ...] | None, int]] = {}
        for state, (cost, _, _) in current.items():
            for k in range(int(problem.caps[m]) + 1):
                new_cost = cost + k * problem.costs[m]
                if new_cost > incumbent_cost * (1 + 1e-12):
                    break
                new = tuple(np.minimum(np.asarray(state) + k * levels[m], cap_level).tolist())
                if not problem.feasible(np.asarray(new) * delta + suffix[m + 1]):
                    continue
                if new not in nxt or new_cost < nxt[new][0]:
                    nxt[new] = (new_cost, state, k)
        if len(nxt) > max_states:
            raise StateBudgetExceeded(f"{len(nxt)} states after model {m + 1}; budget {max_states}")
        layers.append(nxt)
        current = nxt
    return _grid_result(problem, layers, delta, incumbent, started)


def _grid_result(
    problem: Problem,
    layers: list[dict[tuple[int, ...], tuple[float, tuple[int, ...] | None, int]]],
    delta: float,
    incumbent: tuple[int, ...],
    started: float,
) -> SolveResult:
    final = layers[-1] if layers else {}
    feasible = [(v[0], s) for s, v in final.items() if problem.feasible(np.asarray(s) * delta)]
    states = sum(len(layer) for layer in layers)
    if not feasible:
        cost = float(np.dot(incumbent, problem.costs))
        return SolveResult(incumbent, cost, False, states, time.perf_counter() - started)
    cost, state = min(feasible)
    counts = [0] * len(layers)
    for m in range(len(layers) - 1, -1, -1):
        _, previous, k = layers[m][state]
        counts[m] = k
        state = previous  # type: ignore[assignment]
    greedy_cost = float(np.dot(incumbent, problem.costs))
    if greedy_cost < cost:
        return SolveResult(incumbent, greedy_cost, False, states, time.perf_counter() - started)
    return SolveResult(tuple(counts), float(cost), False, states, time.perf_counter() - started)
