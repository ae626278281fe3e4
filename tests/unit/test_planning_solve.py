"""Solvers: exact search equals brute force on the surrogate; the grid DP is feasible and within its guarantee."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from constellation.errors import InvalidArgument
from constellation.planning.plan import InfeasiblePlan, Planner
from constellation.planning.solve import Problem, solve_exact, solve_grid
from constellation.planning.surrogate import label_bounds, pair_table
from tests.unit.test_planning_surrogate import random_matrices


def brute_force(problem: Problem) -> float:
    best = np.inf
    for counts in itertools.product(*(range(c + 1) for c in problem.caps)):
        if (label_bounds(problem.table, counts) <= problem.alpha * (1 + 1e-12)).all():
            best = min(best, float(np.dot(counts, problem.costs)))
    return best


def instance(seed: int, labels: str, models: int, cap: int, alpha: float) -> Problem:
    rng = np.random.default_rng(seed)
    table = pair_table(random_matrices(rng, models, labels))
    return Problem.build(table, rng.uniform(0.1, 5.0, size=models), [alpha] * len(labels), [cap] * models)


@pytest.mark.parametrize(("labels", "cap"), [("AB", 1), ("ABC", 2), ("ABCD", 1)])
def test_exact_search_matches_brute_force_and_grid_stays_feasible(labels: str, cap: int) -> None:
    for seed in range(8):
        problem = instance(seed, labels, 6, cap, alpha=0.1)
        optimum = brute_force(problem)
        exact = solve_exact(problem)
        if not np.isfinite(optimum):
            assert exact is None
            continue
        assert exact is not None and exact.optimal
        assert exact.cost == pytest.approx(optimum)
        grid = solve_grid(problem, eps=0.1)
        assert grid is not None
        assert (label_bounds(problem.table, grid.counts) <= problem.alpha * (1 + 1e-9)).all()
        tightened = Problem(problem.table, problem.costs, problem.alpha**1.1 * 0.9, problem.caps)
        assert grid.cost <= brute_force(tightened) + 1e-9
        approx = solve_exact(problem, eps=0.2)
        assert approx is not None and approx.cost <= 1.2 * optimum + 1e-9


def test_planner_returns_a_plan_with_certified_bounds_and_rejects_impossible_alpha() -> None:
    matrices = {m.model: m for m in random_matrices(np.random.default_rng(1), 5, "ABC")}
    costs = {name: float(i + 1) for i, name in enumerate(matrices)}
    plan = Planner().plan(matrices, costs, 0.2, cap=3)
    assert plan.optimal and plan.method == "exact"
    assert all(plan.bound_per_label[label] <= 0.2 for label in "ABC")
    assert plan.cost == pytest.approx(sum(costs[m] * n for m, n in zip(plan.members, plan.counts, strict=True)))
    assert len(plan.calls()) == sum(plan.counts)
    with pytest.raises(InfeasiblePlan):
        Planner().plan(matrices, costs, 1e-30, cap=1)


def test_a_pessimistic_plan_costs_at_least_the_point_estimate_plan_and_bad_input_is_rejected() -> None:
    matrices = {m.model: m for m in random_matrices(np.random.default_rng(4), 5, "AB")}
    costs = {name: float(i + 1) for i, name in enumerate(matrices)}
    point = Planner().plan(matrices, costs, 0.1, cap=2)
    careful = Planner(pessimistic_level=0.9).plan(matrices, costs, 0.1, cap=2)
    assert careful.cost >= point.cost
    assert all(careful.surrogate_per_label[label] <= 0.1 for label in "AB")
    with pytest.raises(InvalidArgument):
        Planner().plan(matrices, {**costs, "m0": -1.0}, 0.1)
    with pytest.raises(InvalidArgument):
        Planner().plan(matrices, costs, {"A": 0.1})
