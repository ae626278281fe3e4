"""Policies and metrics for judging the mesh on a recorded pool (plain Python, no I/O, no gRPC).

A *call* is one model answering one prompt through the mesh. A *policy* decides, per prompt, which
models to call and how to turn their answers into one; it is judged by the recorded quality of that
answer, its cost and its latency. Baseline policies:

- ``single:<model>``: always that model.
- ``static``: the model with the best mean quality on the ``train`` split (ties: the cheaper), always
  (the "static deployment" baseline).
- ``random``: a model drawn uniformly per prompt, seeded by the prompt id (repeatable).
- ``oracle``: the cheapest model whose answer is best for that prompt (correct, or the highest
  score); an upper bound no router can beat.
- ``majority``: every model, and a plurality vote over their normalised answers (closed answers
  only: number, choice); ties go to the answer whose voters did best on ``train``. Its cost is the sum
  of its members' costs and its latency the slowest member's (they run concurrently).

- ``top3`` / ``top5``: the 3 (5) models with the best train record asked at once, a plurality vote of
  their answers (ties to the better train records); closed answers only.
- ``cascade``: the most accurate cheap-first cascade on ``train`` (``bench.cascade_search``: a first
  wave of cheap models whose answer stands when they agree, else the best model or a vote of the three
  best); closed answers only. Its cost counts the second wave only where it was asked.

And the mesh's own routing: ``profile:<name>`` (quality, balanced, cost, speed) sends each prompt to
dispatch with that profile and no model, so the router (and any fan-out it plans) decides. Its answer
is judged by the recorded quality of the model whose recorded text the mesh returned.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from constellation.ml.answers import normalize_answer
from constellation.pools import PoolRecord

if TYPE_CHECKING:
    from bench.cascade_search import CascadeChoice

CLOSED_KINDS = ("number", "choice")
TOP_VOTES = (3, 5)
BASELINES = ("static", "random", "majority", "cascade", *(f"top{k}" for k in TOP_VOTES))
"""The reachable baselines a routing profile is held against (the oracle is an upper bound, not one)."""


@dataclass(frozen=True)
class Call:
    """What one model call through the mesh returned, with what it cost and how long it took.

    Attributes:
        record_id: The pool record (prompt) asked.
        model: The pool model that answered.
        text: The answer text streamed back.
        cost_usd: Cost reported by the mesh.
        simulated_ms: The model's simulated latency (time to last token), in ms.
        simulated_ttft_ms: The model's simulated time to first token, in ms.
        mesh_ms: Real wall time of the call at the client, less any simulated waiting, in ms.
        error: The error's code and message when the call failed, else empty.
        models: The models the mesh says it asked (routed calls; the answering model first).
    """

    record_id: str
    model: str
    text: str
    cost_usd: float
    simulated_ms: float
    simulated_ttft_ms: float
    mesh_ms: float
    error: str = ""
    models: tuple[str, ...] = ()


PROFILE_POLICIES = ("profile:quality", "profile:balanced", "profile:cost", "profile:speed")


@dataclass(frozen=True)
class Outcome:
    """A policy's answer to one prompt."""

    record_id: str
    quality: float
    cost_usd: float
    simulated_ms: float
    mesh_ms: float
    models: tuple[str, ...]
    failed: bool = False


@dataclass
class PolicyResult:
    """A policy's metrics over a split."""

    policy: str
    n: int
    quality: float
    mean_cost_usd: float
    total_cost_usd: float
    simulated_ms: dict[str, float]
    mesh_ms: dict[str, float]
    mean_models: float
    failures: int
    outcomes: list[Outcome] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "n": self.n,
            "quality": self.quality,
            "mean_cost_usd": self.mean_cost_usd,
            "total_cost_usd": self.total_cost_usd,
            "simulated_ms": self.simulated_ms,
            "mesh_ms": self.mesh_ms,
            "mean_models": self.mean_models,
            "failures": self.failures,
        }


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 by linear interpolation between order statistics; NaN when empty."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan}

    def at(q: float) -> float:
        position = (len(ordered) - 1) * q
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99)}


def mean_quality_by_model(records: Iterable[PoolRecord]) -> dict[str, float]:
    """Mean recorded quality of each model over ``records`` (the train split, for the baselines)."""
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for record in records:
        for model, response in record.responses.items():
            totals[model] += response.quality
            counts[model] += 1
    return {m: totals[m] / counts[m] for m in totals}


def mean_cost_by_model(records: Iterable[PoolRecord]) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for record in records:
        for model, response in record.responses.items():
            totals[model] += response.cost_usd or 0.0
            counts[model] += 1
    return {m: totals[m] / counts[m] for m in totals}


def static_model(train: Sequence[PoolRecord]) -> str:
    """The best model on ``train`` by mean quality; ties go to the lower mean recorded cost."""
    quality = mean_quality_by_model(train)
    cost = mean_cost_by_model(train)
    return min(quality, key=lambda m: (-round(quality[m], 12), cost.get(m, 0.0), m))


def random_model(record: PoolRecord, models: Sequence[str], seed: int = 0) -> str:
    """A model drawn uniformly for ``record``, repeatable for the same id and seed."""
    digest = hashlib.sha256(f"{seed}:{record.id}".encode()).digest()
    return random.Random(digest).choice(sorted(models))


def oracle_model(record: PoolRecord) -> str:
    """The cheapest model whose recorded answer to ``record`` has the best quality.

    Models without a recorded cost (no known price) are chosen only when no priced model is as good.
    """
    best = max(r.quality for r in record.responses.values())

    def key(model: str) -> tuple[bool, float, str]:
        cost = record.responses[model].cost_usd
        return (cost is None, cost or 0.0, model)

    return min((m for m, r in record.responses.items() if r.quality == best), key=key)


def vote(kind: str, answers: dict[str, str | None], weights: dict[str, float]) -> tuple[str | None, float, list[str]]:
    """Plurality vote over normalised answers.

    Args:
        kind: The pool's answer kind (number or choice).
        answers: model -> its extracted answer (None when it gave none).
        weights: model -> tie-break weight (mean train quality).

    Returns:
        The winning normalised answer (None when nobody answered), the share of voters that chose it,
        and the models that voted for it.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for model, answer in answers.items():
        normalised = normalize_answer(kind, answer)
        if normalised is not None:
            groups[normalised].append(model)
    if not groups:
        return None, 0.0, []
    winner = max(groups, key=lambda a: (len(groups[a]), sum(weights.get(m, 0.0) for m in groups[a]), a))
    return winner, len(groups[winner]) / len(answers), groups[winner]


def summarize(policy: str, outcomes: list[Outcome]) -> PolicyResult:
    n = len(outcomes)
    return PolicyResult(
        policy=policy,
        n=n,
        quality=sum(o.quality for o in outcomes) / n if n else math.nan,
        mean_cost_usd=sum(o.cost_usd for o in outcomes) / n if n else math.nan,
        total_cost_usd=sum(o.cost_usd for o in outcomes),
        simulated_ms=percentiles([o.simulated_ms for o in outcomes]),
        mesh_ms=percentiles([o.mesh_ms for o in outcomes]),
        mean_models=sum(len(o.models) for o in outcomes) / n if n else math.nan,
        failures=sum(o.failed for o in outcomes),
        outcomes=outcomes,
    )


class Judge:
    """Turns calls into per-prompt outcomes for each baseline policy.

    Quality of a call is the *recorded* quality of the model that answered, after checking that the
    text streamed back is the recorded text (a mismatch or an error counts as quality 0 and is
    reported as a failure).
    """

    def __init__(self, test: Sequence[PoolRecord], train: Sequence[PoolRecord], *, seed: int = 0):
        self.test = list(test)
        self.by_id = {r.id: r for r in self.test}
        self.models = list(self.test[0].responses) if self.test else []
        self.kind = self.test[0].answer_kind if self.test else "open"
        self.train_quality = mean_quality_by_model(train)
        self.static = static_model(train) if train else (self.models[0] if self.models else "")
        self.seed = seed
        cost = mean_cost_by_model(train)
        self.by_record = sorted(self.train_quality, key=lambda m: (-self.train_quality[m], cost.get(m, 0.0), m))
        self.train = list(train)

    @cached_property
    def cascade(self) -> CascadeChoice | None:
        """The cascade baseline, searched on train when first needed (seconds on a 40-model pool)."""
        if self.kind not in CLOSED_KINDS or not self.train:
            return None
        from bench.cascade_search import best_cascade

        return best_cascade(self.train)

    def policies(self) -> list[str]:
        names = [f"single:{m}" for m in self.models] + ["static", "random", "oracle"]
        if self.kind in CLOSED_KINDS:
            names.append("majority")
            names += [f"top{k}" for k in TOP_VOTES if len(self.by_record) > k]
            names += ["cascade"] if self.cascade is not None else []
        return names

    def members(self, policy: str, record: PoolRecord) -> list[str]:
        """The models ``policy`` calls for ``record``."""
        if policy.startswith("single:"):
            return [policy.split(":", 1)[1]]
        if policy == "static":
            return [self.static]
        if policy == "random":
            return [random_model(record, self.models, self.seed)]
        if policy == "oracle":
            return [oracle_model(record)]
        if policy == "majority":
            return list(self.models)
        if policy.startswith("top") and policy[3:].isdigit():
            return self.by_record[: int(policy[3:])]
        if policy == "cascade" and self.cascade is not None:
            return [*self.cascade.first, *(m for m in self.cascade.second if m not in self.cascade.first)]
        if policy.startswith(("profile:", "planned:")):
            return [policy]  # one routed call; the mesh chooses the models
        raise ValueError(
            f"unknown policy {policy!r}; known: single:<model>, static, random, oracle, majority, profile:<name>"
        )

    def call_quality(self, record: PoolRecord, call: Call) -> float:
        recorded = record.responses[call.model]
        if call.error or call.text != recorded.text:
            return 0.0
        return recorded.quality

    def routed_outcome(self, record: PoolRecord, call: Call) -> Outcome:
        """A routed call: the answer is the recorded text of one of the models the mesh asked."""
        answering = next(
            (m for m in call.models if m in record.responses and record.responses[m].text == call.text), None
        )
        failed = bool(call.error) or answering is None
        quality = record.responses[answering].quality if answering is not None and not call.error else 0.0
        return Outcome(record.id, quality, call.cost_usd, call.simulated_ms, call.mesh_ms, call.models, failed)

    def outcome(self, policy: str, record: PoolRecord, calls: dict[str, Call]) -> Outcome:
        if policy.startswith(("profile:", "planned:")):
            return self.routed_outcome(record, calls[policy])
        if policy == "cascade":
            return self.cascade_outcome(record, calls)
        members = self.members(policy, record)
        used = [calls[m] for m in members]
        failed = any(c.error or c.text != record.responses[c.model].text for c in used)
        cost = sum(c.cost_usd for c in used)
        simulated = max(c.simulated_ms for c in used)
        mesh = max(c.mesh_ms for c in used)
        if policy == "majority" or policy.startswith("top"):
            answers = {c.model: (record.responses[c.model].answer if not c.error else None) for c in used}
            winner, _share, _voters = vote(self.kind, answers, self.train_quality)
            reference = normalize_answer(self.kind, record.reference)
            quality = float(winner is not None and reference is not None and winner == reference)
        else:
            quality = self.call_quality(record, used[0])
        return Outcome(record.id, quality, cost, simulated, mesh, tuple(members), failed)

    def cascade_outcome(self, record: PoolRecord, calls: dict[str, Call]) -> Outcome:
        """The cascade on one record: the first wave always, the second (after it) only when asked."""
        assert self.cascade is not None
        answers = {
            m: None if c.error else normalize_answer(self.kind, record.responses[m].answer) for m, c in calls.items()
        }
        answer, escalated = self.cascade.answer(answers)
        asked = [*self.cascade.first, *(self.cascade.second if escalated else ())]
        used = [calls[m] for m in dict.fromkeys(asked)]
        failed = any(c.error or c.text != record.responses[c.model].text for c in used)
        reference = normalize_answer(self.kind, record.reference)
        quality = float(answer is not None and reference is not None and answer == reference)
        first_ms = max(calls[m].simulated_ms for m in self.cascade.first)
        second_ms = max(calls[m].simulated_ms for m in self.cascade.second) if escalated else 0.0
        mesh = max(c.mesh_ms for c in used)
        cost = sum(c.cost_usd for c in used)
        return Outcome(record.id, quality, cost, first_ms + second_ms, mesh, tuple(m.model for m in used), failed)

    def recorded_best_single(self) -> PolicyResult:
        """The best single model on the evaluated split from the recording alone (no calls, no latency).

        Used as the reference when a run evaluates no single model.
        """
        best: PolicyResult | None = None
        for model in self.models:
            outcomes = [
                Outcome(r.id, r.responses[model].quality, r.responses[model].cost_usd or 0.0, math.nan, math.nan,
                        (model,))
                for r in self.test
            ]  # fmt: skip
            result = summarize(f"single:{model} (recorded, not run)", outcomes)
            if best is None or (result.quality, -result.mean_cost_usd) > (best.quality, -best.mean_cost_usd):
                best = result
        assert best is not None
        return best

    def evaluate(self, policy: str, calls: dict[tuple[str, str], Call]) -> PolicyResult:
        """Metrics of ``policy`` over the test split, from calls keyed by (record id, model)."""
        outcomes = []
        for record in self.test:
            members = self.members(policy, record)
            outcomes.append(self.outcome(policy, record, {m: calls[(record.id, m)] for m in members}))
        return summarize(policy, outcomes)


def verdict(result: PolicyResult, best: PolicyResult) -> str:
    """One line: does ``result`` beat the best single model, and by how much in quality and cost?"""
    gain = (result.quality - best.quality) * 100
    ratio = result.mean_cost_usd / best.mean_cost_usd if best.mean_cost_usd else math.inf
    if gain > 1e-9 and ratio <= 1:
        word = "beats"
    elif gain > 1e-9:
        word = "is more accurate than, but dearer than,"
    elif gain > -1e-9 and ratio < 1:
        word = "matches, more cheaply,"
    elif gain > -1e-9:
        word = "ties with"
    else:
        word = "does not beat"
    return (
        f"{result.policy} {word} the best single model ({best.policy.removeprefix('single:')}): "
        f"{gain:+.2f} points, {ratio:.2f}x its mean cost"
    )


def dominated_by(result: PolicyResult, others: Sequence[PolicyResult]) -> list[PolicyResult]:
    """The single models and baselines among ``others`` at least as accurate and at most as dear as
    ``result``, better in one (most accurate first). A policy that costs nothing because no price is
    recorded dominates nothing: an unknown price is not free."""
    out = []
    for other in others:
        reachable = other.policy.startswith("single:") or other.policy in BASELINES
        if other is result or not reachable or other.mean_cost_usd <= 0:
            continue
        if (
            other.quality >= result.quality - 1e-12
            and other.mean_cost_usd <= result.mean_cost_usd
            and (other.quality > result.quality + 1e-12 or other.mean_cost_usd < result.mean_cost_usd)
        ):
            out.append(other)
    return sorted(out, key=lambda r: (-r.quality, r.mean_cost_usd))


def pareto_verdict(result: PolicyResult, others: Sequence[PolicyResult]) -> str:
    """One line: is ``result`` on the Pareto front of single models and baselines (quality vs mean cost)?"""
    better = dominated_by(result, others)
    if not better:
        return f"{result.policy} is on the Pareto front of single models and baselines"
    top = better[0]
    ratio = top.mean_cost_usd / result.mean_cost_usd if result.mean_cost_usd else math.inf
    return (
        f"{result.policy} is dominated by {top.policy.removeprefix('single:')} "
        f"({(top.quality - result.quality) * 100:+.2f} points at {ratio:.2f}x its mean cost)"
        + (f" and {len(better) - 1} more" if len(better) > 1 else "")
    )
