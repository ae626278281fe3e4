"""Who answers a query: the pool view (catalog + registry) and the plan made over it.

A plan names its policy (a :class:`~constellation.semconv.Policy`), its members by wave and every
candidate considered with the reason for the decision; strategies execute it.
"""

from __future__ import annotations

import math
import time

import numpy as np

from constellation.errors import FailedPrecondition, FieldViolation, InvalidArgument, Unavailable
from constellation.semconv import Policy
from constellation.v1 import common_pb2, registry_pb2
from constellation.v1.common_pb2 import Classification
from services.dispatch.bounds import BoundedPlan, BoundedPlanner
from services.dispatch.capacity import cold_start_ms
from services.dispatch.config import DispatchConfig, ModelEntry
from services.dispatch.events import PlanMade
from services.dispatch.query import Query
from services.dispatch.routing import PlannedModel, PoolModel, Route, Router, Weights, estimate_tokens
from services.registry.client import RegistryView

ANSWER_KINDS = {
    common_pb2.ANSWER_KIND_NUMBER: "number",
    common_pb2.ANSWER_KIND_CHOICE: "choice",
    common_pb2.ANSWER_KIND_CODE: "code",
    common_pb2.ANSWER_KIND_OPEN: "open",
}
"""The classifier's answer kinds by the names routing and answer extraction use."""

ANSWER_KIND_ENUMS = {name: value for value, name in ANSWER_KINDS.items()}

SURE_CHARS_PER_TOKEN = 3.0
"""Characters per token when routing must be sure a prompt fits: English prose runs about 4 characters
per token, code and non-Latin text fewer, so 3 overestimates the tokens of most prompts."""

LENIENT_CHARS_PER_TOKEN = 4.0
"""Characters per token when refusing a prompt: only a prompt too long even at this ratio is refused
before a model sees it; the model's own tokenizer judges the rest (its refusal is INVALID_ARGUMENT too)."""


def prompt_tokens(prompt: str, chars_per_token: float) -> int:
    """The prompt's length in tokens, estimated at ``chars_per_token``."""
    return math.ceil(len(prompt) / chars_per_token)


def answer_kind_of(classification: Classification | None) -> str:
    """The query's answer kind by name; empty when unclassified or unknown."""
    return ANSWER_KINDS.get(classification.answer_kind, "") if classification is not None else ""


class Planner:
    """Plans queries over the pool that one Triton endpoint serves.

    Args:
        config: Dispatch settings (catalog, default model).
        endpoint: ``host:port`` of our Triton; registry models served elsewhere are left out of the pool.
        router: The routing policy; None asks ``config.default_model`` unless a request names one.
        registry: A live view of the registry (health, latency); None uses the catalog alone.
        ranking: Whether a ranking service can pick the answer of a ranked fan-out.
        bounds: Plans error-bounded queries (``AskRequest.alpha``); None refuses them.
    """

    def __init__(
        self,
        config: DispatchConfig,
        endpoint: str,
        *,
        router: Router | None = None,
        registry: RegistryView | None = None,
        ranking: bool = False,
        bounds: BoundedPlanner | None = None,
    ):
        self.config = config
        self.endpoint = endpoint
        self.router = router
        self.registry = registry
        self.ranking = ranking
        self.bounds = bounds
        self.catalog = config.catalog()

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
            if name not in self.catalog and known.backend.endpoint in ("", self.endpoint)
        ]
        return [pool_model(name, self.entry(name), records.get(name)) for name in names]

    def plan(self, query: Query, classification: Classification | None = None) -> PlanMade:
        """Who answers: the requested model, else the router's choice over the pool, else the default model.

        Raises:
            InvalidArgument: the prompt does not fit the context of the requested model (or of any model).
            FailedPrecondition: routing found no model within the request's ceilings.
            Unavailable: no model could take the request because those that could are unhealthy now.
        """
        tokens = prompt_tokens(query.prompt, LENIENT_CHARS_PER_TOKEN)
        if query.model:
            _require_fit(query.model, self.entry(query.model).context_length, tokens)
            return _alone(Policy.REQUESTED, query, query.model, "requested by the caller (AskRequest.model)")
        pool = self.pool()
        if self.router is not None and pool:
            pool = self._fitting(pool, query.prompt)
        if query.bounded:
            return self.plan_bounded(query, pool)
        if self.router is None or not pool:
            reason = "default model (no routing policy or no pool configured)"
            _require_fit(self.config.default_model, self.entry(self.config.default_model).context_length, tokens)
            return _alone(Policy.SINGLE, query, self.config.default_model, reason)
        try:
            route = self._route(query, pool, classification)
        except FailedPrecondition as exc:
            if any(not model.healthy for model in pool):
                # Models the registry marks unhealthy may recover: the same request may succeed later.
                raise Unavailable(
                    "no model that could take this request is healthy at the moment; retry later",
                    retry_after_s=2.0,
                    reason="NO_HEALTHY_MODEL",
                    detail=exc.message,
                ) from exc
            raise
        return PlanMade(
            route.policy,
            route.members,
            route.summary,
            route.candidates,
            route.profile,
            route.quorum,
            query.time_budget_ms,
        )

    def _fitting(self, pool: list[PoolModel], prompt: str) -> list[PoolModel]:
        """The models of ``pool`` whose context holds ``prompt`` (a model of unknown context always does).

        Models that surely hold it when there are any, else those that may (see the two ratios).

        Raises:
            InvalidArgument: no model's context can hold the prompt; names the largest context.
        """
        contexts = {model.name: self.entry(model.name).context_length for model in pool}
        for ratio in (SURE_CHARS_PER_TOKEN, LENIENT_CHARS_PER_TOKEN):
            tokens = prompt_tokens(prompt, ratio)
            fitting = [model for model in pool if not contexts[model.name] or contexts[model.name] >= tokens]
            if fitting:
                return fitting
        raise _too_long(tokens, max(contexts.values()), "the largest context of the pool")

    def _route(self, query: Query, pool: list[PoolModel], classification: Classification | None) -> Route:
        """The router's route over ``pool`` for ``query``."""
        assert self.router is not None
        embedding = None
        expected_tokens = None
        if classification is not None:
            if classification.embedding:
                embedding = np.asarray(classification.embedding, dtype=np.float32)
            expected_tokens = classification.expected_output_tokens or None
        return self.router.route(
            pool,
            embedding=embedding,
            answer_kind=answer_kind_of(classification),
            input_tokens=estimate_tokens(query.prompt),
            expected_output_tokens=expected_tokens,
            profile=query.profile,
            weights=Weights(*query.weights) if query.weights is not None else None,
            max_cost_usd=query.max_cost_usd,
            max_latency_ms=query.max_latency_ms,
            required_capabilities=query.required_capabilities,
            ranking=self.ranking,
            deadline_ms=query.time_budget_ms,
        )

    def plan_bounded(self, query: Query, pool: list[PoolModel]) -> PlanMade:
        """The cheapest plan whose vote meets the query's error bound for every label (``planned``).

        Repeated samples of a model (up to ``config.max_samples``) are planned only when the query
        samples at temperature > 0; otherwise each model is asked once.

        Raises:
            FailedPrecondition: no matrices loaded, or the prompt is of no fitted kind.
            InvalidArgument: a bound outside (0, 1) for some label, or no plan meets it.
        """
        if self.bounds is None:
            raise FailedPrecondition(
                "error-bounded queries need confusion matrices; train them with `constellation train confusion`",
                reason="CONFUSION_NOT_TRAINED",
            )
        kind = self.bounds.kind_of(query.prompt)
        if kind is None:
            known = ", ".join(f"{k.name} ({''.join(k.labels)})" for k in self.bounds.kinds.values())
            raise FailedPrecondition(
                f"an error bound needs a closed-answer prompt whose options match a fitted kind: {known}",
                reason="NO_KIND_FOR_PROMPT",
            )
        hot = query.sampling.temperature is not None and query.sampling.temperature > 0
        made = self.bounds.plan(kind, query.alpha_for(kind.labels), pool, samples=self.config.max_samples if hot else 1)
        return bounded_plan_event(made, query)


def _require_fit(model: str, context_length: int, tokens: int) -> None:
    """Raises InvalidArgument when ``model``'s known context cannot hold ``tokens`` prompt tokens."""
    if context_length and tokens > context_length:
        raise _too_long(tokens, context_length, f"the context of {model}")


def _too_long(tokens: int, context_length: int, whose: str) -> InvalidArgument:
    description = (
        f"is about {tokens} tokens (estimated at {LENIENT_CHARS_PER_TOKEN:g} characters per token); "
        f"{whose} holds {context_length} tokens"
    )
    return InvalidArgument(
        f"the prompt is too long: {description}",
        [FieldViolation("prompt", description)],
        reason="PROMPT_TOO_LONG",
        metadata={"context_length": str(context_length), "estimated_prompt_tokens": str(tokens)},
    )


def bounded_plan_event(made: BoundedPlan, query: Query) -> PlanMade:
    """The ``planned`` PlanMade of an error-bounded plan: one member per model (its samples in the reason)."""
    chosen = made.plan
    vote_accuracy = {m: matrix.accuracy_per_label for m, matrix in made.matrices.items()}
    members = [
        PlannedModel(
            model,
            quality=float(np.mean(list(vote_accuracy[model].values()))),
            cost_usd=made.call_costs[model] * count,
            chosen=True,
            score=1.0,
            reason=f"{count} call{'s' if count > 1 else ''} in the error-bounded plan",
        )
        for model, count in zip(chosen.members, chosen.counts, strict=True)
    ]
    bounds = ", ".join(f"{label} {b:.3g}" for label, b in chosen.bound_per_label.items())
    summary = f"{made.kind}: {len(chosen.calls())} calls, cost {chosen.cost:.6g}, certified error {bounds}"
    return PlanMade(Policy.PLANNED, members, summary, members, query.profile, bounded=made)


def _alone(policy: Policy, query: Query, model: str, reason: str) -> PlanMade:
    """A plan of one model chosen without routing."""
    member = PlannedModel(model, score=1.0, chosen=True, reason=reason)
    return PlanMade(policy, [member], f"ask {model} alone", [member], query.profile)


def pool_model(name: str, entry: ModelEntry, record: registry_pb2.ModelRecord | None) -> PoolModel:
    """What routing knows of one model: the catalog's entry, with the registry's live figures when known."""
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
    return PoolModel(
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
        cold_start_ms=cold_start_ms(record, time.time()),
    )


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
        context_length=record.context_length,
    )


def without_embedding(classification: Classification) -> Classification:
    """The classification as the caller sees it: the 384 floats of the embedding stay inside dispatch."""
    if not classification.embedding:
        return classification
    copy = Classification()
    copy.CopyFrom(classification)
    del copy.embedding[:]
    return copy
