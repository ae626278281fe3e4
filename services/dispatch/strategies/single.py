"""One model, streamed as it writes; a routed plan falls back to the next-best model when it fails.

Each attempt is hedged (:mod:`~services.dispatch.strategies.hedged`) when a backup exists and hedging is
on: the backup is the next model of the fallback order, and an attempt that hedged uses up both.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from constellation import telemetry
from constellation.errors import ConstellationError, NotFound
from constellation.semconv import Outcome, Phase, Policy, Role
from services.dispatch.accounting import FALLBACKS
from services.dispatch.calls import CallResult, Run
from services.dispatch.events import CandidateProgress, Event, Finished, Stage
from services.dispatch.strategies import Toolkit, register, replaceable
from services.dispatch.strategies.hedged import HedgedCall


@register(Policy.REQUESTED, Policy.SINGLE)
class Single:
    """The plan's one member, then its reserves in order (none for a requested model)."""

    def __init__(self, tools: Toolkit) -> None:
        self.tools = tools

    async def run(self, run: Run) -> AsyncGenerator[Event, None]:
        plan = run.plan
        order = [plan.members[0]]
        if plan.policy != Policy.REQUESTED:
            order += plan.reserves()[: self.tools.config.max_fallbacks]
        problems: list[ConstellationError] = []
        results: list[CallResult] = []
        attempt = 0
        while True:
            member = order[attempt]
            backup = order[attempt + 1] if attempt + 1 < len(order) else None
            result = CallResult(member.model, member.quality, role=Role.FALLBACK if attempt else Role.MEMBER)
            delay = self.tools.accounting.hedge_delay_s(member.model) if backup is not None else 0.0
            hedge = CallResult(backup.model, backup.quality, role=Role.HEDGE) if backup and delay > 0 else None
            results += [result] if hedge is None else [result, hedge]
            attempt_events = self._attempt(run, result, hedge, delay, [plan] if attempt == 0 else [])
            try:
                async with aclosing(attempt_events) as events:
                    async for event in events:
                        yield event
                if hedge is not None and hedge.streamed and hedge.outcome != Outcome.CANCELLED:
                    result = hedge  # the hedge won
                break
            except ConstellationError as exc:
                step = 1 if hedge is None else 2
                streamed = result.streamed or (hedge is not None and hedge.streamed)
                if streamed or attempt + step >= len(order) or not replaceable(exc):
                    if isinstance(exc, NotFound) and plan.policy == Policy.REQUESTED:
                        await self.tools.require_model(member.model)
                    raise
                if run.remaining_s() <= 0:
                    raise
                FALLBACKS.labels(self.tools.accounting.label(member.model)).inc()
                problems.append(exc)
                yield CandidateProgress(member.model, Phase.FAILED, run.elapsed_ms(), error=exc)
                attempt += step
        yield _finished_event(run, result)
        yield _finished(run, result, results, problems)

    def _attempt(
        self, run: Run, result: CallResult, hedge: CallResult | None, delay: float, pre_events: Sequence[Event]
    ) -> AsyncGenerator[Event, None]:
        """One attempt's events: the member alone, or the member raced against its hedge after ``delay`` s."""
        caller = self.tools.caller
        if hedge is None:
            return caller.generate(result, run.query, run.ends_at, pre_events=pre_events)
        return HedgedCall(caller, run, result, hedge, delay, pre_events).events()


def _finished_event(run: Run, result: CallResult) -> CandidateProgress:
    """The answering call's ``finished`` event; its times join the stage breakdown."""
    end = result.ended_at
    first = result.first_at if result.first_at is not None else end
    run.stages.append(Stage("first_token", (first - result.started_at) * 1000))
    run.stages.append(Stage("generate", (end - first) * 1000))
    if result.simulated is not None:
        run.stages.append(Stage("first_token", result.simulated[0], simulated=True))
        run.stages.append(Stage("generate", result.simulated[1] - result.simulated[0], simulated=True))
    return CandidateProgress(
        result.model,
        Phase.FINISHED,
        (end - run.received_at) * 1000,
        result.input_tokens,
        result.output_tokens,
        result.cost_usd,
        text=result.text,
    )


def _finished(run: Run, result: CallResult, results: list[CallResult], problems: list[ConstellationError]) -> Finished:
    run.stages.append(Stage("total", (time.perf_counter() - run.received_at) * 1000))
    return Finished(
        text=result.text,
        input_tokens=sum(r.input_tokens for r in results),
        output_tokens=sum(r.output_tokens for r in results),
        cost_usd=sum(r.cost_usd for r in results),
        stages=run.stages,
        trace_id=telemetry.current_trace_id(),
        finish_reason=result.finish_reason,
        models=[result.model, *(r.model for r in results if r is not result)],
        problems=problems,
    )
