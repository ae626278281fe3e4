"""The error surrogate of a query plan: a union bound over label pairs with Chernoff bounds.

Setting. A closed-answer query has a true label ``theta`` among ``K`` labels. A *plan* ``n = (n_1..n_M)``
asks model ``m`` ``n_m`` times. Each call's answer ``y`` (a label or abstain) is drawn from the model's
confusion row ``P_m(. | theta)``, and **calls are assumed independent given theta** (repeated samples
of one model at temperature > 0 included). The decision is the likelihood-ratio (maximum-likelihood)
vote ``argmax_theta prod_calls P_m(y | theta)`` (:mod:`constellation.planning.decision`).

Bound. The vote errs on truth ``theta`` only if some ``theta' != theta`` scores at least as high, so
(union bound over pairs, then Chernoff with exponent ``s`` in (0, 1))::

    P(error | theta) <= sum_{theta'} P(L(theta') >= L(theta) | theta)
                     <= sum_{theta'} prod_m phi_m(s; theta, theta')^{n_m},
    phi_m(s; theta, theta') = sum_y P_m(y | theta)^{1-s} P_m(y | theta')^s.

At ``s = 1/2``, ``phi_m`` is the Bhattacharyya coefficient ``rho_m(theta, theta')``, symmetric in the
pair, and the constraint of label ``theta`` becomes ``g_theta(n) = sum_{theta'} exp(sum_m n_m log rho_m)
<= alpha_theta``: separable in ``n`` and decreasing in every ``n_m``. This is what the planner solves
(:mod:`constellation.planning.solve`). For a chosen plan, :func:`chernoff_bounds` optimises ``s`` per
ordered pair on a grid, which can only tighten the certified figure.

What is guaranteed, exactly: if the confusion matrices are the true answer distributions and calls are
independent given the label, then every plan with ``g_theta(n) <= alpha_theta`` has true error
probability at most ``alpha_theta`` when the truth is ``theta`` (ties broken against ``theta``
included). Nothing is guaranteed about error when the matrices are estimates (use the pessimistic
``level`` of :func:`pair_table` to plan on an upper credible quantile of every ``rho``), or when
models make correlated mistakes, which recorded LLMs do.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from constellation.planning.confusion import ConfusionMatrix


@dataclass(frozen=True)
class PairTable:
    """``log rho_m`` for every model and unordered label pair: the planner's whole input besides costs.

    Attributes:
        labels: The task's labels.
        pairs: Unordered label index pairs ``(i, j)``, ``i < j``.
        log_rho: ``M x P`` array of ``log rho_m(pair)`` (<= 0; 0 means the model cannot tell them apart).
    """

    labels: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]
    log_rho: np.ndarray

    @property
    def weights(self) -> np.ndarray:
        """``-log rho`` (>= 0): the separation one call adds to each pair's exponent."""
        return np.maximum(-self.log_rho, 0.0)

    def incidence(self) -> np.ndarray:
        """``K x P`` 0/1 array: which pairs enter the constraint of each label."""
        table = np.zeros((len(self.labels), len(self.pairs)))
        for p, (i, j) in enumerate(self.pairs):
            table[i, p] = table[j, p] = 1.0
        return table


def bhattacharyya(probs: np.ndarray) -> np.ndarray:
    """``K x K`` matrix of ``rho(theta, theta') = sum_y sqrt(P(y|theta) P(y|theta'))``."""
    root = np.sqrt(probs)
    return np.clip(root @ root.T, 0.0, 1.0)


def _label_pairs(k: int) -> tuple[tuple[int, int], ...]:
    return tuple(itertools.combinations(range(k), 2))


def pair_table(
    matrices: Sequence[ConfusionMatrix], *, level: float | None = None, draws: int = 2000, seed: int = 0
) -> PairTable:
    """The pair table of ``matrices`` (one row per matrix, in order).

    Args:
        matrices: One matrix per model, all on the same labels.
        level: None: plan on the posterior-mean matrices. A level such as 0.9: plan on the ``level``
            posterior quantile of every ``rho`` (pessimistic: less separation than the point estimate).
        draws: Posterior draws per matrix for ``level``.
        seed: Seed of those draws.
    """
    labels = matrices[0].labels
    pairs = _label_pairs(len(labels))
    rows = []
    rng = np.random.default_rng(seed)
    for matrix in matrices:
        if level is None:
            rho = bhattacharyya(matrix.probs)
            rows.append([rho[i, j] for i, j in pairs])
            continue
        sample = matrix.posterior_draws(draws, rng)
        root = np.sqrt(sample)
        rho_draws = np.einsum("dky,dly->dkl", root, root)
        rows.append([float(np.quantile(rho_draws[:, i, j], level)) for i, j in pairs])
    rho = np.clip(np.asarray(rows, dtype=float).reshape(len(matrices), len(pairs)), 1e-300, 1.0)
    return PairTable(labels, pairs, np.log(rho))


def label_bounds(table: PairTable, counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """The surrogate ``g_theta(n)`` per label (length K) for a plan's call counts (length M)."""
    exponents = np.asarray(counts, dtype=float) @ table.log_rho
    return table.incidence() @ np.exp(exponents)


def chernoff_bounds(matrices: Sequence[ConfusionMatrix], counts: Sequence[int], grid: int = 49) -> np.ndarray:
    """Per-label error bound with ``s`` optimised per ordered pair on a grid of (0, 1); <= the s=1/2 one."""
    probs = [m.probs for m, n in zip(matrices, counts, strict=True) if n > 0]
    used = [n for n in counts if n > 0]
    k = len(matrices[0].labels)
    if not used:
        return np.full(k, float(k - 1))
    s_values = np.linspace(0.0, 1.0, grid + 2)[1:-1]
    bounds = np.zeros(k)
    for i, j in itertools.permutations(range(k), 2):
        log_phi = np.zeros_like(s_values)
        for p, n in zip(probs, used, strict=True):
            terms = p[i][None, :] ** (1.0 - s_values[:, None]) * p[j][None, :] ** s_values[:, None]
            log_phi += n * np.log(terms.sum(axis=1))
        bounds[i] += float(np.exp(log_phi.min()))
    return bounds
