"""Error-bounded plans: every call of the plan at once, the likelihood-ratio vote decides, certified stop.

The plan (``PlanMade.bounded``) names each member and how many calls it gets. All calls start together;
each answer is read as a choice letter and added to the vote. As soon as
:func:`~constellation.planning.certified_stop` says that no answers of the calls still running could
change the decision, those calls are cancelled inside Triton (the decision is exactly the one waiting
would give, so the plan's bound still holds). The final event carries the decided label, the plan's
certified bound per label and the cost of the calls made.

A call that fails is not replaced, and calls still running when the request's time runs out are
cancelled. The decision keeps the plan's bound only if no answer of those calls could have changed it
(the same certificate as the early stop, with failed calls counted as unknown answers); otherwise it is
marked uncertain and carries no certified bound (``error_bounds`` stays empty). Failures are reported
among the problems either way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator

from opentelemetry import trace

from constellation import semconv, telemetry
from constellation.errors import ConstellationError, DeadlineExceeded, InternalError
from constellation.ml.answers import extract_answer
from constellation.planning import certified_stop
from constellation.semconv import CancelReason, Outcome, Phase, Policy
from constellation.tasks import cancel_and_wait
from services.dispatch.accounting import EARLY_STOPS
from services.dispatch.bounds import BoundedPlan
from services.dispatch.calls import CallResult, Run
from services.dispatch.events import CandidateProgress, Delta, Event, Finished, Stage
from services.dispatch.generation import MemberQueue
from services.dispatch.query import Query
from services.dispatch.strategies import Toolkit, register


def sample_query(query: Query, sample: int) -> Query:
    """The query of a model's ``sample``-th call: a seeded query gets a different seed per sample."""
    if sample == 0 or query.sampling.seed is None:
        return query
    return dataclasses.replace(query, sampling=dataclasses.replace(query.sampling, seed=query.sampling.seed + sample))


class Calls:
    """The calls of one error-bounded plan, their answers so far, and the decision they settle."""

    def __init__(self, bounded: BoundedPlan) -> None:
        self.bounded = bounded
        self.answers: list[tuple[str, str | None]] = []
        self.answered: list[CallResult] = []
        self.running: dict[int, CallResult] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.results: list[CallResult] = []
        self.problems: list[ConstellationError] = []
        self.failed: list[CallResult] = []
        self.certified = False
        """True once the decision is the one the whole plan gives (settled early, or every call answered)."""

    def settled(self) -> bool:
        """Whether no answers of the calls still running, nor of the calls that failed, could change the
        vote's decision: the decision is then the one the whole plan would give, and its bound holds."""
        remaining = [r.model for r in self.running.values()] + [r.model for r in self.failed]
        return bool(self.answers) and certified_stop(self.bounded.vote, self.answers, remaining)

    def ended(self, result: CallResult, elapsed_ms: float) -> CandidateProgress:
        """Takes in one call's end: an answer joins the vote, a failure the problems."""
        key = next(k for k, r in self.running.items() if r is result)
        self.running.pop(key)
        self.tasks.pop(key, None)
        if result.error is not None:
            self.problems.append(result.error)
            self.failed.append(result)
            return CandidateProgress(result.model, Phase.FAILED, elapsed_ms, error=result.error)
        result.answer = extract_answer("choice", result.text)
        self.answers.append((result.model, result.answer))
        self.answered.append(result)
        return CandidateProgress(
            result.model,
            Phase.FINISHED,
            elapsed_ms,
            result.input_tokens,
            result.output_tokens,
            result.cost_usd,
            text=result.text,
        )


@register(Policy.PLANNED)
class Planned:
    """Runs an error-bounded plan (see the module docstring)."""

    def __init__(self, tools: Toolkit) -> None:
        self.tools = tools

    async def run(self, run: Run) -> AsyncGenerator[Event, None]:
        bounded = run.plan.bounded
        if bounded is None:
            raise InternalError("a planned policy without an error-bounded plan")
        yield run.plan
        calls = Calls(bounded)
        queue: MemberQueue = asyncio.Queue()
        started = time.perf_counter()
        self._start(run, calls, queue)
        async for event in self._collect(run, calls, queue):
            yield event
        run.stages.append(Stage("fanout", (time.perf_counter() - started) * 1000))
        if not calls.answers:
            if calls.problems:
                raise calls.problems[-1]
            raise DeadlineExceeded("no call of the error-bounded plan answered within the request's time budget")
        simulated = max((r.simulated_total_ms for r in calls.answered), default=0.0)
        if simulated:
            run.stages.append(Stage("first_token", simulated, simulated=True))
            run.stages.append(Stage("generate", 0.0, simulated=True))
        finished = self._finished(run, calls)
        yield Delta(finished.text, finished.models[0])
        yield finished

    def _start(self, run: Run, calls: Calls, queue: MemberQueue) -> None:
        """Sends every call of the plan (a member's repeated samples with their own seeds)."""
        plan = calls.bounded.plan
        quality = {m.model: m.quality for m in run.plan.members}
        index = 0
        for model, count in zip(plan.members, plan.counts, strict=True):
            for sample in range(count):
                result = CallResult(model, quality.get(model, 0.0))
                calls.results.append(result)
                calls.running[index] = result
                calls.tasks[index] = asyncio.create_task(
                    self.tools.caller.member(result, sample_query(run.query, sample), run.ends_at, queue)
                )
                index += 1

    async def _collect(self, run: Run, calls: Calls, queue: MemberQueue) -> AsyncGenerator[Event, None]:
        """Takes in the calls as they end until the decision is certified, all ended, or time ran out."""
        try:
            while calls.running:
                remaining = run.remaining_s()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
                if isinstance(item, CandidateProgress):
                    yield item
                    continue
                yield calls.ended(item, run.elapsed_ms())
                if self.tools.config.early_stop and calls.settled():
                    calls.certified = True
                    break
        finally:
            for result in calls.running.values():
                result.cancel_reason = CancelReason.QUORUM
            await cancel_and_wait(calls.tasks.values())
        if not calls.running and calls.settled():
            calls.certified = True  # every call ended, and the failed ones (if any) could not have mattered
        if calls.running and calls.certified:
            EARLY_STOPS.labels(Policy.PLANNED).inc()
            for result in calls.running.values():
                result.outcome = Outcome.CANCELLED
                yield CandidateProgress(result.model, Phase.CANCELLED, run.elapsed_ms())

    def _finished(self, run: Run, calls: Calls) -> Finished:
        """The decision, its certified bounds, and the usage of every call made."""
        vote = calls.bounded.vote
        decision = vote.decide(calls.answers)
        confidence = vote.posterior(calls.answers)[decision]
        answering = next((r for r in calls.answered if r.answer == decision), None)
        run.stages.append(Stage("total", run.elapsed_ms()))
        span = trace.get_current_span()
        span.set_attribute(semconv.FANOUT_MEMBERS, len(calls.results))
        span.set_attribute(semconv.FANOUT_EARLY_STOP, bool(calls.running))
        span.set_attribute(semconv.FUSED_CONFIDENCE, confidence)
        span.set_attribute(semconv.FUSED_METHOD, "likelihood_vote")
        first = answering.model if answering is not None else calls.answered[0].model
        models = list(dict.fromkeys([first, *(r.model for r in calls.results)]))
        return Finished(
            text=answering.text if answering is not None else decision,
            input_tokens=sum(r.input_tokens for r in calls.results),
            output_tokens=sum(r.output_tokens for r in calls.results),
            cost_usd=sum(r.cost_usd for r in calls.results),
            stages=run.stages,
            trace_id=telemetry.current_trace_id(),
            finish_reason=answering.finish_reason if answering is not None else "stop",
            models=models,
            confidence=confidence,
            uncertain=not calls.certified or answering is None,
            problems=calls.problems,
            decision=decision,
            error_bounds=dict(calls.bounded.plan.bound_per_label) if calls.certified else {},
        )
