"""The Ask pipeline: classify, plan, execute the plan with its strategy, stream the events.

Plain Python (no gRPC server types): :meth:`Dispatcher.ask` is an async generator of domain events
(:mod:`services.dispatch.events`) that the servicer maps to ``AskResponse`` messages. The parts live
beside it: planning (pool view and plan), generation (the model call), strategies (one module per way of
executing a plan, chosen by the plan's policy), aggregation (rank, fuse, vote) and accounting (metrics,
cost, outcomes reported to the registry).

Concurrency and cancellation: one ``ask`` runs inside the caller's RPC task. If the caller cancels,
the task is cancelled, every Triton stream is closed on the way out and Triton cancels the requests.
Nothing here swallows ``asyncio.CancelledError``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import replace

from opentelemetry import trace

from constellation import semconv
from constellation.auth import current_tenant
from constellation.errors import ConstellationError, Retryable, Unavailable
from constellation.planning import split
from constellation.semconv import Phase, Policy
from constellation.triton import TritonClient
from constellation.v1 import common_pb2
from constellation.v1.common_pb2 import Classification
from services.classifier.client import ClassifierClient
from services.dispatch.accounting import CLASSIFY_FAILURES, DEGRADED_PLANS, FANOUT, Accounting
from services.dispatch.aggregation import Aggregator
from services.dispatch.bounds import BoundedPlanner
from services.dispatch.budget import TenantBudgets
from services.dispatch.calls import CallResult, Run
from services.dispatch.config import DispatchConfig, ModelEntry
from services.dispatch.events import CandidateProgress, Classified, Delta, Event, Finished, PlanMade, Stage
from services.dispatch.generation import Generator, ModelCaller
from services.dispatch.planning import Planner, answer_kind_of, without_embedding
from services.dispatch.query import Query
from services.dispatch.routing import PlannedModel, PoolModel, Router
from services.dispatch.strategies import STRATEGIES, Strategy, Toolkit
from services.fusion.client import FusionClient
from services.ranking.client import RankingClient
from services.registry.client import OutcomeReporter, RegistryView

log = logging.getLogger(__name__)

__all__ = [
    "CallResult",
    "CandidateProgress",
    "Classified",
    "Delta",
    "Dispatcher",
    "Event",
    "Finished",
    "PlanMade",
    "PlannedModel",
    "Stage",
]


_ENDED = frozenset({Phase.FINISHED, Phase.CANCELLED, Phase.FAILED})


class Dispatcher:
    """Runs queries against the pool. Shared by all RPCs of a dispatch server; holds no per-query state.

    Args:
        config: Dispatch settings (catalog, limits, deadlines).
        triton: Client of the Triton server that serves the pool.
        classifier: Classifier client; None runs unclassified.
        router: The routing policy; None asks ``config.default_model`` unless a request names one.
        registry: A live view of the registry (health, latency); None uses the catalog alone.
        reporter: Sends every model call's outcome to the registry; None reports nothing.
        ranking: Orders the candidates of open-answer fan-outs; None keeps the predicted-quality order.
        fusion: Fuses a fan-out's candidates (calibrated vote, or a generated answer); None votes in
            dispatch (uncalibrated confidence: the winner's weighted share).
        generator: Makes the model calls; None uses ``triton`` (unit tests pass a fake).
        bounds: Plans error-bounded queries (``AskRequest.alpha``); None refuses them.
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
        generator: Generator | None = None,
        budgets: TenantBudgets | None = None,
        bounds: BoundedPlanner | None = None,
    ):
        self.config = config
        self.budgets = budgets
        self.triton = triton
        self.classifier = classifier
        self.router = router
        self.planner = Planner(
            config, triton.url, router=router, registry=registry, ranking=ranking is not None, bounds=bounds
        )
        self.accounting = Accounting(config, registry, reporter)
        self.tools = Toolkit(
            config=config,
            caller=ModelCaller(generator or triton, self.entry, self.accounting),
            accounting=self.accounting,
            aggregator=Aggregator(config, ranking, fusion),
            require_model=self._require_model,
            ask_part=self._ask_part,
        )
        self.strategies: dict[str, Strategy] = {policy: cls(self.tools) for policy, cls in STRATEGIES.items()}
        self.triton_up = True
        """False while Triton fails its liveness checks (:class:`services.dispatch.health.TritonWatch`):
        requests fail fast with UNAVAILABLE instead of waiting on a dead server."""

    @property
    def wants_embedding(self) -> bool:
        return self.config.classify_embedding or (self.router is not None and self.router.predictor is not None)

    def entry(self, model: str) -> ModelEntry:
        """How to reach ``model`` (see :meth:`Planner.entry`)."""
        return self.planner.entry(model)

    def pool(self) -> list[PoolModel]:
        """The models routing may choose (see :meth:`Planner.pool`)."""
        return self.planner.pool()

    def plan(self, query: Query, classification: Classification | None = None) -> PlanMade:
        """Who answers (see :meth:`Planner.plan`)."""
        return self.planner.plan(query, classification)

    def hedge_delay_s(self, model: str) -> float:
        """How long to wait for ``model``'s first token before hedging (see :meth:`Accounting.hedge_delay_s`)."""
        return self.accounting.hedge_delay_s(model)

    async def _require_model(self, model: str) -> None:
        await self.triton.require_model(self.entry(model).triton_model or model)

    async def classify(
        self, prompt: str, remaining_s: float | None, *, embedding: bool = True
    ) -> Classification | None:
        """The classifier's answer, or None when there is no classifier or it failed in time.

        The call's deadline is ``min(classify_timeout_s, remaining_s)``. Failures are recorded on the
        current span and counted, never raised: routing falls back to its defaults. The embedding (the
        encoder's ~30 ms on 2 cores) is asked for only when ``embedding`` and routing will read it.
        """
        classification, _ = await self._classify(prompt, remaining_s, embedding=embedding)
        return classification

    async def _classify(
        self, prompt: str, remaining_s: float | None, *, embedding: bool
    ) -> tuple[Classification | None, ConstellationError | None]:
        """:meth:`classify`, and the classifier's failure when it had one."""
        if self.classifier is None:
            return None, None
        timeout = (
            self.config.classify_timeout_s if remaining_s is None else min(self.config.classify_timeout_s, remaining_s)
        )
        try:
            classification = await self.classifier.classify(
                prompt, timeout_s=timeout, omit_embedding=not (embedding and self.wants_embedding)
            )
        except ConstellationError as exc:
            CLASSIFY_FAILURES.labels(exc.code.name).inc()
            trace.get_current_span().add_event("classification_failed", {"error": str(exc)})
            log.warning("classification failed, going on unclassified: %s", exc)
            return None, exc
        return classification, None

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
        span = trace.get_current_span()
        tenant = current_tenant()
        if self.budgets is not None:
            self.budgets.admit(tenant)
        if query.request_tag:
            span.set_attribute(semconv.REQUEST_TAG, query.request_tag)
        parts = split(query.prompt) if query.decompose and not query.model else None
        if parts is not None:
            async for event in self._ask_decomposed(query, [p.text for p in parts], deadline_s, received_at):
                yield event
            return
        stages: list[Stage] = []
        classify_start = time.perf_counter()
        stages.append(Stage("validate", (classify_start - received_at) * 1000))
        if not self.triton_up:
            raise Unavailable(
                "the model server is not reachable at the moment; retry later",
                retry_after_s=max(self.config.triton_check_s, 1.0),
                reason="TRITON_UNAVAILABLE",
                detail=f"Triton at {self.triton.url} did not answer its last liveness check",
            )
        classification, lost = await self._classify(query.prompt, deadline_s, embedding=not query.model)
        if classification is not None:
            span.set_attribute(semconv.TASK, common_pb2.TaskType.Name(classification.task))
            span.set_attribute(semconv.COMPLEXITY, common_pb2.Complexity.Name(classification.complexity))
            span.set_attribute(semconv.CLASSIFIED_BY, classification.decided_by)
            stages.append(Stage("classify", (time.perf_counter() - classify_start) * 1000))
            yield Classified(without_embedding(classification))
        plan_start = time.perf_counter()
        plan = self.plan(query, classification)
        stages.append(Stage("plan", (time.perf_counter() - plan_start) * 1000))
        span.set_attribute(semconv.ROUTE, plan.policy)
        budget = self.config.default_timeout_s if deadline_s is None else deadline_s
        if query.time_budget_ms:
            budget = min(budget, query.time_budget_ms / 1000)
        run = Run(query, plan, answer_kind_of(classification), received_at, received_at + budget, stages)
        FANOUT.observe(len(plan.members))
        degraded = None if lost is None or query.model else _classification_lost(lost, plan)
        async for event in self._metered(tenant, plan, self.strategy_for(plan).run(run)):
            if degraded is not None and isinstance(event, Finished):
                event = replace(event, problems=[degraded, *event.problems])
            yield event

    async def _metered(
        self, tenant: str, plan: PlanMade, events: AsyncGenerator[Event, None]
    ) -> AsyncGenerator[Event, None]:
        """``events``, with the plan's predicted cost reserved first and the actual cost charged at the end.

        The actual cost is the final event's (every member's calls), or, when the request ends early, the
        sum of the members' costs reported so far. Raises ResourceExhausted when the budget cannot hold
        the prediction.
        """
        if self.budgets is None:
            async for event in events:
                yield event
            return
        reservation = self.budgets.reserve(tenant, sum(m.cost_usd for m in plan.members))
        so_far, final = 0.0, None
        try:
            async for event in events:
                if isinstance(event, CandidateProgress) and event.phase in _ENDED:
                    so_far += event.cost_usd
                elif isinstance(event, Finished):
                    final = event
                yield event
        finally:
            if final is not None:
                self.budgets.settle(reservation, final.cost_usd, final.input_tokens, final.output_tokens)
            else:
                self.budgets.settle(reservation, so_far)

    async def _ask_decomposed(
        self, query: Query, parts: list[str], deadline_s: float | None, received_at: float
    ) -> AsyncGenerator[Event, None]:
        """A multi-part prompt: each part a whole Ask of its own (strategies/decomposed.py)."""
        trace.get_current_span().set_attribute(semconv.ROUTE, Policy.DECOMPOSED)
        budget = self.config.default_timeout_s if deadline_s is None else deadline_s
        if query.time_budget_ms:
            budget = min(budget, query.time_budget_ms / 1000)
        summary = f"{len(parts)} independent parts, each planned on its own"
        plan = PlanMade(Policy.DECOMPOSED, [], summary, profile=query.profile, parts=tuple(parts))
        stages = [Stage("validate", (time.perf_counter() - received_at) * 1000)]
        run = Run(query, plan, "", received_at, received_at + budget, stages)
        async for event in self.strategies[Policy.DECOMPOSED].run(run):
            yield event

    def _ask_part(self, query: Query, deadline_s: float, received_at: float) -> AsyncGenerator[Event, None]:
        """One sub-query of a decomposed prompt, asked whole."""
        return self.ask(query, deadline_s=deadline_s, received_at=received_at)

    def strategy_for(self, plan: PlanMade) -> Strategy:
        """The strategy registered for the plan's policy; a policy without one runs by its size."""
        found = self.strategies.get(plan.policy)
        if found is not None:
            return found
        return self.strategies[Policy.VOTE if len(plan.members) > 1 else Policy.SINGLE]


def _classification_lost(error: ConstellationError, plan: PlanMade) -> ConstellationError:
    """The problem a routed request survived when the classifier failed: it was planned unclassified
    (task, answer kind and expected length unknown), which usually means one model instead of a fan-out.
    Counted in ``constellation_degraded_plans_total``."""
    DEGRADED_PLANS.labels("classification_lost").inc()
    trace.get_current_span().set_attribute(semconv.DEGRADED, "classification_lost")
    cls = type(error) if isinstance(error, Retryable) else Unavailable
    return cls(
        f"the classifier did not answer ({error.code.name}); the request was planned unclassified "
        f"({plan.policy} of {len(plan.members)} model(s)) and may be answered less well",
        reason="CLASSIFICATION_LOST",
    )
