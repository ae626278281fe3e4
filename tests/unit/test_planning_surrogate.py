"""The surrogate bound: Bhattacharyya coefficients, and that it really bounds the exact vote error."""

from __future__ import annotations

import numpy as np

from constellation.planning.confusion import ConfusionMatrix
from constellation.planning.decision import LikelihoodVote, exact_error, exact_error_counts
from constellation.planning.surrogate import bhattacharyya, chernoff_bounds, label_bounds, pair_table


def random_matrices(rng: np.random.Generator, models: int, labels: str) -> list[ConfusionMatrix]:
    k = len(labels)
    out = []
    for m in range(models):
        accuracy = rng.uniform(0.45, 0.95)
        counts = rng.dirichlet(np.ones(k + 1), size=k) * (1 - accuracy) * 100
        counts[np.arange(k), np.arange(k)] += accuracy * 100
        out.append(ConfusionMatrix(f"m{m}", tuple(labels), counts, prior=0.5))
    return out


def test_bhattacharyya_is_one_on_identical_rows_and_zero_on_disjoint_ones() -> None:
    rho = bhattacharyya(np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
    assert np.allclose(rho, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])


def test_surrogate_bounds_the_exact_error_of_the_vote_for_every_label() -> None:
    rng = np.random.default_rng(7)
    for labels in ("AB", "ABC", "ABCD"):
        for _ in range(10):
            matrices = random_matrices(rng, 4, labels)
            counts = rng.integers(0, 3, size=4)
            counts[0] = max(counts[0], 1)
            calls = [m.model for m, n in zip(matrices, counts, strict=True) for _ in range(n)]
            exact = exact_error(LikelihoodVote({m.model: m for m in matrices}), calls)
            surrogate = label_bounds(pair_table(matrices), counts)
            tuned = chernoff_bounds(matrices, list(counts))
            assert (exact <= tuned + 1e-12).all(), (labels, exact, tuned)
            assert (tuned <= surrogate + 1e-12).all()


def test_pessimistic_table_has_less_separation_than_the_point_estimate() -> None:
    matrices = random_matrices(np.random.default_rng(3), 3, "ABC")
    point, pessimistic = pair_table(matrices), pair_table(matrices, level=0.9, draws=500)
    assert (pessimistic.log_rho >= point.log_rho - 1e-9).all()
    assert (pessimistic.log_rho > point.log_rho).any()


def test_count_enumeration_equals_sequence_enumeration_for_repeated_samples() -> None:
    matrices = random_matrices(np.random.default_rng(0), 3, "ABC")
    vote = LikelihoodVote({m.model: m for m in matrices})
    by_sequence = exact_error(vote, ["m0", "m0", "m1", "m2", "m2", "m2"])
    assert np.allclose(exact_error_counts(vote, {"m0": 2, "m1": 1, "m2": 3}), by_sequence)
    assert (by_sequence <= label_bounds(pair_table(matrices), [2, 1, 3]) + 1e-12).all()
