"""Reliability-weighted voting over closed answers, and the agreement features a calibrator reads.

Each candidate casts one *ballot*: its normalised answer (or none) and its model's reliability, the
caller's estimate of the probability that this model answers this kind of query correctly. A ballot's
weight is a function of that reliability (:data:`WEIGHTINGS`):

* ``log_odds``: ``log(p / (1 - p))`` with ``p`` clipped to [0.02, 0.98] and the weight floored at 0.05.
  This is the weight that makes a weighted vote the maximum-likelihood answer when models err
  independently (a strong model outvotes two weak ones that agree);
* ``reliability``: ``p`` itself (a softer version: two weak models outvote one strong one);
* ``plurality``: every ballot weighs 1.

The default is ``log_odds``: on the train splits of gsm8k, ARC and Winogrande (simulated constellations
of 3, 5 and 7 models, see ``python -m services.fusion.train``) it gave the highest voted accuracy of
the three; the measured figures are in the artifact's manifest and in docs/BENCHMARKS.md.

A reliability of exactly 0 means "not given" (protobuf has no presence for doubles) and counts as
:data:`UNKNOWN_RELIABILITY`. Everything here is plain Python, cheap (microseconds) and thread-safe.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

WEIGHTINGS = ("log_odds", "reliability", "plurality")
DEFAULT_WEIGHTING = "log_odds"
UNKNOWN_RELIABILITY = 0.6
"""Reliability assumed for a candidate whose caller gave none (reliability 0)."""
_P_MIN, _P_MAX = 0.02, 0.98
_MIN_WEIGHT = 0.05

FEATURE_NAMES = (
    "weighted_share",
    "raw_share",
    "log_voters",
    "answered_fraction",
    "winner_mean_reliability",
    "winner_max_reliability",
    "runner_up_mean_reliability",
    "runner_up_max_reliability",
    "margin",
    "evidence",
    "is_choice",
    "unanimous",
    "top_agrees",
    "top_reliability",
    "choice_x_weighted_share",
    "choice_x_top_agrees",
    "chance",
    "chance_x_weighted_share",
)
"""The agreement features of a vote, in the order :func:`features` returns them."""


@dataclass(frozen=True)
class Ballot:
    """One candidate's vote.

    Attributes:
        answer: Normalised answer (see :mod:`constellation.ml.answers`); None when it gave none.
        reliability: Probability that its model is right on such queries, in [0, 1]; 0 = unknown.
        rank: Position after ranking (0 = best); breaks exact ties.
    """

    answer: str | None
    reliability: float
    rank: int = 0

    @property
    def p(self) -> float:
        """The reliability used for weighting: the given one, or :data:`UNKNOWN_RELIABILITY` when unset."""
        return self.reliability if self.reliability > 0 else UNKNOWN_RELIABILITY


@dataclass(frozen=True)
class Tally:
    """The outcome of a vote.

    Attributes:
        answer: The winning normalised answer; None when no ballot held an answer.
        weighted_share: Weight of the winner's ballots over the weight of every ballot that answered.
        votes_for: Ballots for the winner.
        votes_total: Ballots that held an answer.
        ballots: Every ballot, answered or not, in the order given.
        winners: Indices (into ``ballots``) of the winner's ballots.
        runner_up: The answer with the next most weight, or None.
        runner_up_share: Its weighted share (0 when there is none).
    """

    answer: str | None
    weighted_share: float
    votes_for: int
    votes_total: int
    ballots: tuple[Ballot, ...]
    winners: tuple[int, ...]
    runner_up: str | None
    runner_up_share: float

    @property
    def raw_share(self) -> float:
        return self.votes_for / self.votes_total if self.votes_total else 0.0


def weight(p: float, weighting: str = DEFAULT_WEIGHTING) -> float:
    """The weight of a ballot whose model is right with probability ``p``."""
    if weighting == "plurality":
        return 1.0
    if weighting == "reliability":
        return max(p, _MIN_WEIGHT)
    if weighting == "log_odds":
        clipped = min(max(p, _P_MIN), _P_MAX)
        return max(math.log(clipped / (1.0 - clipped)), _MIN_WEIGHT)
    raise ValueError(f"unknown weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")


def tally(ballots: Sequence[Ballot], weighting: str = DEFAULT_WEIGHTING) -> Tally:
    """Counts ``ballots`` and names the winner.

    The winner has the most weight; exact ties go to the answer with more ballots, then to the one
    whose best-ranked voter ranks higher, then to the smaller answer string (so the result never
    depends on the order of the ballots).
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for index, ballot in enumerate(ballots):
        if ballot.answer is not None:
            groups[ballot.answer].append(index)
    weights = [weight(b.p, weighting) for b in ballots]
    if not groups:
        return Tally(None, 0.0, 0, 0, tuple(ballots), (), None, 0.0)
    mass = {answer: sum(weights[i] for i in members) for answer, members in groups.items()}
    total = sum(mass.values())

    def order(answer: str) -> tuple[float, int, int, str]:
        members = groups[answer]
        return (-round(mass[answer], 12), -len(members), min(ballots[i].rank for i in members), answer)

    ranked = sorted(groups, key=order)
    winner = ranked[0]
    runner_up = ranked[1] if len(ranked) > 1 else None
    return Tally(
        answer=winner,
        weighted_share=mass[winner] / total,
        votes_for=len(groups[winner]),
        votes_total=sum(len(m) for m in groups.values()),
        ballots=tuple(ballots),
        winners=tuple(groups[winner]),
        runner_up=runner_up,
        runner_up_share=mass[runner_up] / total if runner_up is not None else 0.0,
    )


def _logit(p: float) -> float:
    clipped = min(max(p, _P_MIN), _P_MAX)
    return math.log(clipped / (1.0 - clipped))


_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[).:]\s+\S", re.MULTILINE)


def options_in(prompt: str) -> int:
    """How many lettered options the prompt's last question offers (``A) ...``, ``(B) ...``); 0 if none.

    Only the text after the last blank line is read, so the options of few-shot examples do not count.
    """
    tail = prompt.rstrip().rsplit("\n\n", 1)[-1][-4000:]
    return len({m.group(1) for m in _OPTION_LINE.finditer(tail)})


def features(result: Tally, kind: str, options: int = 0) -> list[float]:
    """The agreement features of ``result`` (:data:`FEATURE_NAMES` order) for a ``kind`` question.

    ``options`` is the number of choices the question offers (:func:`options_in`): with two options,
    wrong answers agree by chance far more often than with four, so ``chance`` (1 / options, 0 when
    unknown) lets the calibrator tell a two-way question from a four-way one.

    ``evidence`` is the naive-Bayes log-odds of the winner against the rest: the summed logits of its
    voters' reliabilities minus those of the other answering voters, divided by 5 to keep it near the
    other features' scale. ``top_agrees`` says whether the most reliable candidate (ties: the better
    ranked) voted for the winner; the last two let the fit treat choices (few options, so wrong answers
    collide more often) apart from numbers. Everything else is a share or a reliability in [0, 1], or a
    count's log.
    """
    ballots = result.ballots
    answered = [b for b in ballots if b.answer is not None]
    winners = [ballots[i] for i in result.winners]
    runners = [b for b in answered if result.runner_up is not None and b.answer == result.runner_up]
    others = [b for b in answered if b.answer != result.answer]
    evidence = sum(_logit(b.p) for b in winners) - sum(_logit(b.p) for b in others)
    top = min(ballots, key=lambda b: (-b.p, b.rank)) if ballots else None
    top_agrees = 1.0 if top is not None and top.answer is not None and top.answer == result.answer else 0.0
    is_choice = 1.0 if kind == "choice" else 0.0
    chance = 1.0 / options if kind == "choice" and options >= 2 else 0.0
    return [
        result.weighted_share,
        result.raw_share,
        math.log1p(result.votes_total),
        result.votes_total / len(ballots) if ballots else 0.0,
        sum(b.p for b in winners) / len(winners) if winners else 0.0,
        max((b.p for b in winners), default=0.0),
        sum(b.p for b in runners) / len(runners) if runners else 0.0,
        max((b.p for b in runners), default=0.0),
        result.weighted_share - result.runner_up_share,
        evidence / 5.0,
        is_choice,
        1.0 if result.votes_total >= 2 and result.votes_for == result.votes_total else 0.0,
        top_agrees,
        top.p if top is not None else 0.0,
        is_choice * result.weighted_share,
        is_choice * top_agrees,
        chance,
        chance * result.weighted_share,
    ]
