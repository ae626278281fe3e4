"""DispatchService over gRPC: maps protobuf to the pipeline's domain types and back, nothing more."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from google.rpc import status_pb2

from constellation.errors import ConstellationError, abort, to_status_proto
from constellation.semconv import Phase
from constellation.v1 import common_pb2, dispatch_pb2, dispatch_pb2_grpc
from services.dispatch.config import DispatchConfig
from services.dispatch.events import CandidateProgress, Classified, Delta, Event, Finished, PartResult, PlanMade
from services.dispatch.pipeline import Dispatcher
from services.dispatch.query import Query, validate

SERVICE_NAME = dispatch_pb2.DESCRIPTOR.services_by_name["DispatchService"].full_name

_PHASES = {
    Phase.STARTED: dispatch_pb2.CandidateEvent.PHASE_STARTED,
    Phase.FIRST_TOKEN: dispatch_pb2.CandidateEvent.PHASE_FIRST_TOKEN,
    Phase.FINISHED: dispatch_pb2.CandidateEvent.PHASE_FINISHED,
    Phase.CANCELLED: dispatch_pb2.CandidateEvent.PHASE_CANCELLED,
    Phase.FAILED: dispatch_pb2.CandidateEvent.PHASE_FAILED,
}


def to_query(request: dispatch_pb2.AskRequest, config: DispatchConfig) -> Query:
    """Validates an AskRequest. Raises InvalidArgument with a violation per bad field."""
    sampling = request.sampling
    return validate(
        prompt=request.prompt,
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature if sampling.HasField("temperature") else None,
        top_p=sampling.top_p if sampling.HasField("top_p") else None,
        stop=list(sampling.stop),
        seed=sampling.seed if sampling.HasField("seed") else None,
        model=request.model,
        time_budget_ms=request.time_budget_ms,
        request_tag=request.request_tag,
        max_prompt_chars=config.max_prompt_chars,
        max_tokens_limit=config.max_tokens_limit,
        default_max_tokens=config.default_max_tokens,
        profile=_profile_name(request.profile, config.default_profile),
        weights=(
            (request.weights.quality, request.weights.cost, request.weights.latency)
            if request.HasField("weights")
            else None
        ),
        max_cost_usd=request.ceilings.max_cost_usd,
        max_latency_ms=request.ceilings.max_latency_ms,
        required_capabilities=list(request.ceilings.required_capabilities),
        alpha=request.alpha,
        label_alpha=dict(request.label_alpha),
        decompose=request.decomposition != dispatch_pb2.DECOMPOSITION_OFF,
    )


def _profile_name(value: common_pb2.Profile.ValueType, default: str) -> str:
    """``PROFILE_BALANCED`` -> ``balanced``; unspecified -> the configured default; unknown numbers stay visible."""
    if value == common_pb2.PROFILE_UNSPECIFIED:
        return default
    try:
        return common_pb2.Profile.Name(value).removeprefix("PROFILE_").lower()
    except ValueError:
        return f"unknown profile {value}"


def plan_message(event: PlanMade) -> common_pb2.Plan:
    """The plan with every candidate considered: chosen ones first, by wave, then the rest by score."""
    candidates = event.candidates or event.members
    bounded = event.bounded.plan if event.bounded is not None else None
    samples = dict(zip(bounded.members, bounded.counts, strict=True)) if bounded is not None else {}
    return common_pb2.Plan(
        alpha=bounded.alpha if bounded is not None else {},
        error_bounds=bounded.bound_per_label if bounded is not None else {},
        policy=event.policy,
        profile=_PROFILES.get(event.profile, common_pb2.PROFILE_UNSPECIFIED),
        summary=event.summary,
        quorum=event.quorum,
        time_budget_ms=event.time_budget_ms,
        candidates=[
            common_pb2.PlanCandidate(
                model=c.model,
                score=c.score,
                predicted_quality=c.quality,
                predicted_cost_usd=c.cost_usd,
                predicted_latency_ms=c.latency_ms,
                chosen=c.chosen,
                reason=c.reason,
                wave=c.wave,
                samples=samples.get(c.model, 0),
                cost_estimated=c.cost_estimated,
            )
            for c in sorted(candidates, key=lambda c: (not c.chosen, c.wave, -c.score))
        ],
    )


_PROFILES = {
    "quality": common_pb2.PROFILE_QUALITY,
    "cost": common_pb2.PROFILE_COST,
    "speed": common_pb2.PROFILE_SPEED,
    "balanced": common_pb2.PROFILE_BALANCED,
}


def to_response(event: Event) -> dispatch_pb2.AskResponse:
    """One domain event as one AskResponse."""
    if isinstance(event, Delta):
        return dispatch_pb2.AskResponse(delta=dispatch_pb2.AnswerDelta(text=event.text, source=event.source))
    if isinstance(event, Classified):
        return dispatch_pb2.AskResponse(
            classification=dispatch_pb2.ClassificationEvent(classification=event.classification)
        )
    if isinstance(event, PlanMade):
        return dispatch_pb2.AskResponse(plan=dispatch_pb2.PlanEvent(plan=plan_message(event)))
    if isinstance(event, CandidateProgress):
        candidate = dispatch_pb2.CandidateEvent(
            model=event.model,
            phase=_PHASES[event.phase],
            elapsed_ms=event.elapsed_ms,
            usage=common_pb2.Usage(
                input_tokens=event.input_tokens, output_tokens=event.output_tokens, cost_usd=event.cost_usd
            ),
            text=event.text,
        )
        if event.error is not None:
            candidate.error.CopyFrom(to_status_proto(event.error, service="dispatch"))
        return dispatch_pb2.AskResponse(candidate=candidate)
    if isinstance(event, Finished):
        return dispatch_pb2.AskResponse(
            final=dispatch_pb2.FinalEvent(
                text=event.text,
                usage=common_pb2.Usage(
                    input_tokens=event.input_tokens,
                    output_tokens=event.output_tokens,
                    cost_usd=event.cost_usd,
                ),
                stages=[
                    common_pb2.StageLatency(stage=s.name, milliseconds=s.ms, simulated=s.simulated)
                    for s in event.stages
                ],
                trace_id=event.trace_id,
                finish_reason=event.finish_reason,
                models=event.models,
                confidence=event.confidence,
                uncertain=event.uncertain,
                status=_survived(event.problems),
                decision=event.decision,
                error_bounds=event.error_bounds,
                parts=[_part_message(p) for p in event.parts],
            )
        )
    raise TypeError(f"unknown event {event!r}")


def cut_response(error: ConstellationError) -> dispatch_pb2.AskResponse:
    """The last event of an Ask that shutdown cut: a final event whose status says why (drain window over)."""
    status = to_status_proto(error, service="dispatch")
    return dispatch_pb2.AskResponse(final=dispatch_pb2.FinalEvent(finish_reason="cancelled", status=status))


def _part_message(part: PartResult) -> dispatch_pb2.PartAnswer:
    """One sub-query's answer, with its own status."""
    return dispatch_pb2.PartAnswer(
        index=part.index,
        prompt=part.prompt,
        text=part.text,
        policy=part.policy,
        models=part.models,
        usage=common_pb2.Usage(
            input_tokens=part.input_tokens, output_tokens=part.output_tokens, cost_usd=part.cost_usd
        ),
        status=_survived([part.error] if part.error is not None else []),
    )


def _survived(problems: list[ConstellationError]) -> status_pb2.Status:
    """OK, or the first problem the request survived (a member that failed and was replaced)."""
    if not problems:
        return status_pb2.Status(code=0, message="")
    first = to_status_proto(problems[0], service="dispatch")
    if len(problems) > 1:
        first.message += f" (and {len(problems) - 1} more member failures)"
    return first


class DispatchServicer(dispatch_pb2_grpc.DispatchServiceServicer):
    """Thin gRPC layer over :class:`Dispatcher`. Errors end the call with a rich status."""

    def __init__(self, dispatcher: Dispatcher):
        self.dispatcher = dispatcher

    async def Ask(
        self, request: dispatch_pb2.AskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dispatch_pb2.AskResponse]:
        received_at = time.perf_counter()
        try:
            query = to_query(request, self.dispatcher.config)
            stream = self.dispatcher.ask(query, deadline_s=context.time_remaining(), received_at=received_at)
            async with aclosing(stream) as events:
                async for event in events:
                    yield to_response(event)
        except ConstellationError as error:
            await abort(context, error, service="dispatch")

    async def Plan(
        self, request: dispatch_pb2.PlanRequest, context: grpc.aio.ServicerContext
    ) -> dispatch_pb2.PlanResponse:
        try:
            query = to_query(request.request, self.dispatcher.config)
        except ConstellationError as error:
            await abort(context, error, service="dispatch")
        classification = await self.dispatcher.classify(
            query.prompt, context.time_remaining(), embedding=not query.model
        )
        try:
            plan = self.dispatcher.plan(query, classification)
        except ConstellationError as error:
            await abort(context, error, service="dispatch")
        response = dispatch_pb2.PlanResponse(plan=plan_message(plan))
        if classification is not None:
            response.classification.CopyFrom(classification)
            del response.classification.embedding[:]
        return response
