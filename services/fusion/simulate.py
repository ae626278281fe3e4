"""Simulated constellations from recorded pools: the rows the calibrator is fitted and judged on.

For one prompt, a constellation is a set of k models; its candidates are those models' recorded texts,
their reliability each model's accuracy on the pool's train split (what a router would know), ranked
by that reliability. The vote reads each answer from the text (:func:`constellation.ml.answers.extract_answer`),
as the service does when a candidate arrives without ``normalized_answer``; a vote is correct when its
answer equals the normalised reference. Prompts without a reference are skipped.

Sets are drawn like a router would draw them: the top k models by train accuracy, plus random subsets
of k models, seeded by the prompt id so runs repeat exactly. Plain Python over in-memory records.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from constellation.ml.answers import extract_answer, normalize_answer
from constellation.ml.vote import DEFAULT_WEIGHTING, Ballot, Tally, features, options_in, tally
from constellation.pools import PoolRecord

POOLS = {"gsm8k": "number", "routerbench_arc": "choice", "routerbench_winogrande": "choice"}
"""The closed-answer pools in ``../shared/data`` and their answer kinds."""


@dataclass(frozen=True)
class VoteRow:
    """One simulated vote: where it came from, its features and whether it was right."""

    pool: str
    record_id: str
    k: int
    draw: str
    """``top`` (the top k by train accuracy) or ``random``."""
    features: list[float]
    correct: bool
    result: Tally


def train_accuracy(records: Iterable[PoolRecord]) -> dict[str, float]:
    """Each model's share of correct answers over ``records`` (pass the train split)."""
    hits: dict[str, float] = {}
    counts: dict[str, int] = {}
    for record in records:
        for model, response in record.responses.items():
            hits[model] = hits.get(model, 0.0) + float(response.correct or 0)
            counts[model] = counts.get(model, 0) + 1
    return {m: hits[m] / counts[m] for m in hits}


def by_accuracy(accuracy: dict[str, float]) -> list[str]:
    """Models from the most to the least accurate (ties by name)."""
    return sorted(accuracy, key=lambda m: (-accuracy[m], m))


def answers_of(record: PoolRecord, kind: str) -> dict[str, str | None]:
    """Every model's normalised answer to ``record``, read from its recorded text."""
    return {model: extract_answer(kind, response.text) for model, response in record.responses.items()}


def ballots_for(models: Sequence[str], answers: dict[str, str | None], accuracy: dict[str, float]) -> list[Ballot]:
    """The ballots of ``models`` (answers from :func:`answers_of`), ranked by train accuracy."""
    ordered = sorted(models, key=lambda m: (-accuracy[m], m))
    return [Ballot(answers[m], accuracy[m], rank) for rank, m in enumerate(ordered)]


def _rng(record_id: str, seed: int) -> random.Random:
    return random.Random(hashlib.sha256(f"{seed}:{record_id}".encode()).digest())


def simulate(
    pool: str,
    records: Iterable[PoolRecord],
    accuracy: dict[str, float],
    *,
    ks: Sequence[int] = (3, 5, 7),
    random_sets: int = 3,
    seed: int = 0,
    weighting: str = DEFAULT_WEIGHTING,
) -> list[VoteRow]:
    """Votes of top-k and ``random_sets`` random k-model constellations per prompt, for each k in ``ks``."""
    kind = POOLS[pool]
    ranked = by_accuracy(accuracy)
    rows: list[VoteRow] = []
    for record in records:
        reference = normalize_answer(kind, record.reference)
        if reference is None:
            continue
        answers = answers_of(record, kind)
        options = options_in(record.prompt)
        rng = _rng(record.id, seed)
        for k in ks:
            if k > len(ranked):
                continue
            draws = [("top", ranked[:k])] + [("random", rng.sample(ranked, k)) for _ in range(random_sets)]
            for draw, models in draws:
                result = tally(ballots_for(models, answers, accuracy), weighting)
                rows.append(
                    VoteRow(
                        pool, record.id, k, draw, features(result, kind, options), result.answer == reference, result
                    )
                )
    return rows
