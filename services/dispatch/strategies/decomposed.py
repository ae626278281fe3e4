"""Decomposition: a multi-part prompt answered as independent sub-queries, concurrently, in order.

The plan (``Policy.DECOMPOSED``) holds the parts :func:`constellation.planning.split` found. Each part is
a whole Ask of its own (classified, planned and executed by the strategy its own plan picks) running
concurrently with the others; their model progress is forwarded as it happens, and their answers are
streamed in the prompt's order, part ``i`` as soon as parts ``0..i`` are done. The final event carries
one entry per part. A part that fails does not fail the others: its entry carries the error, the answer
says so in its place, and the answer is marked uncertain; only when every part fails does the request
fail. Parts inherit the request's settings (an error bound too, so every part must then be closed-answer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

from constellation import telemetry
from constellation.errors import ConstellationError, InternalError
from constellation.semconv import Policy
from constellation.tasks import cancel_and_wait
from services.dispatch.calls import Run
from services.dispatch.events import CandidateProgress, Delta, Event, Finished, PartResult, PlanMade, Stage
from services.dispatch.query import Query
from services.dispatch.strategies import Toolkit, register

AskPart = Callable[[Query, float, float], AsyncGenerator[Event, None]]
"""Runs one sub-query as a whole Ask: (query, seconds left, received_at) -> its events."""


def part_heading(index: int, total: int) -> str:
    """The line that introduces part ``index`` (0-based) of ``total`` in the joined answer."""
    return f"{index + 1}. " if total > 1 else ""


class Part:
    """One sub-query in flight: its events are forwarded, its end recorded."""

    def __init__(self, index: int, query: Query) -> None:
        self.index = index
        self.query = query
        self.finished: Finished | None = None
        self.policy = ""
        self.error: ConstellationError | None = None

    @property
    def ended(self) -> bool:
        return self.finished is not None or self.error is not None

    def result(self) -> PartResult:
        done = self.finished
        if done is None:
            return PartResult(self.index, self.query.prompt, "", self.policy, [], error=self.error)
        return PartResult(
            self.index,
            self.query.prompt,
            done.text,
            self.policy,
            list(done.models),
            done.input_tokens,
            done.output_tokens,
            done.cost_usd,
        )


@register(Policy.DECOMPOSED)
class Decomposed:
    """Runs the parts of a decomposed prompt (see the module docstring)."""

    def __init__(self, tools: Toolkit) -> None:
        self.tools = tools

    async def run(self, run: Run) -> AsyncGenerator[Event, None]:
        ask = self.tools.ask_part
        if ask is None:
            raise InternalError("decomposition needs the dispatcher's ask (Toolkit.ask_part)")
        yield run.plan
        parts = [
            Part(i, dataclasses.replace(run.query, prompt=text, decompose=False))
            for i, text in enumerate(run.plan.parts)
        ]
        queue: asyncio.Queue[CandidateProgress | Part] = asyncio.Queue()
        started = time.perf_counter()
        tasks = [asyncio.create_task(self._one(ask, run, part, queue)) for part in parts]
        streamed = 0
        try:
            while streamed < len(parts):
                item = await queue.get()
                if isinstance(item, CandidateProgress):
                    yield item
                    continue
                while streamed < len(parts) and parts[streamed].ended:
                    yield self._delta(parts[streamed], len(parts))
                    streamed += 1
        finally:
            await cancel_and_wait(tasks)
        run.stages.append(Stage("parts", (time.perf_counter() - started) * 1000))
        yield self._finished(run, parts)

    async def _one(self, ask: AskPart, run: Run, part: Part, queue: asyncio.Queue[CandidateProgress | Part]) -> None:
        """One sub-query's Ask: progress to ``queue`` as it comes, the part itself when it ends."""
        try:
            async with aclosing(ask(part.query, max(0.0, run.remaining_s()), time.perf_counter())) as events:
                async for event in events:
                    if isinstance(event, PlanMade):
                        part.policy = event.policy
                    elif isinstance(event, CandidateProgress):
                        queue.put_nowait(event)
                    elif isinstance(event, Finished):
                        part.finished = event
        except ConstellationError as exc:
            part.error = exc
        queue.put_nowait(part)

    @staticmethod
    def _delta(part: Part, total: int) -> Delta:
        """The part's answer as it appears in the joined answer."""
        body = part.finished.text if part.finished is not None else f"(no answer: {part.error})"
        source = part.finished.models[0] if part.finished is not None and part.finished.models else "dispatch"
        separator = "\n\n" if part.index > 0 else ""
        return Delta(f"{separator}{part_heading(part.index, total)}{body.strip()}", source)

    @staticmethod
    def _finished(run: Run, parts: list[Part]) -> Finished:
        """The joined answer with one entry per part; raises the first error when no part answered."""
        done = [p.finished for p in parts if p.finished is not None]
        errors = [p.error for p in parts if p.error is not None]
        if not done:
            raise errors[0] if errors else InternalError("no part of the decomposed prompt ended")
        results = [p.result() for p in parts]
        text = "".join(Decomposed._delta(p, len(parts)).text for p in parts)
        simulated = max(sum(s.ms for s in f.stages if s.simulated) for f in done)
        if simulated:  # the parts ran at once: the slowest part's simulated time is the prompt's
            run.stages.append(Stage("first_token", simulated, simulated=True))
            run.stages.append(Stage("generate", 0.0, simulated=True))
        run.stages.append(Stage("total", run.elapsed_ms()))
        models: list[str] = []
        for finished in done:
            models += [m for m in finished.models if m not in models]
        return Finished(
            text=text,
            input_tokens=sum(r.input_tokens for r in results),
            output_tokens=sum(r.output_tokens for r in results),
            cost_usd=sum(r.cost_usd for r in results),
            stages=run.stages,
            trace_id=telemetry.current_trace_id(),
            finish_reason="stop",
            models=models,
            confidence=min((f.confidence for f in done), default=0.0),
            uncertain=bool(errors) or any(f.uncertain for f in done),
            problems=[e for e in errors if e is not None],
            parts=results,
        )
