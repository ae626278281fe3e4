"""Fan-out waves against a fake model server: quorum stops, cascades, fallbacks, without Triton."""

from __future__ import annotations

from collections.abc import Sequence

from constellation.errors import DeadlineExceeded, InternalError, Unavailable
from constellation.semconv import Phase
from services.dispatch.events import CandidateProgress, Event, Finished
from tests.unit.dispatch_fakes import FakeGenerator, Script, config, plan, planned, run_plan

NEVER_S = 30.0


def progress(events: Sequence[Event], phase: Phase) -> list[str]:
    return [e.model for e in events if isinstance(e, CandidateProgress) and e.phase == phase]


def finished(events: Sequence[Event]) -> Finished:
    last = events[-1]
    assert isinstance(last, Finished)
    return last


async def test_a_quorum_stops_the_wave_and_cancels_the_straggler() -> None:
    fake = FakeGenerator(
        {
            "a": Script("The answer is 4"),
            "b": Script("It is 4"),
            "slow": Script("The answer is 5", first_after_s=NEVER_S),
        }
    )
    made = plan("vote", [planned("a"), planned("b"), planned("slow")], quorum=2)
    events = await run_plan(made, fake, config())

    assert fake.cancelled == ["slow"]
    assert progress(events, Phase.CANCELLED) == ["slow"]
    assert sorted(progress(events, Phase.FINISHED)) == ["a", "b"]
    done = finished(events)
    assert done.text in ("The answer is 4", "It is 4")
    assert "slow" in done.models


async def test_without_early_stop_the_wave_waits_for_every_member() -> None:
    fake = FakeGenerator({"a": Script("4"), "b": Script("4"), "c": Script("5", first_after_s=0.05)})
    events = await run_plan(
        plan("vote", [planned("a"), planned("b"), planned("c")], quorum=2), fake, config(early_stop=False)
    )

    assert fake.cancelled == []
    assert sorted(progress(events, Phase.FINISHED)) == ["a", "b", "c"]
    assert finished(events).text == "4"


async def test_a_cascade_escalates_when_the_first_wave_disagrees() -> None:
    fake = FakeGenerator({"a": Script("4"), "b": Script("5"), "strong": Script("7")})
    made = plan("cascade", [planned("a"), planned("b"), planned("strong", wave=1)], quorum=2)
    events = await run_plan(made, fake, config())

    assert "strong" in fake.started
    assert finished(events).text == "7"


async def test_a_cascade_stops_when_the_first_wave_agrees() -> None:
    fake = FakeGenerator({"a": Script("4"), "b": Script("4"), "strong": Script("7")})
    made = plan("cascade", [planned("a"), planned("b"), planned("strong", wave=1)], quorum=2)
    events = await run_plan(made, fake, config())

    assert "strong" not in fake.started
    assert finished(events).text == "4"


async def test_a_failed_member_is_replaced_by_a_reserve() -> None:
    fake = FakeGenerator({"a": Script("4"), "down": Script(fails=Unavailable("gone")), "spare": Script("4")})
    made = plan("vote", [planned("a"), planned("down")], [planned("spare", chosen=False)], quorum=2)
    events = await run_plan(made, fake, config())

    assert progress(events, Phase.FAILED) == ["down"]
    assert "spare" in progress(events, Phase.FINISHED)
    done = finished(events)
    assert done.text == "4"
    assert [type(p) for p in done.problems] == [Unavailable]


async def test_a_cascade_whose_last_wave_runs_out_of_time_answers_with_the_first_wave() -> None:
    fake = FakeGenerator({"a": Script("4"), "b": Script("5"), "strong": Script("7", first_after_s=NEVER_S)})
    made = plan("cascade", [planned("a"), planned("b"), planned("strong", wave=1)], quorum=2)
    events = await run_plan(made, fake, config(), budget_s=0.3)

    assert fake.cancelled == ["strong"]
    done = finished(events)
    assert done.text in ("4", "5")
    assert done.uncertain
    assert isinstance(done.problems[0], DeadlineExceeded)
    assert "wave 2" in done.problems[0].message


async def test_a_cascade_whose_last_wave_fails_answers_with_the_first_wave() -> None:
    dead = Unavailable("the model server is not reachable")
    fake = FakeGenerator({"a": Script("4"), "b": Script("5"), "strong": Script(fails=dead)})
    made = plan("cascade", [planned("a"), planned("b", quality=0.5), planned("strong", wave=1)], quorum=2)
    events = await run_plan(made, fake, config())

    done = finished(events)
    assert done.text == "4"  # the better predicted of the two first-wave answers
    assert done.uncertain
    assert isinstance(done.problems[0], Unavailable)
    assert done.problems[0].reason == "WAVE_FAILED"


async def test_a_vote_cut_by_the_time_budget_answers_with_the_members_that_finished() -> None:
    fake = FakeGenerator(
        {"a": Script("4"), "b": Script("5", first_after_s=0.02), "slow": Script("4", first_after_s=NEVER_S)}
    )
    made = plan("vote", [planned("a"), planned("b"), planned("slow")])
    events = await run_plan(made, fake, config(), budget_s=0.3)

    done = finished(events)
    assert done.text in ("4", "5")
    assert done.uncertain
    assert isinstance(done.problems[0], DeadlineExceeded)
    assert fake.cancelled == ["slow"]


async def test_a_settled_cascade_is_not_marked_uncertain() -> None:
    fake = FakeGenerator({"a": Script("4"), "b": Script("4"), "strong": Script("7")})
    events = await run_plan(plan("cascade", [planned("a"), planned("b"), planned("strong", wave=1)]), fake, config())

    done = finished(events)
    assert not done.uncertain
    assert done.problems == []


async def test_a_member_that_fails_inside_the_model_is_not_replaced() -> None:
    fake = FakeGenerator({"a": Script("4"), "broken": Script(fails=InternalError("boom")), "spare": Script("4")})
    made = plan("vote", [planned("a"), planned("broken")], [planned("spare", chosen=False)])
    events = await run_plan(made, fake, config())

    assert "spare" not in fake.started
    assert finished(events).text == "4"
