"""Ranking one query's candidates: embed, first stage, prune, then the pairwise ranker (plain Python, no gRPC).

:class:`Ranker` is what the service runs per request::

    embed the prompt and every candidate (one all-MiniLM-L6-v2 batch)
      -> first-stage signals and score (services.ranking.prefilter)
      -> keep the best share (request ``keep``, else ~35% of large sets; never fewer than 2)
      -> survivors ordered by mean win probability under the pairwise ranker (when one is loaded),
         else by the first-stage score
      -> pruned candidates after them, by first-stage score

:func:`candidate_features` builds the ranker's per-candidate inputs; training calls it too, so the
features a model was trained on and the ones it is served are computed by the same code.

Concurrency: :meth:`Ranker.rank` is blocking and CPU-bound (the encoder: about 30 ms per candidate
on one core); call it from a single worker thread, since the encoder is not safe for two threads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from constellation.errors import FieldViolation, InvalidArgument
from services.ranking.checks import ANSWER_KINDS, CLOSED_KINDS
from services.ranking.pairwise import RankerArtifact, mean_win_probability, shared_features, side_features
from services.ranking.prefilter import DEFAULT_KEEP_FRACTION, Signals, keep_count, signals, survivors

log = logging.getLogger(__name__)

MAX_CANDIDATES = 64


@dataclass(frozen=True)
class CandidateText:
    """What the ranker reads of a candidate.

    Attributes:
        text: The full answer.
        normalized_answer: The caller's extracted closed answer ("" when none: read from the text).
        reliability: The caller's reliability weight of the model for this kind of query, in [0, 1];
            0 means unknown. Used only when some candidate of the set has one.
    """

    text: str
    normalized_answer: str = ""
    reliability: float = 0.0


@dataclass(frozen=True)
class Ranked:
    """One candidate's place: ``index`` into the request, ``score`` in [0, 1], 0-based ``rank``, ``pruned``.

    ``score`` is the mean win probability under the pairwise ranker for ranked candidates, and the
    first-stage score for pruned ones and whenever no ranker is loaded (the two scales differ: compare
    scores only among candidates with the same ``pruned`` flag).
    """

    index: int
    score: float
    rank: int
    pruned: bool


@dataclass(frozen=True)
class Ranking:
    """The result: candidates best first, pruned last; ``stage`` is ``pairwise`` or ``first_stage``."""

    ranked: list[Ranked]
    stage: str


@dataclass(frozen=True)
class CandidateFeatures:
    """Inputs of the pairwise ranker for one candidate set."""

    signals: Signals
    side: np.ndarray
    shared: np.ndarray


def candidate_features(
    kind: str,
    query: np.ndarray | None,
    embeddings: np.ndarray | None,
    candidates: Sequence[CandidateText],
) -> CandidateFeatures:
    """First-stage signals and the ranker's per-candidate and per-set features.

    Args:
        kind: Answer kind (``number``, ``choice``, ``code``, ``open``).
        query: Unit-length prompt embedding ``[384]``, or None.
        embeddings: Unit-length candidate embeddings ``[n, 384]``, or None.
        candidates: The candidates, in request order.
    """
    texts = [c.text for c in candidates]
    found = signals(kind, texts, [c.normalized_answer for c in candidates], embeddings)
    reliability_known = any(c.reliability > 0 for c in candidates)
    side = side_features(
        texts,
        query,
        embeddings,
        found.format,
        found.agreement,
        found.centrality,
        [c.reliability if reliability_known else 0.0 for c in candidates],
        [a is not None for a in found.answers] if kind in CLOSED_KINDS else [False] * len(texts),
    )
    return CandidateFeatures(found, side, shared_features(kind, reliability_known))


def validate_request(
    prompt: str, candidates: Sequence[CandidateText], *, max_candidates: int = MAX_CANDIDATES, max_chars: int
) -> None:
    """Checks a request before any work.

    Raises:
        InvalidArgument: an empty prompt, no candidates, more than ``max_candidates``, or a text longer
            than ``max_chars`` characters; one field violation per problem (``prompt``, ``candidates``,
            ``candidates[i].text``).
    """
    violations: list[FieldViolation] = []
    if not prompt.strip():
        violations.append(FieldViolation("prompt", "must not be empty"))
    elif len(prompt) > max_chars:
        violations.append(FieldViolation("prompt", f"longer than {max_chars} characters"))
    if not candidates:
        violations.append(FieldViolation("candidates", "at least one candidate is needed"))
    elif len(candidates) > max_candidates:
        violations.append(
            FieldViolation("candidates", f"{len(candidates)} candidates; at most {max_candidates} per request")
        )
    else:
        for i, candidate in enumerate(candidates):
            if len(candidate.text) > max_chars:
                violations.append(FieldViolation(f"candidates[{i}].text", f"longer than {max_chars} characters"))
            if not 0.0 <= candidate.reliability <= 1.0:
                violations.append(FieldViolation(f"candidates[{i}].reliability", "must be in [0, 1]"))
    if violations:
        raise InvalidArgument("invalid RankRequest", violations, reason="BAD_RANK_REQUEST")


class Ranker:
    """Ranks candidate sets. ``rank`` is blocking; see the module docstring for threading.

    Args:
        encoder: A loaded :class:`constellation.ml.encoder.Encoder` (anything with its ``encode``),
            or None: no embeddings, so no centrality and no pairwise stage.
        artifact: A trained pair ranker, or None: the first stage alone orders the survivors.
        keep_fraction: Share of a large set kept by the first stage when the request leaves ``keep`` at 0.
        prune_from: Sets smaller than this are not pruned unless the request asks (``keep``).
    """

    def __init__(
        self,
        encoder: object | None,
        artifact: RankerArtifact | None,
        *,
        keep_fraction: float = DEFAULT_KEEP_FRACTION,
        prune_from: int = 8,
    ):
        self.encoder = encoder
        self.artifact = artifact
        self.keep_fraction = keep_fraction
        self.prune_from = prune_from

    @property
    def stage(self) -> str:
        """``pairwise`` when the trained ranker runs (it needs embeddings), else ``first_stage``."""
        return "pairwise" if self.artifact is not None and self.encoder is not None else "first_stage"

    @property
    def description(self) -> str:
        if self.artifact is not None and self.encoder is not None:
            return f"pairwise ranker {self.artifact.content_hash[:12]} after the first stage"
        if self.encoder is None:
            return "first stage only, without embeddings (agreement and form checks)"
        return "first stage only (no trained ranker: run `constellation train ranker`)"

    def embed(self, prompt: str, texts: Sequence[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The prompt's and the texts' embeddings in one encoder batch, or (None, None) without an encoder."""
        if self.encoder is None:
            return None, None
        encoded = self.encoder.encode([prompt, *texts])  # type: ignore[attr-defined]
        vectors = np.asarray(encoded.embeddings, dtype=np.float32)
        return vectors[0], vectors[1:]

    def rank(self, prompt: str, candidates: Sequence[CandidateText], kind: str, keep: int = 0) -> Ranking:
        """Orders ``candidates`` best first, pruned ones last. Blocking; validate the request first.

        Args:
            prompt: The query the candidates answer.
            candidates: At least one candidate.
            kind: Answer kind; anything outside ``number``/``choice``/``code``/``open`` is treated as open.
            keep: Survivors of the first stage; 0 applies the default share (see :func:`keep_count`).
        """
        kind = kind if kind in ANSWER_KINDS else "open"
        query, embeddings = self.embed(prompt, [c.text for c in candidates])
        return self.rank_embedded(query, embeddings, candidates, kind, keep)

    def rank_embedded(
        self,
        query: np.ndarray | None,
        embeddings: np.ndarray | None,
        candidates: Sequence[CandidateText],
        kind: str,
        keep: int = 0,
    ) -> Ranking:
        """:meth:`rank` with the embeddings already computed (the benchmark reuses cached ones)."""
        features = candidate_features(kind, query, embeddings, candidates)
        first = features.signals.score
        count = keep_count(len(candidates), keep, fraction=self.keep_fraction, min_candidates=self.prune_from)
        kept = survivors(first, count)
        pruned = np.setdiff1d(np.arange(len(candidates)), kept)
        pruned = pruned[np.lexsort((pruned, -first[pruned]))]
        pairwise = self.artifact is not None and embeddings is not None and query is not None
        if self.artifact is not None and embeddings is not None and query is not None and len(kept) > 1:
            matrix = self.artifact.ranker.win_matrix(query, embeddings[kept], features.side[kept], features.shared)
            wins = mean_win_probability(matrix)
            order = np.lexsort((kept, -first[kept], -wins))
            scores = {int(kept[i]): float(wins[i]) for i in order}
            ordered = [int(kept[i]) for i in order]
        else:
            ordered = [int(i) for i in kept]
            scores = {i: float(first[i]) for i in ordered}
        ranked = [Ranked(i, scores[i], position, False) for position, i in enumerate(ordered)]
        ranked += [Ranked(int(i), float(first[i]), len(ordered) + position, True) for position, i in enumerate(pruned)]
        return Ranking(ranked, "pairwise" if pairwise else "first_stage")
