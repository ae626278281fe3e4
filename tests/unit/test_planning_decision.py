"""The likelihood-ratio vote and the certified early stop (checked against every outcome of the rest)."""

from __future__ import annotations

import itertools

import numpy as np

from constellation.planning.confusion import ConfusionMatrix
from constellation.planning.decision import LikelihoodVote, certified_stop
from tests.unit.test_planning_surrogate import random_matrices


def test_vote_follows_likelihood_not_head_count() -> None:
    strong = ConfusionMatrix("strong", ("A", "B"), np.array([[99.0, 1, 0], [1, 99, 0]]))
    weak = ConfusionMatrix("weak", ("A", "B"), np.array([[60.0, 40, 0], [40, 60, 0]]))
    vote = LikelihoodVote({"strong": strong, "weak": weak})
    answers = [("strong", "A"), ("weak", "B"), ("weak", "B")]
    assert vote.decide(answers) == "A"
    assert vote.posterior(answers)["A"] > 0.9
    assert vote.decide([("weak", None)]) in ("A", "B")


def test_certified_stop_is_true_exactly_when_no_remaining_outcome_changes_the_decision() -> None:
    rng = np.random.default_rng(11)
    stops = 0
    for labels in ("AB", "ABCD"):
        matrices = random_matrices(rng, 4, labels)
        vote = LikelihoodVote({m.model: m for m in matrices})
        outputs = [*labels, None]
        for _ in range(40):
            done = [(m.model, outputs[rng.integers(len(outputs))]) for m in matrices[:3]]
            remaining = [m.model for m in matrices[3:]]
            current = vote.decide(done)
            unchangeable = all(
                vote.decide(done + list(zip(remaining, rest, strict=True))) == current
                for rest in itertools.product(outputs, repeat=len(remaining))
            )
            stop = certified_stop(vote, done, remaining)
            assert stop == unchangeable
            stops += stop
    assert stops > 0


def test_two_agreeing_strong_answers_settle_a_two_label_vote_against_one_weak_call() -> None:
    strong = ConfusionMatrix("strong", ("A", "B"), np.array([[95.0, 5, 0], [5, 95, 0]]))
    weak = ConfusionMatrix("weak", ("A", "B"), np.array([[60.0, 40, 0], [40, 60, 0]]))
    vote = LikelihoodVote({"strong": strong, "weak": weak})
    assert certified_stop(vote, [("strong", "A"), ("strong", "A")], ["weak"])
    assert not certified_stop(vote, [("weak", "A")], ["strong"])
    assert certified_stop(vote, [], [])
