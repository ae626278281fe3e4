"""The single strategy against a fake model server: hedging and fallback, without Triton."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from constellation.errors import InternalError, InvalidArgument, Unavailable
from constellation.semconv import Phase
from services.dispatch.events import CandidateProgress, Event, Finished, PlanMade
from tests.unit.dispatch_fakes import FakeGenerator, Script, config, plan, planned, run_plan

HEDGE_AFTER_MS = 50.0


def progress(events: Sequence[Event], phase: Phase) -> list[str]:
    return [e.model for e in events if isinstance(e, CandidateProgress) and e.phase == phase]


def finished(events: Sequence[Event]) -> Finished:
    last = events[-1]
    assert isinstance(last, Finished)
    return last


async def test_a_slow_member_is_hedged_after_its_delay_and_the_loser_is_cancelled() -> None:
    fake = FakeGenerator({"slow": Script("slow answer", first_after_s=30.0), "quick": Script("quick answer")})
    settings = config(hedging=True, hedge_after_ms=HEDGE_AFTER_MS, hedge_min_samples=1000)
    events = await run_plan(plan("single", [planned("slow")], [planned("quick", chosen=False)]), fake, settings)

    assert fake.started["quick"] - fake.started["slow"] >= HEDGE_AFTER_MS / 1000
    assert fake.cancelled == ["slow"]
    assert progress(events, Phase.CANCELLED) == ["slow"]
    done = finished(events)
    assert done.text == "quick answer"
    assert done.models == ["quick", "slow"]
    assert isinstance(events[0], PlanMade)


async def test_no_hedge_is_sent_when_the_member_answers_before_the_delay() -> None:
    fake = FakeGenerator({"fast": Script("fast answer"), "backup": Script("backup answer")})
    settings = config(hedging=True, hedge_after_ms=10_000.0, hedge_min_samples=1000)
    events = await run_plan(plan("single", [planned("fast")], [planned("backup", chosen=False)]), fake, settings)

    assert list(fake.started) == ["fast"]
    assert fake.cancelled == []
    assert finished(events).text == "fast answer"


async def test_a_failed_member_is_replaced_by_the_next_reserve() -> None:
    fake = FakeGenerator({"broken": Script(fails=Unavailable("down")), "good": Script("good answer")})
    events = await run_plan(plan("single", [planned("broken")], [planned("good", chosen=False)]), fake, config())

    assert progress(events, Phase.FAILED) == ["broken"]
    done = finished(events)
    assert done.text == "good answer"
    assert done.models == ["good", "broken"]
    assert [type(p) for p in done.problems] == [Unavailable]


async def test_a_request_fault_is_not_retried_on_another_model() -> None:
    fake = FakeGenerator({"picky": Script(fails=InvalidArgument("bad stop")), "good": Script("good answer")})
    with pytest.raises(InvalidArgument):
        await run_plan(plan("single", [planned("picky")], [planned("good", chosen=False)]), fake, config())
    assert list(fake.started) == ["picky"]


async def test_a_requested_model_has_no_fallback() -> None:
    fake = FakeGenerator({"named": Script(fails=Unavailable("down")), "good": Script("good answer")})
    with pytest.raises(Unavailable):
        await run_plan(plan("requested", [planned("named")], [planned("good", chosen=False)]), fake, config())
    assert list(fake.started) == ["named"]


@pytest.mark.parametrize("hedging", [False, True])
async def test_a_failure_inside_the_model_is_not_retried_on_another_model(hedging: bool) -> None:
    """INTERNAL (a prompt past the context, a crash in the backend) would only break the next model too."""
    fake = FakeGenerator({"broken": Script(fails=InternalError("boom")), "good": Script("good answer")})
    settings = config(hedging=hedging, hedge_after_ms=10_000.0, hedge_min_samples=1000)
    with pytest.raises(InternalError):
        await run_plan(plan("single", [planned("broken")], [planned("good", chosen=False)]), fake, settings)
    assert list(fake.started) == ["broken"]
