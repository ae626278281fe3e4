"""The Ask pipeline: plan, call the model through Triton, stream the answer, account for it.

Plain Python (no gRPC server types): :meth:`Dispatcher.ask` is an async generator of domain events
that the servicer maps to ``AskResponse`` messages. Only the single-model route exists so far; the
plan says which model is asked and why.

Concurrency and cancellation: one ``ask`` runs inside the caller's RPC task. If the caller cancels,
the task is cancelled, the Triton stream is closed in ``finally`` and Triton cancels the request.
Nothing here swallows ``asyncio.CancelledError``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field

from opentelemetry import trace
from prometheus_client import Counter, Histogram

from constellation import telemetry
from constellation.errors import ConstellationError, DeadlineExceeded, NotFound
from constellation.metrics import REGISTRY
from constellation.triton import TritonClient
from constellation.v1 import common_pb2
from constellation.v1.common_pb2 import Classification
from services.classifier.client import ClassifierClient
from services.dispatch.config import DispatchConfig, ModelEntry
from services.dispatch.query import Query

tracer = trace.get_tracer("constellation.dispatch")
log = logging.getLogger(__name__)

TTFT = Histogram(
    "constellation_model_time_to_first_token_seconds",
    "Time from sending a request to a model to its first streamed text.",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
PER_TOKEN = Histogram(
    "constellation_model_time_per_output_token_seconds",
    "Decoding time per output token after the first.",
    ["model"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    registry=REGISTRY,
)
MODEL_CALLS = Counter(
    "constellation_model_calls_total", "Model calls by outcome.", ["model", "outcome"], registry=REGISTRY
)
COST = Counter("constellation_cost_usd_total", "Cost of model calls in USD.", ["model"], registry=REGISTRY)
CLASSIFY_FAILURES = Counter(
    "constellation_classify_failures_total",
    "Classifier calls that failed or timed out (the request went on unclassified).",
    ["code"],
    registry=REGISTRY,
)
TOKENS = Counter("constellation_tokens_total", "Tokens processed by models.", ["model", "direction"], registry=REGISTRY)


@dataclass(frozen=True)
class Classified:
    """The classifier's view of the query (a ``constellation.v1.Classification`` message)."""

    classification: Classification


@dataclass(frozen=True)
class PlannedModel:
    model: str
    reason: str


@dataclass(frozen=True)
class PlanMade:
    policy: str
    members: list[PlannedModel]
    summary: str


@dataclass(frozen=True)
class CandidateProgress:
    model: str
    phase: str  # started | first_token | finished | cancelled | failed
    elapsed_ms: float
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    error: ConstellationError | None = None
    text: str = ""


@dataclass(frozen=True)
class Delta:
    text: str
    source: str


@dataclass(frozen=True)
class Finished:
    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    stages: list[Stage]
    trace_id: str
    finish_reason: str
    models: list[str] = field(default_factory=list)


Event = Classified | PlanMade | CandidateProgress | Delta | Finished


@dataclass(frozen=True)
class Stage:
    """One entry of the latency breakdown; ``simulated`` marks times a replayed model made up."""

    name: str
    ms: float
    simulated: bool = False


def cost_of(entry: ModelEntry, input_tokens: int, output_tokens: int) -> float:
    """Cost in USD of one call at the entry's price (USD per million tokens)."""
    return (input_tokens * entry.price_in_per_mtok + output_tokens * entry.price_out_per_mtok) / 1e6


class Dispatcher:
    """Runs queries against the pool. Shared by all RPCs of a dispatch server; holds no per-query state."""

    def __init__(self, config: DispatchConfig, triton: TritonClient, classifier: ClassifierClient | None = None):
        self.config = config
        self.triton = triton
        self.classifier = classifier
        self.catalog = config.catalog()

    async def classify(self, prompt: str, remaining_s: float | None) -> Classification | None:
        """The classifier's answer, or None when there is no classifier or it failed in time.

        The call's deadline is ``min(classify_timeout_s, remaining_s)``. Failures are recorded on the
        current span and counted, never raised: routing falls back to its defaults.
        """
        if self.classifier is None:
            return None
        timeout = (
            self.config.classify_timeout_s if remaining_s is None else min(self.config.classify_timeout_s, remaining_s)
        )
        try:
            return await self.classifier.classify(
                prompt, timeout_s=timeout, omit_embedding=not self.config.classify_embedding
            )
        except ConstellationError as exc:
            CLASSIFY_FAILURES.labels(exc.code.name).inc()
            trace.get_current_span().add_event("classification_failed", {"error": str(exc)})
            log.warning("classification failed, going on unclassified: %s", exc)
            return None

    def entry(self, model: str) -> ModelEntry:
        """How to reach ``model``: its catalog entry, else the Triton model of the same name."""
        return self.catalog.get(model) or ModelEntry(triton_model=model)

    def plan(self, query: Query) -> PlanMade:
        """The single-model route: the requested model, else the configured default."""
        if query.model:
            member = PlannedModel(query.model, "requested by the caller (AskRequest.model)")
        else:
            member = PlannedModel(
                self.config.default_model, "default model (no routing policy configured for this pool)"
            )
        return PlanMade("single", [member], f"ask {member.model} alone")

    async def ask(self, query: Query, *, deadline_s: float | None, received_at: float) -> AsyncGenerator[Event, None]:
        """Streams the events of one query.

        Args:
            query: A validated query.
            deadline_s: Seconds the caller has left (gRPC ``time_remaining()``), or None for no deadline.
            received_at: ``time.perf_counter()`` when the request arrived, for the stage breakdown.

        Raises:
            NotFound, Unavailable, DeadlineExceeded, InvalidArgument, InternalError: the request
            cannot be answered; events sent before stay valid.
        """
        stages: list[Stage] = []
        classify_start = time.perf_counter()
        stages.append(Stage("validate", (classify_start - received_at) * 1000))
        classification = await self.classify(query.prompt, deadline_s)
        if classification is not None:
            span = trace.get_current_span()
            span.set_attribute("constellation.task", common_pb2.TaskType.Name(classification.task))
            span.set_attribute("constellation.complexity", common_pb2.Complexity.Name(classification.complexity))
            span.set_attribute("constellation.classified_by", classification.decided_by)
            stages.append(Stage("classify", (time.perf_counter() - classify_start) * 1000))
            yield Classified(classification)
        plan_start = time.perf_counter()
        plan = self.plan(query)
        stages.append(Stage("plan", (time.perf_counter() - plan_start) * 1000))
        member = plan.members[0]
        model = member.model
        entry = self.entry(model)
        triton_model = entry.triton_model or model
        budget = self.config.default_timeout_s if deadline_s is None else deadline_s
        if query.time_budget_ms:
            budget = min(budget, query.time_budget_ms / 1000)
        start = time.perf_counter()
        first_at: float | None = None
        pieces: list[str] = []
        input_tokens = output_tokens = 0
        finish_reason = ""
        reported_cost: float | None = None
        simulated: tuple[float, float] | None = None
        with tracer.start_as_current_span("model.generate", kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("constellation.model", model)
            span.set_attribute("constellation.route", plan.policy)
            span.set_attribute("constellation.triton.endpoint", self.triton.url)
            span.set_attribute("constellation.triton.model", triton_model)
            outcome = "error"
            try:
                remaining = budget - (time.perf_counter() - received_at)
                if remaining <= 0:
                    raise DeadlineExceeded("the request's deadline passed before the model was called")
                stream = self.triton.generate(
                    triton_model,
                    query.prompt,
                    query.sampling,
                    timeout_s=remaining,
                    headers=telemetry.inject_headers(),
                    parameters=entry.parameters,
                )
                async with aclosing(stream) as chunks:
                    # The request leaves for Triton now; the plan and "started" events go to the
                    # caller while the model works, not before it starts.
                    head = asyncio.ensure_future(anext(chunks, None))
                    try:
                        yield plan
                        yield CandidateProgress(model, "started", (start - received_at) * 1000)
                        chunk = await head
                    except BaseException:
                        head.cancel()
                        await asyncio.wait([head])
                        raise
                    while chunk is not None:
                        input_tokens = chunk.input_tokens or input_tokens
                        output_tokens = chunk.output_tokens or output_tokens
                        if chunk.text:
                            pieces.append(chunk.text)
                            first_ms: float | None = None
                            if first_at is None:
                                first_at = time.perf_counter()
                                first_ms = (first_at - received_at) * 1000
                                span.add_event("first_token")
                            yield Delta(chunk.text, model)  # the text first: it is what the caller waits for
                            if first_ms is not None:
                                yield CandidateProgress(model, "first_token", first_ms)
                        if chunk.final:
                            finish_reason = chunk.finish_reason
                            reported_cost = chunk.cost_usd
                            if chunk.simulated_ttft_ms is not None and chunk.simulated_total_ms is not None:
                                simulated = (chunk.simulated_ttft_ms, chunk.simulated_total_ms)
                        chunk = await anext(chunks, None)
                outcome = "ok"
            except NotFound:
                outcome = "not_found"
                await self.triton.require_model(triton_model)  # raises NotFound naming the models that exist
                raise
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                if not isinstance(exc, Exception):
                    outcome = "cancelled"
                raise
            finally:
                MODEL_CALLS.labels(model, outcome).inc()
                end = time.perf_counter()
                cost = reported_cost if reported_cost is not None else cost_of(entry, input_tokens, output_tokens)
                span.set_attribute("constellation.input_tokens", input_tokens)
                span.set_attribute("constellation.output_tokens", output_tokens)
                span.set_attribute("constellation.cost_usd", cost)
                span.set_attribute("constellation.finish_reason", finish_reason or outcome)
                if simulated is not None:
                    span.set_attribute("constellation.simulated_time_to_first_token_ms", simulated[0])
                    span.set_attribute("constellation.simulated_total_ms", simulated[1])
                if first_at is not None:
                    ttft = first_at - start
                    span.set_attribute("constellation.time_to_first_token_ms", ttft * 1000)
                    TTFT.labels(model).observe(ttft)
                    if output_tokens > 1:
                        PER_TOKEN.labels(model).observe((end - first_at) / (output_tokens - 1))
                TOKENS.labels(model, "input").inc(input_tokens)
                TOKENS.labels(model, "output").inc(output_tokens)
                COST.labels(model).inc(cost)
        first = first_at if first_at is not None else end
        stages.append(Stage("first_token", (first - start) * 1000))
        stages.append(Stage("generate", (end - first) * 1000))
        if simulated is not None:
            stages.append(Stage("first_token", simulated[0], simulated=True))
            stages.append(Stage("generate", simulated[1] - simulated[0], simulated=True))
        text = "".join(pieces)
        yield CandidateProgress(
            model,
            "finished",
            (end - received_at) * 1000,
            input_tokens,
            output_tokens,
            cost,
            text=text,
        )
        stages.append(Stage("total", (time.perf_counter() - received_at) * 1000))
        yield Finished(
            text=text,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost,
            stages=stages,
            trace_id=telemetry.current_trace_id(),
            finish_reason=finish_reason,
            models=[model],
        )
