"""The likelihood-ratio vote of a plan's answers, and the certified early stop.

:class:`LikelihoodVote` scores each label by ``sum_calls log P_m(y | theta)`` under the same confusion
matrices the plan was chosen on and returns the best (ties go to the label listed first); that is the
decision rule the bounds of :mod:`constellation.planning.surrogate` are about.

:func:`certified_stop` is exact, not a heuristic: it returns True iff no combination of answers from the
calls still running can change the vote's decision. For the current leader ``a`` and any rival ``b``,
the remaining calls move the score gap ``s_a - s_b`` by a sum of independent per-call terms, so the
worst case is the sum of each call's smallest ``log P(y|a) - log P(y|b)`` over its possible answers;
the decision is settled iff that worst-case gap stays > 0 for every rival. (A worst case of exactly 0
counts as unsettled, which can only delay a stop.) Stopping early never changes the answer, so the
plan's error bound still holds for the stopped vote.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from constellation.errors import InvalidArgument
from constellation.planning.confusion import ConfusionMatrix, check_aligned

Answer = tuple[str, str | None]
"""One call's result: (model, answer); an answer outside the labels or None counts as abstain."""


class LikelihoodVote:
    """Maximum-likelihood vote over closed answers; immutable, cheap, thread-safe."""

    def __init__(self, matrices: Mapping[str, ConfusionMatrix]) -> None:
        self.labels = check_aligned(matrices)
        self._matrices = dict(matrices)
        self._log = {m: np.log(c.probs) for m, c in matrices.items()}

    def _table(self, model: str) -> np.ndarray:
        try:
            return self._log[model]
        except KeyError:
            raise InvalidArgument(f"no confusion matrix for model {model!r}") from None

    def scores(self, answers: Sequence[Answer]) -> np.ndarray:
        """Log-likelihood of the answers under each label (length K)."""
        total = np.zeros(len(self.labels))
        for model, answer in answers:
            total += self._table(model)[:, self._matrices[model].column(answer)]
        return total

    def decide(self, answers: Sequence[Answer]) -> str:
        """The label with the highest likelihood; ties to the first listed; no answers: the first label."""
        return self.labels[int(np.argmax(self.scores(answers)))]

    def posterior(self, answers: Sequence[Answer]) -> dict[str, float]:
        """Posterior over labels under a uniform prior (a confidence to report, not the guarantee)."""
        scores = self.scores(answers)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        return {label: float(w) for label, w in zip(self.labels, weights, strict=True)}

    def worst_gap(self, model: str, leader: int) -> np.ndarray:
        """Per rival label, the smallest change one call of ``model`` can make to ``s_leader - s_rival``."""
        table = self._table(model)
        return (table[leader][None, :] - table).min(axis=1)


def certified_stop(vote: LikelihoodVote, answers: Sequence[Answer], remaining: Sequence[str]) -> bool:
    """True iff no answers of the ``remaining`` calls (model names, repeats allowed) can change the decision.

    Args:
        vote: The plan's vote.
        answers: Answers received so far.
        remaining: Models of the calls still running (or not yet started).
    """
    if not remaining:
        return True
    scores = vote.scores(answers)
    leader = int(np.argmax(scores))
    gap = scores[leader] - scores
    for model in remaining:
        gap = gap + vote.worst_gap(model, leader)
    gap[leader] = np.inf
    return bool((gap > 0).all())


def exact_error(vote: LikelihoodVote, calls: Sequence[str]) -> np.ndarray:
    """The vote's true error probability per label (length K) for ``calls``, by enumerating every outcome.

    Exact under the matrices and independence; holds ``(K+1)^len(calls) x K`` arrays, so only for small
    plans (the optimality-gap benchmark and the tests). Ties go to the first label, as in :meth:`decide`.
    """
    k = len(vote.labels)
    scores = np.zeros((1, k))
    for model in calls:
        table = vote._table(model)  # K x (K+1) log-probabilities
        scores = (scores[:, None, :] + table.T[None, :, :]).reshape(-1, k)
    likelihood = np.exp(scores)
    decided = np.argmax(scores, axis=1)
    right = likelihood[np.arange(len(decided)), decided]
    correct = np.bincount(decided, weights=right, minlength=k)
    return 1.0 - correct


def _compositions(calls: int, outputs: int) -> np.ndarray:
    """Every way ``calls`` answers fall into ``outputs`` columns, as a ``N x outputs`` count array."""
    rows = []
    for combo in itertools.combinations_with_replacement(range(outputs), calls):
        rows.append(np.bincount(np.asarray(combo, dtype=int), minlength=outputs))
    return np.asarray(rows, dtype=float).reshape(-1, outputs)


def exact_error_counts(vote: LikelihoodVote, counts: Mapping[str, int]) -> np.ndarray:
    """Like :func:`exact_error` for repeated samples, enumerating answer *counts* per model instead of
    sequences (the vote depends on counts only), so ``n`` samples of one model cost ``C(n+K, K)`` rows."""
    k = len(vote.labels)
    scores = np.zeros((1, k))
    log_p = np.zeros((1, k))
    for model, n in counts.items():
        if n == 0:
            continue
        table = vote._table(model)
        comps = _compositions(n, k + 1)
        log_coef = math.lgamma(n + 1) - np.sum([[math.lgamma(c + 1) for c in row] for row in comps], axis=1)
        part = comps @ table.T  # N x K: the sum of log P(y|theta) over the answers
        scores = (scores[:, None, :] + part[None, :, :]).reshape(-1, k)
        log_p = (log_p[:, None, :] + (part + log_coef[:, None])[None, :, :]).reshape(-1, k)
    decided = np.argmax(scores, axis=1)
    right = np.exp(log_p[np.arange(len(decided)), decided])
    return 1.0 - np.bincount(decided, weights=right, minlength=k)
