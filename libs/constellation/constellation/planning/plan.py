"""The planner's public face: confusion matrices, costs and error bounds in, a :class:`QueryPlan` out.

``Planner().plan(matrices, costs, alpha)`` picks the cheapest plan whose surrogate bound (see
:mod:`constellation.planning.surrogate`) is at most ``alpha_theta`` for every label ``theta``. Small
instances are solved exactly (branch and bound); larger ones by the grid DP when its state space fits,
else by branch and bound with a ``(1 + eps)`` pruning gap. Pure computation, no I/O: safe to call from
any thread; a dispatch strategy should run it in an executor (milliseconds to seconds, see the
``planner`` benchmark) and cache the plan per (task, alpha, pool version).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from constellation.errors import InvalidArgument
from constellation.planning.confusion import ConfusionMatrix, check_aligned
from constellation.planning.solve import Problem, SolveResult, StateBudgetExceeded, solve_exact, solve_grid
from constellation.planning.surrogate import chernoff_bounds, label_bounds, pair_table

Method = Literal["auto", "exact", "grid", "search"]


@dataclass(frozen=True)
class QueryPlan:
    """Which models to ask and how often, with what that certifies.

    Attributes:
        members: Models asked at least once, in the order of the input.
        counts: Calls per member (same order as ``members``).
        bound_per_label: The certified error bound per true label: the Chernoff bound with ``s``
            optimised per pair (at most the surrogate at ``s = 1/2`` that the plan was chosen on). Valid
            under the assumptions of :mod:`constellation.planning.surrogate`.
        surrogate_per_label: The ``s = 1/2`` surrogate the solver constrained.
        alpha: The requested bound per label.
        cost: ``sum counts x cost`` in the units of the costs given (USD per call for recorded pools).
        method: Which solver produced it; ``optimal`` is True only for a completed exact search.
    """

    members: tuple[str, ...]
    counts: tuple[int, ...]
    bound_per_label: dict[str, float]
    surrogate_per_label: dict[str, float]
    alpha: dict[str, float]
    cost: float
    method: str
    optimal: bool
    solve_seconds: float

    def calls(self) -> list[str]:
        """Every call of the plan, a member repeated ``count`` times (the order to launch them in)."""
        return [m for m, n in zip(self.members, self.counts, strict=True) for _ in range(n)]


class InfeasiblePlan(InvalidArgument):
    """No plan within the caps meets the bound (even every model at its cap)."""


def _alpha_vector(alpha: float | Mapping[str, float], labels: Sequence[str]) -> np.ndarray:
    values = [alpha.get(label, math.nan) for label in labels] if isinstance(alpha, Mapping) else [alpha] * len(labels)
    vector = np.asarray(values, float)
    if not ((vector > 0) & (vector < 1)).all():
        raise InvalidArgument(f"alpha must lie in (0, 1) for every label {tuple(labels)}, got {alpha}")
    return vector


class Planner:
    """Chooses cost-minimal plans; stateless apart from its settings."""

    def __init__(
        self,
        *,
        eps: float = 0.05,
        exact_max_models: int = 16,
        max_states: int = 300_000,
        pessimistic_level: float | None = None,
    ) -> None:
        """Settings.

        Args:
            eps: Approximation parameter of the large-instance solvers.
            exact_max_models: Up to this many models (with cap 1; fewer with larger caps) ``auto`` uses
                the exact search.
            max_states: State budget of the grid DP before ``auto`` falls back to the eps-search.
            pessimistic_level: Plan on this posterior quantile of every ``rho`` (None: posterior mean).
        """
        self.eps = eps
        self.exact_max_models = exact_max_models
        self.max_states = max_states
        self.pessimistic_level = pessimistic_level

    def plan(
        self,
        matrices: Mapping[str, ConfusionMatrix],
        costs: Mapping[str, float],
        alpha: float | Mapping[str, float],
        *,
        cap: int | Mapping[str, int] = 1,
        method: Method = "auto",
    ) -> QueryPlan:
        """The cheapest plan (per ``method``) meeting ``alpha`` for every label.

        Raises:
            InvalidArgument: bad alpha, a model without a cost (or a negative one), or misaligned matrices.
            InfeasiblePlan: no plan within the caps meets the bound.
        """
        labels = check_aligned(matrices)
        models = list(matrices)
        missing = [m for m in models if m not in costs]
        if missing or any(costs[m] < 0 for m in models):
            raise InvalidArgument(f"every model needs a cost >= 0; missing: {missing}")
        caps = [cap.get(m, 1) if isinstance(cap, Mapping) else cap for m in models]
        table = pair_table([matrices[m] for m in models], level=self.pessimistic_level)
        problem = Problem.build(table, [costs[m] for m in models], _alpha_vector(alpha, labels), caps)
        result, used = self._choose(problem, method)
        if result is None:
            raise InfeasiblePlan(f"no plan within the caps meets alpha={alpha}")
        return self._plan_of(models, matrices, problem, result, used)

    def _choose(self, problem: Problem, method: Method) -> tuple[SolveResult | None, str]:
        size = float(np.sum(np.log2(problem.caps + 1)))
        if method == "exact" or (method == "auto" and size <= self.exact_max_models):
            return solve_exact(problem), "exact"
        if method == "search":
            return solve_exact(problem, eps=self.eps), "search"
        try:
            return solve_grid(problem, eps=self.eps, max_states=self.max_states), "grid"
        except StateBudgetExceeded:
            if method == "grid":
                raise
            return solve_exact(problem, eps=self.eps), "search"

    def _plan_of(
        self,
        models: list[str],
        matrices: Mapping[str, ConfusionMatrix],
        problem: Problem,
        result: SolveResult,
        method: str,
    ) -> QueryPlan:
        labels = problem.table.labels
        chosen = [(m, n) for m, n in zip(models, result.counts, strict=True) if n > 0]
        surrogate = label_bounds(problem.table, result.counts)
        certified = chernoff_bounds([matrices[m] for m in models], result.counts)
        if self.pessimistic_level is not None:
            certified = surrogate  # the s-optimised bound is on the point estimate; keep the pessimistic one
        return QueryPlan(
            members=tuple(m for m, _ in chosen),
            counts=tuple(n for _, n in chosen),
            bound_per_label={
                label: float(b) for label, b in zip(labels, np.minimum(certified, surrogate), strict=True)
            },
            surrogate_per_label={label: float(b) for label, b in zip(labels, surrogate, strict=True)},
            alpha={label: float(a) for label, a in zip(labels, problem.alpha, strict=True)},
            cost=result.cost,
            method=method,
            optimal=result.optimal,
            solve_seconds=result.seconds,
        )
