"""Error-bounded plans against a fake model server: certified early stop, the vote, re-planning, refusals."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from constellation.errors import FailedPrecondition, InvalidArgument, Unavailable
from constellation.planning import ConfusionMatrix
from constellation.semconv import Phase, Policy
from constellation.triton import Sampling
from services.dispatch import bounds
from services.dispatch.bounds import BoundedPlanner, Kind, choice_labels
from services.dispatch.config import ModelEntry
from services.dispatch.events import CandidateProgress, Event, Finished, PlanMade
from services.dispatch.planning import Planner, bounded_plan_event
from services.dispatch.query import Query, validate
from services.dispatch.routing import PoolModel
from services.dispatch.strategies.planned import sample_query
from tests.unit.dispatch_fakes import FakeGenerator, Script, config, run_plan

NEVER_S = 30.0
PROMPT = "Which is warmer?\nA) the sun\nB) the moon\nAnswer:"


def matrix(model: str, accuracy: float, labels: tuple[str, ...] = ("A", "B"), n: int = 200) -> ConfusionMatrix:
    """A symmetric matrix: ``accuracy`` right, the rest on the other label, no abstentions."""
    counts = np.zeros((len(labels), len(labels) + 1))
    for i in range(len(labels)):
        counts[i, i] = accuracy * n
        counts[i, (i + 1) % len(labels)] = (1 - accuracy) * n
    return ConfusionMatrix(model, labels, counts)


def kind(costs: dict[str, float], accuracy: float = 0.95, name: str = "two_way") -> Kind:
    matrices = {m: matrix(m, accuracy) for m in costs}
    return Kind(name, ("A", "B"), matrices, costs, {m: (1.0, 1.0) for m in costs})


def pool(*names: str, price: float = 1.0, unhealthy: Sequence[str] = ()) -> list[PoolModel]:
    return [PoolModel(n, price, price, healthy=n not in unhealthy) for n in names]


def query(alpha: float = 0.1, temperature: float | None = None) -> Query:
    sampling = Sampling(max_tokens=8, temperature=temperature)
    return Query(PROMPT, sampling, model="", time_budget_ms=0, request_tag="", alpha=alpha)


def made(alpha: float, costs: dict[str, float]) -> PlanMade:
    planner = BoundedPlanner({"two_way": kind(costs)})
    chosen = planner.plan(planner.kinds["two_way"], {"A": alpha, "B": alpha}, pool(*costs))
    return bounded_plan_event(chosen, query(alpha))


def progress(events: Sequence[Event], phase: Phase) -> list[str]:
    return [e.model for e in events if isinstance(e, CandidateProgress) and e.phase == phase]


def finished(events: Sequence[Event]) -> Finished:
    last = events[-1]
    assert isinstance(last, Finished)
    return last


async def test_the_vote_stops_once_the_straggler_cannot_change_it() -> None:
    plan = made(0.1, {"a": 1.0, "b": 1.0, "slow": 1.0, "dear": 50.0})
    assert plan.bounded is not None and plan.bounded.plan.members == ("a", "b", "slow")
    fake = FakeGenerator({"a": Script("A"), "b": Script("A"), "slow": Script("B", first_after_s=NEVER_S)})

    events = await run_plan(plan, fake, config(), answer_kind="choice")

    assert fake.cancelled == ["slow"]
    assert progress(events, Phase.CANCELLED) == ["slow"]
    done = finished(events)
    assert done.decision == "A" and done.text == "A"
    assert set(done.error_bounds) == {"A", "B"}
    assert max(done.error_bounds.values()) <= 0.1
    assert not done.uncertain and done.confidence > 0.99


async def test_a_split_vote_waits_for_the_deciding_call() -> None:
    plan = made(0.1, {"a": 1.0, "b": 1.0, "c": 1.0})
    fake = FakeGenerator({"a": Script("A"), "b": Script("B"), "c": Script("The answer is B", first_after_s=0.05)})

    events = await run_plan(plan, fake, config(), answer_kind="choice")

    assert fake.cancelled == []
    done = finished(events)
    assert done.decision == "B"
    assert done.text == "B"  # the first call that answered B
    assert sorted(done.models) == ["a", "b", "c"]


async def test_a_failed_call_that_could_have_mattered_leaves_the_answer_uncertain() -> None:
    plan = made(0.1, {"a": 1.0, "b": 1.0, "c": 1.0})
    fake = FakeGenerator({"a": Script("A"), "b": Script(fails=Unavailable("gone")), "c": Script("B")})

    events = await run_plan(plan, fake, config(), answer_kind="choice")

    assert progress(events, Phase.FAILED) == ["b"]
    done = finished(events)
    assert done.uncertain
    assert done.error_bounds == {}  # b's answer would have decided: the plan's bound does not apply
    assert [type(p) for p in done.problems] == [Unavailable]


async def test_a_failed_call_that_could_not_have_mattered_keeps_the_bound() -> None:
    plan = made(0.1, {"a": 1.0, "b": 1.0, "c": 1.0})
    fake = FakeGenerator({"a": Script("A"), "b": Script(fails=Unavailable("gone")), "c": Script("A")})

    done = finished(await run_plan(plan, fake, config(), answer_kind="choice"))

    assert done.decision == "A" and not done.uncertain
    assert max(done.error_bounds.values()) <= 0.1
    assert [type(p) for p in done.problems] == [Unavailable]


def test_a_plan_is_cached_and_replanned_when_the_pool_changes() -> None:
    planner = BoundedPlanner({"two_way": kind({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0})})
    two_way = planner.kinds["two_way"]
    alpha = {"A": 0.1, "B": 0.1}
    first = planner.plan(two_way, alpha, pool("a", "b", "c", "d"))
    assert planner.plan(two_way, alpha, pool("a", "b", "c", "d")) is first
    assert planner.solves == 1

    dearer = [PoolModel("a", 30.0, 30.0), *pool("b", "c", "d")]
    repriced = planner.plan(two_way, alpha, dearer)
    assert planner.solves == 2 and "a" not in repriced.plan.members

    unhealthy = planner.plan(two_way, alpha, pool("a", "b", "c", "d", unhealthy=["b"]))
    assert planner.solves == 3 and "b" not in unhealthy.plan.members

    planner.reload({"two_way": kind({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0})})
    planner.plan(two_way, alpha, pool("a", "b", "c", "d"))
    assert planner.solves == 4


def test_repeated_samples_are_planned_only_when_sampling_is_random() -> None:
    planner = BoundedPlanner({"two_way": kind({"a": 1.0, "b": 5.0, "c": 5.0})})
    settings = config(max_samples=3, models={m: ModelEntry(triton_model=m) for m in "abc"})
    dispatch_planner = Planner(settings, "fake:0", bounds=planner)

    greedy = dispatch_planner.plan(query(0.1))
    hot = dispatch_planner.plan(query(0.1, temperature=0.7))

    assert greedy.policy == Policy.PLANNED
    assert greedy.bounded is not None and greedy.bounded.plan.counts == (1, 1, 1)
    assert hot.bounded is not None and hot.bounded.plan.members == ("a",) and hot.bounded.plan.counts == (3,)


async def test_repeated_samples_are_separate_calls_with_their_own_seeds() -> None:
    planner = BoundedPlanner({"two_way": kind({"a": 1.0, "b": 5.0, "c": 5.0})})
    settings = config(max_samples=3, models={m: ModelEntry(triton_model=m) for m in "abc"})
    hot = Planner(settings, "fake:0", bounds=planner).plan(query(0.1, temperature=0.7))
    fake = FakeGenerator({"a": Script("A", first_after_s=0.01)})

    events = await run_plan(hot, fake, settings, answer_kind="choice")

    assert len(fake.completed) + len(fake.cancelled) == 3  # three calls of one model, none lost
    assert finished(events).decision == "A"
    seeded = query(0.1, temperature=0.7)
    seeded = dataclasses.replace(seeded, sampling=dataclasses.replace(seeded.sampling, seed=7))
    assert [sample_query(seeded, i).sampling.seed for i in range(3)] == [7, 8, 9]
    assert sample_query(query(0.1, temperature=0.7), 2).sampling.seed is None


def test_bounded_queries_are_refused_without_matrices_or_a_matching_kind() -> None:
    settings = config(models={"a": ModelEntry(triton_model="a")})
    with pytest.raises(FailedPrecondition, match="train confusion"):
        Planner(settings, "fake:0").plan(query(0.1))
    four_way = Query("Pick one\nA) x\nB) y\nC) z\nD) w", Sampling(max_tokens=8), "", 0, "", alpha=0.1)
    with pytest.raises(FailedPrecondition, match="two_way"):
        Planner(settings, "fake:0", bounds=BoundedPlanner({"two_way": kind({"a": 1.0})})).plan(four_way)


def test_choice_labels_reads_the_last_question_only() -> None:
    few_shot = "Q\nA) a\nB) b\nC) c\nAnswer: A\n\nWho?\nA) Kyle\nB) Logan\nAnswer:"
    assert choice_labels(few_shot) == ("A", "B")
    assert choice_labels("What is 2 + 2?") == ()
    planner = BoundedPlanner({"two": kind({"a": 1.0}, name="two"), "four": Kind("four", tuple("ABCD"), {}, {}, {})})
    assert planner.kind_of("Q\nA) x\nB) y\nC) z") is planner.kinds["four"]
    assert planner.kind_of(PROMPT) is planner.kinds["two"]
    assert planner.kind_of("Q\nA) x\nE) y") is None


def test_request_bounds_are_validated() -> None:
    common = {
        "prompt": PROMPT,
        "max_tokens": 8,
        "temperature": None,
        "top_p": None,
        "stop": [],
        "seed": None,
        "time_budget_ms": 0,
        "request_tag": "",
        "max_prompt_chars": 1000,
        "max_tokens_limit": 64,
        "default_max_tokens": 8,
    }
    with pytest.raises(InvalidArgument) as bad:
        validate(model="a", alpha=1.5, label_alpha={"A": 0.0}, **common)  # type: ignore[arg-type]
    fields = [v.field for v in bad.value.violations]
    assert fields == ["alpha", "label_alpha[A]", "alpha"]
    accepted = validate(model="", alpha=0.1, label_alpha={"B": 0.02}, **common)  # type: ignore[arg-type]
    assert accepted.alpha_for(("A", "B")) == {"A": 0.1, "B": 0.02}


def test_the_artifact_round_trips(tmp_path: Path) -> None:
    fitted = kind({"a": 0.5, "b": 0.25})
    bounds.save([fitted], tmp_path)
    loaded = bounds.load(tmp_path)["two_way"]
    assert loaded.labels == fitted.labels and loaded.costs == fitted.costs
    assert np.array_equal(loaded.matrices["a"].counts, fitted.matrices["a"].counts)


def test_the_cost_follows_the_registry_price() -> None:
    fitted = kind({"a": 0.5})
    assert bounds.call_cost(fitted, PoolModel("a", 2.0, 2.0)) == pytest.approx(1.0)
    assert bounds.call_cost(fitted, PoolModel("a", 0.0, 0.0)) == pytest.approx(0.5)
