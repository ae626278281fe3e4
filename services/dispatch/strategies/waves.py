"""Fan-out in waves: the plan's members asked concurrently, wave by wave, then ranked, fused or voted.

A ``vote`` plan stops a wave when the leading answer can no longer be overtaken by the members still
running (or ``plan.quorum`` members agree); a ``cascade`` plan escalates to its next wave as soon as the
first wave disagrees, and stops when it agrees; a ``rank`` plan waits for its members and lets the
ranking service pick. Members still running when a wave is settled are cancelled inside Triton. A member
that fails is replaced by the next-best reserve model while time is left, when another model may succeed
(:func:`~services.dispatch.strategies.replaceable`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import replace

from opentelemetry import trace

from constellation import semconv
from constellation.errors import ConstellationError, DeadlineExceeded
from constellation.ml.answers import extract_answer
from constellation.ml.vote import Ballot, tally, weight
from constellation.semconv import CancelReason, Outcome, Phase, Policy, Role
from constellation.tasks import cancel_and_wait
from services.dispatch.accounting import EARLY_STOPS, ESCALATIONS, FALLBACKS
from services.dispatch.calls import CallResult, Run
from services.dispatch.events import CandidateProgress, Event, Finished, PlanMade, Stage
from services.dispatch.generation import MemberQueue, ModelCaller
from services.dispatch.routing import PlannedModel
from services.dispatch.strategies import Toolkit, register, replaceable

UNKNOWN_QUALITY_WEIGHT = 0.6
"""The predicted quality a vote assumes for a member whose quality is unknown (0)."""


def settled(plan: PlanMade, answered: list[CallResult], running: list[CallResult], last_wave: bool) -> bool | None:
    """True: the wave's answer is settled; False: escalate now; None: wait for more members."""
    if plan.policy == Policy.CASCADE and not last_wave:
        first = answered[0].answer
        if first is None or any(r.answer != first for r in answered):
            return False  # disagreement: the next wave decides
        return True if not running else None
    if not running:
        return True
    outcome = tally([Ballot(r.answer, r.quality, i) for i, r in enumerate(answered)])
    if outcome.answer is None:
        return None
    if plan.quorum and outcome.votes_for >= plan.quorum:
        return True
    lead = sum(weight(answered[i].quality or UNKNOWN_QUALITY_WEIGHT) for i in outcome.winners)
    others = sum(weight(r.quality or UNKNOWN_QUALITY_WEIGHT) for r in answered if r.answer != outcome.answer)
    pending = sum(weight(r.quality or UNKNOWN_QUALITY_WEIGHT) for r in running)
    return True if lead > others + pending else None


class Wave:
    """One wave of a fan-out: its members run as tasks, their results arrive on a queue.

    Args:
        caller: Calls the models.
        run: The request.
        queue: Where members report (shared by the waves of one request).
        reserves: Models that replace failed members, best first; taken from as members fail.
        results: Every call of the request; this wave's calls are added.
        problems: Failures the request survived so far; this wave's are added.
        early_stop: Whether a wave may end before all its members finished.
        last: Whether this is the plan's last wave.
    """

    def __init__(
        self,
        caller: ModelCaller,
        run: Run,
        queue: MemberQueue,
        reserves: list[PlannedModel],
        results: list[CallResult],
        problems: list[ConstellationError],
        *,
        early_stop: bool,
        last: bool,
    ):
        self.caller = caller
        self.run = run
        self.queue = queue
        self.reserves = reserves
        self.results = results
        self.problems = problems
        self.early_stop = early_stop
        self.last = last
        self.running: dict[str, CallResult] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.answered: list[CallResult] = []
        self.settled: bool | None = None
        self.stopped_early = False

    def start(self, member: PlannedModel, role: Role) -> None:
        """Sends one member's request."""
        result = CallResult(member.model, member.quality, role=role)
        self.results.append(result)
        self.running[member.model] = result
        self.tasks[member.model] = asyncio.create_task(
            self.caller.member(result, self.run.query, self.run.ends_at, self.queue)
        )

    async def events(self, members: list[PlannedModel]) -> AsyncGenerator[Event, None]:
        """Runs the wave until it is settled, every member ended, or the deadline passed."""
        for member in members:
            self.start(member, Role.MEMBER)
        try:
            while self.running:
                remaining = self.run.remaining_s()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
                if isinstance(item, CandidateProgress):
                    yield item
                    continue
                yield self._ended(item)
                if self.settled is not None:
                    break
        finally:
            for result in self.running.values():
                result.cancel_reason = CancelReason.QUORUM
            await cancel_and_wait(self.tasks.values())
        if self.running:
            self.stopped_early = True
            EARLY_STOPS.labels(self.run.plan.policy).inc()
            for model, result in self.running.items():
                result.outcome = Outcome.CANCELLED
                yield CandidateProgress(model, Phase.CANCELLED, self.run.elapsed_ms())

    def _ended(self, result: CallResult) -> CandidateProgress:
        """Takes in one member's end: a failure starts a reserve, an answer may settle the wave."""
        self.running.pop(result.model, None)
        self.tasks.pop(result.model, None)
        elapsed = self.run.elapsed_ms()
        if result.error is not None:
            self.problems.append(result.error)
            if self.reserves and self.run.remaining_s() > 0 and replaceable(result.error):
                FALLBACKS.labels(self.caller.accounting.label(result.model)).inc()
                self.start(self.reserves.pop(0), Role.FALLBACK)
            return CandidateProgress(result.model, Phase.FAILED, elapsed, error=result.error)
        result.answer = extract_answer(self.run.answer_kind, result.text)
        self.answered.append(result)
        if self.early_stop or not self.running:
            self.settled = settled(self.run.plan, self.answered, list(self.running.values()), self.last)
        return CandidateProgress(
            result.model,
            Phase.FINISHED,
            elapsed,
            result.input_tokens,
            result.output_tokens,
            result.cost_usd,
            text=result.text,
        )


@register(Policy.VOTE, Policy.CASCADE, Policy.RANK)
class Waves:
    """The plan's waves in order; the deciding wave's answers go to aggregation.

    Finished answers are never thrown away: when a wave ends with no answer (its time ran out, or every
    member failed) after an earlier wave answered, the earlier answers decide; and when the time budget
    cuts a wave before it was settled, its answers so far decide. Either way the answer is marked
    uncertain and ``Finished.problems`` starts with what failed.
    """

    def __init__(self, tools: Toolkit) -> None:
        self.tools = tools

    async def run(self, run: Run) -> AsyncGenerator[Event, None]:
        yield run.plan
        queue: MemberQueue = asyncio.Queue()
        results: list[CallResult] = []
        problems: list[ConstellationError] = []
        reserves = run.plan.reserves()
        waves = run.plan.waves()
        deciding: list[CallResult] = []
        earlier: list[CallResult] = []
        degraded: ConstellationError | None = None
        simulated_ms = 0.0
        fanout_start = time.perf_counter()
        early = False
        for index, members in enumerate(waves):
            wave = Wave(
                self.tools.caller,
                run,
                queue,
                reserves,
                results,
                problems,
                early_stop=self.tools.config.early_stop,
                last=index == len(waves) - 1,
            )
            async with aclosing(wave.events(members)) as events:
                async for event in events:
                    yield event
            early = early or wave.stopped_early
            if wave.answered:
                simulated_ms += max(r.simulated_total_ms for r in wave.answered)
            if wave.settled or wave.last or run.remaining_s() <= 0:
                deciding, degraded = _deciding(run, wave, index, earlier, problems)
                break
            earlier += wave.answered
            ESCALATIONS.inc()
        if not deciding:
            if problems:
                raise problems[-1]
            raise DeadlineExceeded("no model of the plan answered within the request's time budget")
        run.stages.append(Stage("fanout", (time.perf_counter() - fanout_start) * 1000))
        if simulated_ms:
            run.stages.append(Stage("first_token", simulated_ms, simulated=True))
            run.stages.append(Stage("generate", 0.0, simulated=True))
        span = trace.get_current_span()
        span.set_attribute(semconv.FANOUT_MEMBERS, len(results))
        span.set_attribute(semconv.FANOUT_EARLY_STOP, early)
        if degraded is not None:
            problems.insert(0, degraded)
            span.add_event("answer_from_unsettled_waves", {"error": str(degraded)})
        async for event in self.tools.aggregator.answer(run, deciding, results, problems):
            if degraded is not None and isinstance(event, Finished):
                event = replace(event, uncertain=True)
            yield event


def _deciding(
    run: Run, wave: Wave, index: int, earlier: list[CallResult], problems: list[ConstellationError]
) -> tuple[list[CallResult], ConstellationError | None]:
    """The answers that decide once ``wave`` (number ``index``) ended, and why they are uncertain (None: they are not).

    A settled wave decides alone. A wave cut by the time budget decides with what it has; a wave with no
    answer at all hands the decision back to the earlier waves' answers (a cascade keeps wave 1's answer
    when wave 2 cannot finish or Triton dies under it).
    """
    if wave.settled:
        return wave.answered, None
    out_of_time = run.remaining_s() <= 0
    if wave.answered:
        if not out_of_time or not wave.stopped_early:
            return wave.answered, None
        cut = DeadlineExceeded(
            f"the time budget ran out before wave {index + 1} of the plan was settled; "
            "the answer comes from the members that finished",
            reason="WAVE_CUT_BY_BUDGET",
        )
        return wave.answered, cut
    if not earlier:
        return [], None
    why = (
        f"wave {index + 1} of the plan could not finish within the time budget"
        if out_of_time or not problems
        else f"wave {index + 1} of the plan failed ({problems[-1].message})"
    )
    cause: ConstellationError
    if out_of_time or not problems:
        cause = DeadlineExceeded(f"{why}; the answer comes from earlier waves", reason="WAVE_TIMED_OUT")
    else:
        cause = type(problems[-1])(f"{why}; the answer comes from earlier waves", reason="WAVE_FAILED")
    return earlier, cause
