"""The model call: one generation through a :class:`Generator` (Triton in production, a fake in unit tests).

:class:`ModelCaller` wraps a call in its span, turns its chunks into events and fills a
:class:`~services.dispatch.calls.CallResult`; :class:`~services.dispatch.accounting.Accounting` accounts
for it when it ends, however it ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Protocol

from opentelemetry import trace

from constellation import semconv
from constellation.errors import ConstellationError, DeadlineExceeded, NotFound
from constellation.semconv import Outcome, Phase
from constellation.triton import Chunk, Sampling
from services.dispatch.accounting import Accounting
from services.dispatch.calls import CallResult
from services.dispatch.capacity import CallCapacity
from services.dispatch.config import ModelEntry
from services.dispatch.events import CandidateProgress, Delta, Event
from services.dispatch.query import Query

tracer = trace.get_tracer("constellation.dispatch")


class Generator(Protocol):
    """What dispatch needs of a model server: :meth:`constellation.triton.TritonClient.stream`.

    Entering the returned context sends the request; reading it yields chunks, the last with ``final``
    set; leaving early cancels the request in the server.
    """

    url: str

    def stream(
        self,
        model: str,
        prompt: str,
        sampling: Sampling,
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        request_id: str = "",
        parameters: Mapping[str, str] | None = None,
        convention: str = "constellation",
    ) -> AbstractAsyncContextManager[AsyncIterator[Chunk]]: ...


MemberQueue = asyncio.Queue[CandidateProgress | CallResult]
"""Where fan-out members put their progress events and, when they end, their results."""


class ModelCaller:
    """Calls one model at a time for the strategies; shared by every request.

    Args:
        generator: The model server.
        entry: How to reach a model (its Triton model name, parameters and prices).
        accounting: Accounts for each call when it ends.
    """

    def __init__(self, generator: Generator, entry: Callable[[str], ModelEntry], accounting: Accounting):
        self.generator = generator
        self.entry = entry
        self.accounting = accounting
        self.capacity: CallCapacity | None = None

    async def generate(
        self,
        result: CallResult,
        query: Query,
        ends_at: float,
        *,
        pre_events: Sequence[Event] = (),
        stream: bool = True,
    ) -> AsyncGenerator[Event, None]:
        """Calls ``result.model``, filling ``result``; yields progress (and text deltas when ``stream``).

        ``pre_events`` are yielded once the request has left, so the caller sees the plan while the model
        already works. The call's span carries model, tokens, cost, time to first token and the member's
        role; the generator's header hook adds the span's ``traceparent`` to the request.
        """
        entry = self.entry(result.model)
        triton_model = entry.triton_model or result.model
        if self.capacity is not None:  # before the call's span and accounting: a refusal is no model failure
            await self.capacity.before_call(result.model, triton_model, ends_at)
        result.started_at = time.perf_counter()
        reported_cost: float | None = None
        attributes = {
            semconv.MODEL: result.model,
            semconv.MEMBER_ROLE: str(result.role),
            semconv.TRITON_ENDPOINT: self.generator.url,
            semconv.TRITON_MODEL: triton_model,
        }
        with tracer.start_as_current_span(
            semconv.SPAN_MODEL_CALL, kind=trace.SpanKind.CLIENT, attributes=attributes
        ) as span:
            try:
                remaining = ends_at - time.perf_counter()
                if remaining <= 0:
                    raise DeadlineExceeded("the request's deadline passed before the model was called")
                generation = self.generator.stream(
                    triton_model,
                    query.prompt,
                    query.sampling,
                    timeout_s=remaining,
                    parameters=entry.parameters,
                    convention=entry.convention,
                )
                async with generation as chunks:
                    # The request has left; the plan and "started" events go to the caller while the
                    # model works, not before it starts.
                    for event in pre_events:
                        yield event
                    yield CandidateProgress(result.model, Phase.STARTED, 0.0)
                    pieces: list[str] = []
                    async for chunk in chunks:
                        result.input_tokens = chunk.input_tokens or result.input_tokens
                        result.output_tokens = chunk.output_tokens or result.output_tokens
                        if chunk.text:
                            pieces.append(chunk.text)
                            first = result.first_at is None
                            if first:
                                result.first_at = time.perf_counter()
                                span.add_event("first_token")
                            if stream:
                                yield Delta(chunk.text, result.model)  # the text first: what the caller waits for
                            if first:
                                yield CandidateProgress(result.model, Phase.FIRST_TOKEN, 0.0)
                        if chunk.final:
                            reported_cost = chunk.cost_usd
                            _finish(result, chunk)
                    result.text = "".join(pieces)
                result.outcome = Outcome.OK
            except NotFound:
                result.outcome = Outcome.NOT_FOUND
                raise
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                if not isinstance(exc, Exception):
                    result.outcome = Outcome.CANCELLED
                if isinstance(exc, ConstellationError):
                    result.error = exc
                raise
            finally:
                self.accounting.record(result, entry, reported_cost, span)

    async def member(self, result: CallResult, query: Query, ends_at: float, queue: MemberQueue) -> None:
        """One member of a fan-out: progress events and, at the end, its result go to ``queue``."""
        try:
            async with aclosing(self.generate(result, query, ends_at, stream=False)) as events:
                async for event in events:
                    if isinstance(event, CandidateProgress):
                        queue.put_nowait(event)
        except ConstellationError as exc:
            result.error = exc
        except asyncio.CancelledError:
            result.outcome = Outcome.CANCELLED
            raise
        queue.put_nowait(result)


def _finish(result: CallResult, chunk: Chunk) -> None:
    """What the final chunk says: the finish reason and, for replayed models, the simulated times."""
    result.finish_reason = chunk.finish_reason
    if chunk.simulated_ttft_ms is not None and chunk.simulated_total_ms is not None:
        result.simulated = (chunk.simulated_ttft_ms, chunk.simulated_total_ms)
