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
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from constellation import telemetry
from constellation.errors import ConstellationError, DeadlineExceeded, NotFound
from constellation.metrics import REGISTRY
from constellation.ml.answers import extract_answer
from constellation.ml.vote import Ballot, tally, weight
from constellation.triton import TritonClient
from constellation.v1 import common_pb2, registry_pb2
from constellation.v1.common_pb2 import Classification
from services.classifier.client import ClassifierClient
from services.dispatch.config import DispatchConfig, ModelEntry
from services.dispatch.query import Query
from services.dispatch.routing import (
    CLOSED_KINDS,
    PoolModel,
    Router,
    ScoredModel,
    Weights,
    estimate_tokens,
    waves_of,
)
from services.fusion.client import FusionClient
from services.ranking.client import RankingClient
from services.registry.client import OutcomeReporter, RegistryView

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
FANOUT = Histogram(
    "constellation_fanout_size",
    "Models planned per request.",
    buckets=(1, 2, 3, 4, 5, 7, 9, 12, 16),
    registry=REGISTRY,
)
EARLY_STOPS = Counter(
    "constellation_early_terminations_total",
    "Fan-out waves ended before every member finished (quorum or agreement settled); stragglers cancelled.",
    ["policy"],
    registry=REGISTRY,
)
ESCALATIONS = Counter(
    "constellation_cascade_escalations_total", "Cascades that went on to their next wave.", registry=REGISTRY
)
FALLBACKS = Counter(
    "constellation_fallbacks_total",
    "Model calls that failed and were replaced by the next-best model.",
    ["model"],
    registry=REGISTRY,
)
HEDGES = Counter(
    "constellation_hedges_total",
    "Backup requests sent because a model had no first token by its p95 time to first token.",
    ["model"],
    registry=REGISTRY,
)
TOKENS = Counter("constellation_tokens_total", "Tokens processed by models.", ["model", "direction"], registry=REGISTRY)


@dataclass(frozen=True)
class Classified:
    """The classifier's view of the query (a ``constellation.v1.Classification`` message)."""

    classification: Classification


@dataclass(frozen=True)
class PlannedModel:
    """One model of a plan: why it was considered and, when chosen, in which wave it is asked."""

    model: str
    reason: str
    score: float = 1.0
    chosen: bool = True
    wave: int = 0
    quality: float = 0.0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    eligible: bool = True


@dataclass(frozen=True)
class PlanMade:
    """The plan: ``members`` are asked (by wave), ``candidates`` are every model considered."""

    policy: str
    members: list[PlannedModel]
    summary: str
    candidates: list[PlannedModel] = field(default_factory=list)
    profile: str = ""
    quorum: int = 0
    time_budget_ms: float = 0.0

    def waves(self) -> list[list[PlannedModel]]:
        return waves_of(self.members)

    def spares(self) -> list[PlannedModel]:
        """The eligible models not chosen, best score first: fallbacks and hedges come from here."""
        return sorted((c for c in self.candidates if not c.chosen and c.eligible), key=lambda c: -c.score)


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
    confidence: float = 0.0
    uncertain: bool = False
    problems: list[ConstellationError] = field(default_factory=list)


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


@dataclass
class CallResult:
    """What one model call produced; filled in while the call runs."""

    model: str
    reliability: float = 0.0
    text: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    finish_reason: str = ""
    started_at: float = 0.0
    first_at: float | None = None
    ended_at: float = 0.0
    simulated: tuple[float, float] | None = None
    error: ConstellationError | None = None
    outcome: str = "error"
    answer: str | None = None
    role: str = "member"
    cancel_reason: str = ""
    """Why dispatch cancelled the call: ``quorum`` (its wave was settled) or ``hedge`` (the other call won)."""

    @property
    def simulated_total_ms(self) -> float:
        return self.simulated[1] if self.simulated is not None else 0.0


FALLBACK_CODES = ("UNAVAILABLE", "NOT_FOUND", "INTERNAL", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNKNOWN")
"""Member errors that another model may succeed where this one failed."""


class Dispatcher:
    """Runs queries against the pool. Shared by all RPCs of a dispatch server; holds no per-query state.

    Args:
        config: Dispatch settings (catalog, limits, deadlines).
        triton: Client of the Triton server that serves the pool.
        classifier: Classifier client; None runs unclassified.
        router: The routing policy; None asks ``config.default_model`` unless a request names one.
        registry: A live view of the registry (health, latency); None uses the catalog alone.
        reporter: Sends every model call's outcome to the registry; None reports nothing.
        ranking: Orders the candidates of open-answer fan-outs; None keeps the reliability order.
        fusion: Fuses a fan-out's candidates (calibrated vote, or a generated answer); None votes in
            dispatch (uncalibrated confidence: the winner's weighted share).
    """

    def __init__(
        self,
        config: DispatchConfig,
        triton: TritonClient,
        classifier: ClassifierClient | None = None,
        *,
        router: Router | None = None,
        registry: RegistryView | None = None,
        reporter: OutcomeReporter | None = None,
        ranking: RankingClient | None = None,
        fusion: FusionClient | None = None,
    ):
        self.config = config
        self.triton = triton
        self.classifier = classifier
        self.router = router
        self.registry = registry
        self.reporter = reporter
        self.ranking = ranking
        self.fusion = fusion
        self.catalog = config.catalog()
        self._ttft: dict[str, deque[float]] = {}

    @property
    def wants_embedding(self) -> bool:
        return self.config.classify_embedding or (self.router is not None and self.router.predictor is not None)

    async def classify(
        self, prompt: str, remaining_s: float | None, *, embedding: bool = True
    ) -> Classification | None:
        """The classifier's answer, or None when there is no classifier or it failed in time.

        The call's deadline is ``min(classify_timeout_s, remaining_s)``. Failures are recorded on the
        current span and counted, never raised: routing falls back to its defaults. The embedding (the
        encoder's ~30 ms on 2 cores) is asked for only when ``embedding`` and routing will read it.
        """
        if self.classifier is None:
            return None
        timeout = (
            self.config.classify_timeout_s if remaining_s is None else min(self.config.classify_timeout_s, remaining_s)
        )
        try:
            return await self.classifier.classify(
                prompt, timeout_s=timeout, omit_embedding=not (embedding and self.wants_embedding)
            )
        except ConstellationError as exc:
            CLASSIFY_FAILURES.labels(exc.code.name).inc()
            trace.get_current_span().add_event("classification_failed", {"error": str(exc)})
            log.warning("classification failed, going on unclassified: %s", exc)
            return None

    def entry(self, model: str) -> ModelEntry:
        """How to reach ``model``: its catalog entry, the registry's record, else the Triton model of that name."""
        found = self.catalog.get(model)
        if found is not None:
            return found
        record = self.registry.models.get(model) if self.registry is not None else None
        if record is not None:
            return entry_from_record(record)
        return ModelEntry(triton_model=model)

    def pool(self) -> list[PoolModel]:
        """The models routing may choose: the catalog, plus registry records served by our Triton.

        Registry statistics (p50 time to first token, per-token time) replace the size priors once
        observed, and a model the registry marks unhealthy is kept out.
        """
        records = dict(self.registry.models) if self.registry is not None else {}
        names = list(self.catalog)
        names += [
            name
            for name, known in records.items()
            if name not in self.catalog and known.backend.endpoint in ("", self.triton.url)
        ]
        pool = []
        for name in names:
            entry = self.entry(name)
            record = records.get(name)
            ttft = per_token = None
            healthy = True
            capabilities = frozenset(entry.capabilities)
            if record is not None:
                healthy = record.state != common_pb2.MODEL_STATE_UNHEALTHY
                stats = record.stats
                if stats.time_to_first_token.p50_ms > 0:
                    ttft = stats.time_to_first_token.p50_ms
                if stats.per_token.p50_ms > 0:
                    per_token = stats.per_token.p50_ms
                capabilities = capabilities | frozenset(record.capabilities)
            pool.append(
                PoolModel(
                    name,
                    entry.price_in_per_mtok,
                    entry.price_out_per_mtok,
                    entry.family,
                    entry.params_b,
                    capabilities,
                    ttft,
                    per_token,
                    healthy,
                    live=ttft is not None,
                )
            )
        return pool

    def plan(self, query: Query, classification: Classification | None = None) -> PlanMade:
        """Who answers: the requested model, else the router's choice over the pool, else the default model.

        Raises:
            FailedPrecondition: routing found no model within the request's ceilings.
        """
        if query.model:
            member = PlannedModel(query.model, "requested by the caller (AskRequest.model)")
            return PlanMade("requested", [member], f"ask {member.model} alone", [member], query.profile)
        pool = self.pool()
        if self.router is None or not pool:
            member = PlannedModel(self.config.default_model, "default model (no routing policy or no pool configured)")
            return PlanMade("single", [member], f"ask {member.model} alone", [member], query.profile)
        embedding = None
        answer_kind = ""
        expected_tokens = None
        if classification is not None:
            if classification.embedding:
                embedding = np.asarray(classification.embedding, dtype=np.float32)
            answer_kind = _ANSWER_KINDS.get(classification.answer_kind, "")
            expected_tokens = classification.expected_output_tokens or None
        route = self.router.route(
            pool,
            embedding=embedding,
            answer_kind=answer_kind,
            input_tokens=estimate_tokens(query.prompt),
            expected_output_tokens=expected_tokens,
            profile=query.profile,
            weights=Weights(*query.weights) if query.weights is not None else None,
            max_cost_usd=query.max_cost_usd,
            max_latency_ms=query.max_latency_ms,
            required_capabilities=query.required_capabilities,
            ranking=self.ranking is not None,
        )

        def planned(c: ScoredModel) -> PlannedModel:
            return PlannedModel(
                c.model, c.reason, c.score, c.chosen, c.wave, c.quality, c.cost_usd, c.latency_ms, c.eligible
            )

        return PlanMade(
            route.policy,
            [planned(c) for c in route.members],
            route.summary,
            [planned(c) for c in route.candidates],
            route.profile,
            route.quorum,
            query.time_budget_ms,
        )

    async def ask(self, query: Query, *, deadline_s: float | None, received_at: float) -> AsyncGenerator[Event, None]:
        """Streams the events of one query.

        Args:
            query: A validated query.
            deadline_s: Seconds the caller has left (gRPC ``time_remaining()``), or None for no deadline.
            received_at: ``time.perf_counter()`` when the request arrived, for the stage breakdown.

        Raises:
            NotFound, Unavailable, DeadlineExceeded, InvalidArgument, FailedPrecondition, InternalError:
            the request cannot be answered; events sent before stay valid.
        """
        stages: list[Stage] = []
        classify_start = time.perf_counter()
        stages.append(Stage("validate", (classify_start - received_at) * 1000))
        classification = await self.classify(query.prompt, deadline_s, embedding=not query.model)
        if classification is not None:
            span = trace.get_current_span()
            span.set_attribute("constellation.task", common_pb2.TaskType.Name(classification.task))
            span.set_attribute("constellation.complexity", common_pb2.Complexity.Name(classification.complexity))
            span.set_attribute("constellation.classified_by", classification.decided_by)
            stages.append(Stage("classify", (time.perf_counter() - classify_start) * 1000))
            yield Classified(_without_embedding(classification))
        plan_start = time.perf_counter()
        plan = self.plan(query, classification)
        stages.append(Stage("plan", (time.perf_counter() - plan_start) * 1000))
        trace.get_current_span().set_attribute("constellation.route", plan.policy)
        budget = self.config.default_timeout_s if deadline_s is None else deadline_s
        if query.time_budget_ms:
            budget = min(budget, query.time_budget_ms / 1000)
        ends_at = received_at + budget
        answer_kind = _ANSWER_KINDS.get(classification.answer_kind, "") if classification is not None else ""
        FANOUT.observe(len(plan.members))
        if len(plan.members) > 1:
            async with aclosing(self._constellation(query, plan, answer_kind, received_at, ends_at, stages)) as events:
                async for event in events:
                    yield event
            return
        async with aclosing(self._single(query, plan, received_at, ends_at, stages)) as events:
            async for event in events:
                yield event

    async def _single(
        self, query: Query, plan: PlanMade, received_at: float, ends_at: float, stages: list[Stage]
    ) -> AsyncGenerator[Event, None]:
        """One model, streamed as it writes; a routed plan falls back to the next-best model on failure."""
        order = [plan.members[0]]
        if plan.policy not in ("requested",):
            order += plan.spares()[: self.config.max_fallbacks]
        problems: list[ConstellationError] = []
        results: list[CallResult] = []
        result = CallResult(order[0].model)
        attempt = 0
        while attempt < len(order):
            member = order[attempt]
            backup = order[attempt + 1] if attempt + 1 < len(order) else None
            delay = self.hedge_delay_s(member.model) if backup is not None else 0.0
            pre_events: list[Event] = [plan] if attempt == 0 else []
            result = CallResult(member.model, member.quality, role="fallback" if attempt else "member")
            results.append(result)
            try:
                if backup is not None and delay > 0:
                    spare = CallResult(backup.model, backup.quality, role="hedge")
                    results.append(spare)
                    stream = self._hedged(result, spare, query, ends_at, delay, received_at, pre_events)
                else:
                    stream = self._generate(result, query, ends_at, pre_events=pre_events)
                async with aclosing(stream) as events:
                    async for event in events:
                        yield event
                if delay > 0 and spare.first_at is not None and spare.outcome != "cancelled":
                    result = spare  # the hedge won
                break
            except ConstellationError as exc:
                step = 2 if delay > 0 else 1
                last = attempt + step >= len(order)
                streamed = result.first_at is not None or (delay > 0 and spare.first_at is not None)
                if streamed or last or exc.code.name not in FALLBACK_CODES:
                    if isinstance(exc, NotFound) and plan.policy == "requested":
                        await self.triton.require_model(self.entry(member.model).triton_model or member.model)
                    raise
                if time.perf_counter() >= ends_at:
                    raise
                FALLBACKS.labels(member.model).inc()
                problems.append(exc)
                yield CandidateProgress(member.model, "failed", (time.perf_counter() - received_at) * 1000, error=exc)
                attempt += step
        end = result.ended_at
        first = result.first_at if result.first_at is not None else end
        stages.append(Stage("first_token", (first - result.started_at) * 1000))
        stages.append(Stage("generate", (end - first) * 1000))
        if result.simulated is not None:
            stages.append(Stage("first_token", result.simulated[0], simulated=True))
            stages.append(Stage("generate", result.simulated[1] - result.simulated[0], simulated=True))
        yield CandidateProgress(
            result.model,
            "finished",
            (end - received_at) * 1000,
            result.input_tokens,
            result.output_tokens,
            result.cost_usd,
            text=result.text,
        )
        stages.append(Stage("total", (time.perf_counter() - received_at) * 1000))
        yield Finished(
            text=result.text,
            input_tokens=sum(r.input_tokens for r in results),
            output_tokens=sum(r.output_tokens for r in results),
            cost_usd=sum(r.cost_usd for r in results),
            stages=stages,
            trace_id=telemetry.current_trace_id(),
            finish_reason=result.finish_reason,
            models=[result.model, *(r.model for r in results if r is not result)],
            problems=problems,
        )

    def hedge_delay_s(self, model: str) -> float:
        """How long to wait for ``model``'s first token before sending a backup request (0: never).

        The model's p95 time to first token: from the registry when it has measured the model for real,
        else from this dispatch's own recent calls, else ``hedge_after_ms``; times ``hedge_factor``.
        """
        if not self.config.hedging:
            return 0.0
        p95 = 0.0
        record = self.registry.models.get(model) if self.registry is not None else None
        if record is not None and not record.simulated and record.stats.time_to_first_token.p95_ms > 0:
            p95 = record.stats.time_to_first_token.p95_ms
        else:
            samples = self._ttft.get(model)
            if samples is not None and len(samples) >= self.config.hedge_min_samples:
                p95 = float(np.percentile(np.fromiter(samples, dtype=float), 95))
            else:
                p95 = self.config.hedge_after_ms
        return p95 * self.config.hedge_factor / 1000

    async def _hedged(
        self,
        primary: CallResult,
        backup: CallResult,
        query: Query,
        ends_at: float,
        delay_s: float,
        received_at: float,
        pre_events: Sequence[Event],
    ) -> AsyncGenerator[Event, None]:
        """``primary``, plus ``backup`` if the primary has no first token after ``delay_s``; the first to
        produce text wins and streams, the other is cancelled inside Triton. A primary that fails before
        the delay starts the backup at once (a fallback). Raises the last error when both fail."""
        queue: asyncio.Queue[tuple[str, Event | CallResult]] = asyncio.Queue()
        tasks: dict[str, asyncio.Task[None]] = {}
        by_role = {"member": primary, "hedge": backup}

        async def pump(result: CallResult, pre: Sequence[Event]) -> None:
            try:
                async with aclosing(self._generate(result, query, ends_at, pre_events=pre)) as events:
                    async for event in events:
                        queue.put_nowait((result.role, event))
            except ConstellationError as exc:
                result.error = exc
            queue.put_nowait((result.role, result))

        def launch(result: CallResult, pre: Sequence[Event] = ()) -> None:
            tasks[result.role] = asyncio.create_task(pump(result, pre))

        launch(primary, pre_events)
        winner: str | None = None
        hedge_at = time.perf_counter() + delay_s
        try:
            while True:
                now = time.perf_counter()
                wait = (hedge_at if "hedge" not in tasks else ends_at) - now
                if winner is None and "hedge" not in tasks and wait <= 0:
                    HEDGES.labels(primary.model).inc()
                    trace.get_current_span().add_event("hedged", {"after_ms": delay_s * 1000, "backup": backup.model})
                    launch(backup)
                    continue
                try:
                    role, item = await asyncio.wait_for(queue.get(), max(wait, 0.0) if wait > 0 else None)
                except TimeoutError:
                    if "hedge" in tasks:
                        raise DeadlineExceeded("neither the model nor its hedge answered in time") from None
                    continue
                if isinstance(item, CallResult):
                    done = by_role[role]
                    if done.error is None and winner is None:
                        winner = role  # finished without text: an empty answer still wins
                    if winner == role:
                        if done.error is not None:
                            raise done.error  # the winner failed mid-stream: text was sent, no fallback
                        return
                    other = "hedge" if role == "member" else "member"
                    if other not in tasks:  # the primary failed before the hedge delay: ask the backup now
                        launch(backup)
                        continue
                    if by_role[other].error is not None and done.error is not None:
                        raise done.error  # both failed
                    continue
                if winner is None and isinstance(item, Delta):
                    winner = role
                    loser = "hedge" if role == "member" else "member"
                    if loser in tasks and not tasks[loser].done():
                        by_role[loser].cancel_reason = "hedge"
                        tasks[loser].cancel()
                        await asyncio.gather(tasks[loser], return_exceptions=True)
                        by_role[loser].outcome = "cancelled"
                        yield CandidateProgress(
                            by_role[loser].model, "cancelled", (time.perf_counter() - received_at) * 1000
                        )
                if role == winner or (winner is None and not isinstance(item, Delta)):
                    yield item
        finally:
            for task in tasks.values():
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    async def _constellation(
        self,
        query: Query,
        plan: PlanMade,
        answer_kind: str,
        received_at: float,
        ends_at: float,
        stages: list[Stage],
    ) -> AsyncGenerator[Event, None]:
        """Asks the plan's waves concurrently and votes; stops a wave as soon as its outcome is settled.

        A ``vote`` plan stops when the leading answer can no longer be overtaken by the members still
        running (or ``plan.quorum`` members agree); a ``cascade`` plan escalates to its next wave as soon
        as the first wave disagrees, and stops when it agrees. Members still running are cancelled
        inside Triton. A member that fails is replaced by the next-best unused model while time is left.
        """
        yield plan
        queue: asyncio.Queue[CandidateProgress | CallResult] = asyncio.Queue()
        results: list[CallResult] = []
        problems: list[ConstellationError] = []
        spare = plan.spares()
        waves = plan.waves()
        deciding: list[CallResult] = []
        simulated_ms = 0.0
        fanout_start = time.perf_counter()
        early = False
        for index, wave in enumerate(waves):
            last_wave = index == len(waves) - 1
            tasks: dict[str, asyncio.Task[None]] = {}
            running: dict[str, CallResult] = {}

            def start(
                member: PlannedModel,
                role: str,
                running: dict[str, CallResult] = running,
                tasks: dict[str, asyncio.Task[None]] = tasks,
            ) -> None:
                result = CallResult(member.model, member.quality, role=role)
                results.append(result)
                running[member.model] = result
                tasks[member.model] = asyncio.create_task(self._member(result, query, ends_at, queue))

            for member in wave:
                start(member, "member")
            answered: list[CallResult] = []
            settled: bool | None = None
            try:
                while running:
                    remaining = ends_at - time.perf_counter()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        break
                    if isinstance(item, CandidateProgress):
                        yield item
                        continue
                    running.pop(item.model, None)
                    tasks.pop(item.model, None)
                    elapsed = (time.perf_counter() - received_at) * 1000
                    if item.error is not None:
                        problems.append(item.error)
                        yield CandidateProgress(item.model, "failed", elapsed, error=item.error)
                        if spare and ends_at - time.perf_counter() > 0:
                            FALLBACKS.labels(item.model).inc()
                            start(spare.pop(0), "fallback")
                        continue
                    item.answer = extract_answer(answer_kind, item.text)
                    answered.append(item)
                    yield CandidateProgress(
                        item.model,
                        "finished",
                        elapsed,
                        item.input_tokens,
                        item.output_tokens,
                        item.cost_usd,
                        text=item.text,
                    )
                    if self.config.early_stop or not running:
                        settled = self._settled(plan, answered, list(running.values()), last_wave)
                    if settled is not None:
                        break
            finally:
                stragglers = list(tasks.values())
                for model in running:
                    running[model].cancel_reason = "quorum"
                for task in stragglers:
                    task.cancel()
                if stragglers:
                    await asyncio.gather(*stragglers, return_exceptions=True)
            if running:
                early = True
                EARLY_STOPS.labels(plan.policy).inc()
                for model, result in running.items():
                    result.outcome = "cancelled"
                    yield CandidateProgress(model, "cancelled", (time.perf_counter() - received_at) * 1000)
            if answered:
                simulated_ms += max(r.simulated_total_ms for r in answered)
            if settled or last_wave or ends_at - time.perf_counter() <= 0:
                deciding = answered
                break
            ESCALATIONS.inc()
        if not deciding:
            if problems:
                raise problems[-1]
            raise DeadlineExceeded("no model of the plan answered within the request's time budget")
        stages.append(Stage("fanout", (time.perf_counter() - fanout_start) * 1000))
        if simulated_ms:
            stages.append(Stage("first_token", simulated_ms, simulated=True))
            stages.append(Stage("generate", 0.0, simulated=True))
        fused: Fused | None = None
        ordered = sorted(deciding, key=lambda r: -r.reliability)
        if self.ranking is not None and answer_kind not in CLOSED_KINDS and len(ordered) >= 2:
            rank_start = time.perf_counter()
            try:
                ordered = await self._rank(query, ordered, answer_kind, ends_at)
            except ConstellationError as exc:
                problems.append(exc)
                log.warning("ranking failed, keeping the reliability order: %s", exc)
            stages.append(Stage("rank", (time.perf_counter() - rank_start) * 1000))
        if self.fusion is not None:
            fuse_start = time.perf_counter()
            fused = Fused()
            try:
                async for piece in self._fuse(query, ordered, answer_kind, ends_at, fused):
                    yield piece
            except ConstellationError as exc:
                problems.append(exc)
                log.warning("fusion failed, voting in dispatch: %s", exc)
                if fused.streamed:
                    raise
                fused = None
            stages.append(Stage("fuse", (time.perf_counter() - fuse_start) * 1000))
        if fused is not None:
            text, confidence, uncertain = fused.text, fused.confidence, fused.uncertain
            answering = next((r for r in ordered if r.text == text), None)
            cost_extra = fused.cost_usd
        else:
            ballots = [Ballot(r.answer, r.reliability, rank) for rank, r in enumerate(ordered)]
            outcome = tally(ballots)
            if outcome.answer is None:
                answering = ordered[0]
            else:
                answering = max((ordered[i] for i in outcome.winners), key=lambda r: r.reliability)
            text = answering.text
            confidence = outcome.weighted_share
            uncertain = outcome.answer is None or outcome.weighted_share < 0.5
            cost_extra = 0.0
            yield Delta(text, answering.model)
        stages.append(Stage("total", (time.perf_counter() - received_at) * 1000))
        span = trace.get_current_span()
        span.set_attribute("constellation.fanout.members", len(results))
        span.set_attribute("constellation.fanout.early_stop", early)
        span.set_attribute("constellation.fused.confidence", confidence)
        span.set_attribute("constellation.fused.method", fused.method if fused is not None else "dispatch_vote")
        first = [answering.model] if answering is not None else ["fusion"]
        yield Finished(
            text=text,
            input_tokens=sum(r.input_tokens for r in results),
            output_tokens=sum(r.output_tokens for r in results),
            cost_usd=sum(r.cost_usd for r in results) + cost_extra,
            stages=stages,
            trace_id=telemetry.current_trace_id(),
            finish_reason=answering.finish_reason if answering is not None else "stop",
            models=[*first, *(r.model for r in results if r is not answering)],
            confidence=confidence,
            uncertain=uncertain,
            problems=problems,
        )

    async def _rank(
        self, query: Query, ordered: list[CallResult], answer_kind: str, ends_at: float
    ) -> list[CallResult]:
        """The candidates in the ranking service's order (pruned ones last)."""
        assert self.ranking is not None
        timeout = min(self.config.rank_timeout_s, max(0.0, ends_at - time.perf_counter()))
        scored = await self.ranking.rank(
            query.prompt,
            [candidate_message(r) for r in ordered],
            _ANSWER_KIND_ENUMS.get(answer_kind, common_pb2.ANSWER_KIND_UNSPECIFIED),
            timeout_s=timeout,
        )
        by_model = {r.model: r for r in ordered}
        return [by_model[c.candidate.model] for c in scored if c.candidate.model in by_model]

    async def _fuse(
        self, query: Query, ordered: list[CallResult], answer_kind: str, ends_at: float, fused: Fused
    ) -> AsyncGenerator[Delta, None]:
        """Streams the fusion service's answer as deltas and fills ``fused`` from its summary."""
        assert self.fusion is not None
        timeout = min(self.config.fuse_timeout_s, max(0.0, ends_at - time.perf_counter()))
        candidates = [
            common_pb2.ScoredCandidate(candidate=candidate_message(r), score=r.reliability, rank=i)
            for i, r in enumerate(ordered)
        ]
        stream = self.fusion.fuse(
            query.prompt,
            candidates,
            _ANSWER_KIND_ENUMS.get(answer_kind, common_pb2.ANSWER_KIND_OPEN),
            timeout_s=timeout,
        )
        async for message in stream:
            if message.WhichOneof("event") == "delta":
                if message.delta.text:
                    fused.streamed = True
                    yield Delta(message.delta.text, "fusion")
            else:
                summary = message.summary
                fused.text = summary.text
                fused.confidence = summary.confidence
                fused.uncertain = summary.uncertain
                fused.method = summary.method
                fused.cost_usd = summary.usage.cost_usd
        if not fused.streamed:  # a vote sends no deltas: the answer is the summary's text
            source = next((r.model for r in ordered if r.text == fused.text), "fusion")
            yield Delta(fused.text, source)

    @staticmethod
    def _settled(plan: PlanMade, answered: list[CallResult], running: list[CallResult], last_wave: bool) -> bool | None:
        """True: the wave's answer is settled; False: escalate now; None: wait for more members."""
        if plan.policy == "cascade" and not last_wave:
            first = answered[0].answer
            if first is None or any(r.answer != first for r in answered):
                return False  # disagreement: the next wave decides
            return True if not running else None
        if not running:
            return True
        outcome = tally([Ballot(r.answer, r.reliability, i) for i, r in enumerate(answered)])
        if outcome.answer is None:
            return None
        if plan.quorum and outcome.votes_for >= plan.quorum:
            return True
        lead = sum(weight(answered[i].reliability or 0.6) for i in outcome.winners)
        others = sum(weight(r.reliability or 0.6) for r in answered if r.answer != outcome.answer)
        pending = sum(weight(r.reliability or 0.6) for r in running)
        return True if lead > others + pending else None

    async def _member(
        self, result: CallResult, query: Query, ends_at: float, queue: asyncio.Queue[CandidateProgress | CallResult]
    ) -> None:
        """One member of a fan-out: progress events and, at the end, its result go to ``queue``."""
        try:
            async with aclosing(self._generate(result, query, ends_at, stream=False)) as events:
                async for event in events:
                    if isinstance(event, CandidateProgress):
                        queue.put_nowait(event)
        except ConstellationError as exc:
            result.error = exc
        except asyncio.CancelledError:
            result.outcome = "cancelled"
            raise
        queue.put_nowait(result)

    async def _generate(
        self,
        result: CallResult,
        query: Query,
        ends_at: float,
        *,
        pre_events: Sequence[Event] = (),
        stream: bool = True,
    ) -> AsyncGenerator[Event, None]:
        """Calls one model through Triton, filling ``result``; yields progress (and text deltas when ``stream``).

        ``pre_events`` are yielded once the request has left for Triton, so the caller sees the plan
        while the model already works. The model's span carries model, tokens, cost, time to first
        token and the member's role; its outcome is reported to the registry.
        """
        model = result.model
        entry = self.entry(model)
        triton_model = entry.triton_model or model
        received = time.perf_counter()
        result.started_at = received
        reported_cost: float | None = None
        attributes = {
            "constellation.model": model,
            "constellation.member.role": result.role,
            "constellation.triton.endpoint": self.triton.url,
            "constellation.triton.model": triton_model,
        }
        with tracer.start_as_current_span("model.generate", kind=trace.SpanKind.CLIENT, attributes=attributes) as span:
            try:
                remaining = ends_at - time.perf_counter()
                if remaining <= 0:
                    raise DeadlineExceeded("the request's deadline passed before the model was called")
                generation = self.triton.stream(
                    triton_model,
                    query.prompt,
                    query.sampling,
                    timeout_s=remaining,
                    headers=telemetry.inject_headers(),
                    parameters=entry.parameters,
                    convention=entry.convention,
                )
                async with generation as chunks:
                    # The request has left for Triton; the plan and "started" events go to the caller
                    # while the model works, not before it starts.
                    for event in pre_events:
                        yield event
                    yield CandidateProgress(model, "started", 0.0)
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
                                yield Delta(chunk.text, model)  # the text first: it is what the caller waits for
                            if first:
                                yield CandidateProgress(model, "first_token", 0.0)
                        if chunk.final:
                            result.finish_reason = chunk.finish_reason
                            reported_cost = chunk.cost_usd
                            if chunk.simulated_ttft_ms is not None and chunk.simulated_total_ms is not None:
                                result.simulated = (chunk.simulated_ttft_ms, chunk.simulated_total_ms)
                    result.text = "".join(pieces)
                result.outcome = "ok"
            except NotFound:
                result.outcome = "not_found"
                raise
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                if not isinstance(exc, Exception):
                    result.outcome = "cancelled"
                if isinstance(exc, ConstellationError):
                    result.error = exc
                raise
            finally:
                self._account(result, entry, reported_cost, span)

    def _account(self, result: CallResult, entry: ModelEntry, reported_cost: float | None, span: trace.Span) -> None:
        """Metrics, span attributes and the registry outcome of one finished (or failed) call."""
        model = result.model
        result.ended_at = end = time.perf_counter()
        MODEL_CALLS.labels(model, result.outcome).inc()
        cost = reported_cost if reported_cost is not None else cost_of(entry, result.input_tokens, result.output_tokens)
        result.cost_usd = cost
        span.set_attribute("constellation.input_tokens", result.input_tokens)
        span.set_attribute("constellation.output_tokens", result.output_tokens)
        span.set_attribute("constellation.cost_usd", cost)
        span.set_attribute("constellation.finish_reason", result.finish_reason or result.outcome)
        span.set_attribute("constellation.cancelled", result.outcome == "cancelled")
        span.set_attribute("constellation.cancelled_by_quorum", result.cancel_reason == "quorum")
        span.set_attribute("constellation.hedged", result.role == "hedge" or result.cancel_reason == "hedge")
        span.set_attribute("constellation.fallback", result.role == "fallback")
        if result.simulated is not None:
            span.set_attribute("constellation.simulated_time_to_first_token_ms", result.simulated[0])
            span.set_attribute("constellation.simulated_total_ms", result.simulated[1])
        ttft_ms = 0.0
        if result.first_at is not None:
            ttft = result.first_at - result.started_at
            ttft_ms = ttft * 1000
            span.set_attribute("constellation.time_to_first_token_ms", ttft_ms)
            samples = self._ttft.get(model)
            if samples is None:
                samples = self._ttft[model] = deque(maxlen=256)
            samples.append(ttft_ms)
            TTFT.labels(model).observe(ttft)
            if result.output_tokens > 1:
                PER_TOKEN.labels(model).observe((end - result.first_at) / (result.output_tokens - 1))
        TOKENS.labels(model, "input").inc(result.input_tokens)
        TOKENS.labels(model, "output").inc(result.output_tokens)
        COST.labels(model).inc(cost)
        if self.reporter is not None and result.outcome != "cancelled":
            if result.simulated is not None:  # replayed models: their latency is the simulated one
                ttft_ms, total_ms = result.simulated
            else:
                total_ms = (end - result.started_at) * 1000
            self.reporter.report(
                registry_pb2.Outcome(
                    model=model,
                    success=result.outcome == "ok",
                    time_to_first_token_ms=ttft_ms,
                    total_ms=total_ms,
                    usage=common_pb2.Usage(
                        input_tokens=result.input_tokens, output_tokens=result.output_tokens, cost_usd=cost
                    ),
                    error_code=result.error.code.name if result.error is not None else "",
                )
            )


@dataclass
class Fused:
    """What the fusion service returned."""

    text: str = ""
    confidence: float = 0.0
    uncertain: bool = False
    method: str = ""
    cost_usd: float = 0.0
    streamed: bool = False


def candidate_message(result: CallResult) -> common_pb2.Candidate:
    return common_pb2.Candidate(
        model=result.model,
        text=result.text,
        normalized_answer=result.answer or "",
        usage=common_pb2.Usage(
            input_tokens=result.input_tokens, output_tokens=result.output_tokens, cost_usd=result.cost_usd
        ),
        latency_ms=(result.ended_at - result.started_at) * 1000,
        reliability=min(max(result.reliability, 0.0), 1.0),
    )


_ANSWER_KINDS = {
    common_pb2.ANSWER_KIND_NUMBER: "number",
    common_pb2.ANSWER_KIND_CHOICE: "choice",
    common_pb2.ANSWER_KIND_CODE: "code",
    common_pb2.ANSWER_KIND_OPEN: "open",
}


_ANSWER_KIND_ENUMS = {name: value for value, name in _ANSWER_KINDS.items()}


def _without_embedding(classification: Classification) -> Classification:
    """The classification as the caller sees it: the 384 floats of the embedding stay inside dispatch."""
    if not classification.embedding:
        return classification
    copy = Classification()
    copy.CopyFrom(classification)
    del copy.embedding[:]
    return copy


def entry_from_record(record: registry_pb2.ModelRecord) -> ModelEntry:
    """A catalog entry for a model known only to the registry."""
    return ModelEntry(
        triton_model=record.backend.model_name or record.name,
        parameters=dict(record.backend.parameters),
        price_in_per_mtok=record.price_in_per_mtok,
        price_out_per_mtok=record.price_out_per_mtok,
        family=record.family or None,
        params_b=record.params_b or None,
        capabilities=list(record.capabilities),
    )
