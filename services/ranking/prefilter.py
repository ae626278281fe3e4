"""The cheap first stage: per-candidate signals and the prune that keeps the most promising share.

Signals of candidate *i* among the *n* candidates of one query (numpy, no model):

* ``centrality``: mean cosine similarity of its embedding to the other candidates' (answers that many
  models converge on tend to be right; an outlier tends to be off-topic or broken). 0 without embeddings.
* ``agreement``: for number and choice answers, the share of the *other* candidates with the same
  normalised answer (0 when it has none; 0 for code and open answers).
* ``format``: :func:`services.ranking.checks.format_score`.
* ``length``: ``log(1 + characters)``, for open text only.

The first-stage score mixes them with per-kind weights (:data:`WEIGHTS`): agreement dominates for closed
answers, form and centrality for code, length for open text. The open weights come from AlpacaEval's
train split: keeping 5 of 14 answers by centrality kept the best one's score at 0.60 on average, below
a random 5 (0.67); the judge prefers long, specific answers, and central answers are the generic ones.
Length kept 0.89, and 0.2 centrality + 0.2 form + 0.6 length 0.88 (the form and centrality terms are
kept so that a long empty-ish or off-topic answer does not pass on length alone). Centrality and length
are min-max scaled within the query so the weights mean the same for every query.

Pure functions; thread-safe.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.ranking.checks import closed_answer, format_score

WEIGHTS: dict[str, tuple[float, float, float, float]] = {
    "number": (0.2, 0.6, 0.2, 0.0),
    "choice": (0.2, 0.6, 0.2, 0.0),
    "code": (0.5, 0.0, 0.5, 0.0),
    "open": (0.2, 0.0, 0.2, 0.6),
}
"""Weights of (centrality, agreement, format, length) in the first-stage score, per answer kind."""
DEFAULT_KEEP_FRACTION = 0.35
MIN_KEEP = 2


@dataclass(frozen=True)
class Signals:
    """First-stage signals of a candidate set, each ``float32 [n]`` in candidate order.

    Attributes:
        centrality: Mean cosine to the other candidates, in [-1, 1].
        agreement: Share of the other candidates giving the same closed answer, in [0, 1].
        format: Form check, in [0, 1].
        length: ``log1p(characters)``, min-max scaled within the set, in [0, 1].
        answers: Each candidate's normalised closed answer (None when unreadable or not closed).
        score: The weighted first-stage score, in [0, 1].
    """

    centrality: np.ndarray
    agreement: np.ndarray
    format: np.ndarray
    length: np.ndarray
    answers: list[str | None]
    score: np.ndarray


def centrality(embeddings: np.ndarray | None, n: int) -> np.ndarray:
    """Mean cosine similarity of each row of ``embeddings`` (unit length, ``[n, d]``) to the others.

    Zeros when there are no embeddings or fewer than two candidates.
    """
    if embeddings is None or n < 2:
        return np.zeros(n, dtype=np.float32)
    similarity = embeddings @ embeddings.T
    return ((similarity.sum(axis=1) - np.diag(similarity)) / (n - 1)).astype(np.float32)  # type: ignore[no-any-return]


def agreement(answers: Sequence[str | None]) -> np.ndarray:
    """Share of the other candidates whose answer equals each one's (0 for None answers)."""
    n = len(answers)
    if n < 2:
        return np.zeros(n, dtype=np.float32)
    counts = Counter(a for a in answers if a is not None)
    return np.array([(counts[a] - 1) / (n - 1) if a is not None else 0.0 for a in answers], dtype=np.float32)


def signals(
    kind: str,
    texts: Sequence[str],
    normalized_answers: Sequence[str] | None = None,
    embeddings: np.ndarray | None = None,
) -> Signals:
    """Computes the first-stage signals of one candidate set.

    Args:
        kind: Answer kind: ``number``, ``choice``, ``code`` or ``open`` (anything else counts as open).
        texts: Candidate texts.
        normalized_answers: Answers the caller already extracted ("" where none), aligned with ``texts``.
        embeddings: Unit-length candidate embeddings ``[n, d]``, or None (centrality is then 0).
    """
    n = len(texts)
    given = list(normalized_answers) if normalized_answers is not None else [""] * n
    answers = [closed_answer(kind, t, a) for t, a in zip(texts, given, strict=True)]
    central = centrality(embeddings, n)
    agree = agreement(answers)
    form = np.array([format_score(kind, t, a) for t, a in zip(texts, given, strict=True)], dtype=np.float32)
    length = _scaled(np.log1p(np.array([len(t) for t in texts], dtype=np.float32)))
    w_central, w_agree, w_format, w_length = WEIGHTS.get(kind, WEIGHTS["open"])
    if embeddings is None:  # no centrality: share its weight among the others
        total = w_agree + w_format + w_length
        w_central, w_agree, w_format, w_length = 0.0, w_agree / total, w_format / total, w_length / total
    score = w_central * _scaled(central) + w_agree * agree + w_format * form + w_length * length
    return Signals(central, agree, form, length, answers, np.clip(score.astype(np.float32), 0.0, 1.0))


def _scaled(values: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1] within the set; zeros when all values are (nearly) equal."""
    if values.size == 0:
        return values.astype(np.float32)
    spread = float(values.max() - values.min())
    if spread <= 1e-6:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - values.min()) / spread).astype(np.float32)  # type: ignore[no-any-return]


def keep_count(n: int, keep: int = 0, *, fraction: float = DEFAULT_KEEP_FRACTION, min_candidates: int = 8) -> int:
    """How many of ``n`` candidates survive the first stage.

    Args:
        n: Candidates in the request.
        keep: The request's explicit count; 0 uses ``fraction``. Never below :data:`MIN_KEEP` nor above ``n``.
        fraction: Share kept by default (0.35: the top third or so).
        min_candidates: Sets smaller than this are not pruned by default (an explicit ``keep`` still applies).
    """
    if keep > 0:
        return max(min(MIN_KEEP, n), min(keep, n))
    if n < min_candidates:
        return n
    return max(min(MIN_KEEP, n), min(n, math.ceil(fraction * n)))


def survivors(score: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` best first-stage scores, best first (ties: the earlier candidate)."""
    order = np.lexsort((np.arange(len(score)), -score))
    return order[:count]  # type: ignore[no-any-return]
