"""FusionService over gRPC: validates a FuseRequest, maps it to :class:`~services.fusion.fuse.Fuser` and
streams the result back as FuseResponse messages (deltas, then one summary)."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator

import grpc
from prometheus_client import Counter

from constellation.errors import ConstellationError, FieldViolation, InternalError, InvalidArgument, abort
from constellation.metrics import REGISTRY
from constellation.triton import Sampling
from constellation.v1 import common_pb2, fusion_pb2, fusion_pb2_grpc
from services.fusion.config import FusionConfig
from services.fusion.fuse import FuseCandidate, FuseInput, Fuser, FuseResult

log = logging.getLogger(__name__)

SERVICE_NAME = fusion_pb2.DESCRIPTOR.services_by_name["FusionService"].full_name

FUSIONS = Counter(
    "constellation_fusion_results_total",
    "Fused answers, by answer kind, method and whether the answer was flagged uncertain.",
    ["kind", "method", "uncertain"],
    registry=REGISTRY,
)

KINDS = {
    common_pb2.ANSWER_KIND_NUMBER: "number",
    common_pb2.ANSWER_KIND_CHOICE: "choice",
    common_pb2.ANSWER_KIND_CODE: "code",
    common_pb2.ANSWER_KIND_OPEN: "open",
}
MAX_TOKENS = 4096
MAX_STOPS = 8
MAX_STOP_CHARS = 64


def _sampling_violations(sampling: common_pb2.SamplingParams) -> list[FieldViolation]:
    bad = []
    if sampling.max_tokens > MAX_TOKENS:
        bad.append(FieldViolation("sampling.max_tokens", f"must be in [1, {MAX_TOKENS}] (0: default)"))
    if sampling.HasField("temperature") and not (
        math.isfinite(sampling.temperature) and 0.0 <= sampling.temperature <= 2.0
    ):
        bad.append(FieldViolation("sampling.temperature", "must be in [0, 2]"))
    if sampling.HasField("top_p") and not (math.isfinite(sampling.top_p) and 0.0 < sampling.top_p <= 1.0):
        bad.append(FieldViolation("sampling.top_p", "must be in (0, 1]"))
    if len(sampling.stop) > MAX_STOPS:
        bad.append(FieldViolation("sampling.stop", f"at most {MAX_STOPS} stop strings"))
    for i, stop in enumerate(sampling.stop):
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            bad.append(FieldViolation(f"sampling.stop[{i}]", f"must be 1-{MAX_STOP_CHARS} characters"))
    return bad


def allowed_fusers(config: FusionConfig) -> list[str]:
    """The models a request may name as its fuser: the default first, then ``fuser_models``."""
    return list(dict.fromkeys([config.fuser_model, *config.fuser_models]))


def _fuser_violations(fuser_model: str, config: FusionConfig) -> list[FieldViolation]:
    allowed = allowed_fusers(config)
    if not fuser_model or fuser_model in allowed:
        return []
    shown = fuser_model if len(fuser_model) <= 64 else fuser_model[:64] + "..."
    return [
        FieldViolation(
            "fuser_model",
            f"{shown!r} is not a fuser model of this service; leave it empty for the default or name one of: "
            + ", ".join(allowed),
        )
    ]


def validate(request: fusion_pb2.FuseRequest, config: FusionConfig) -> None:
    """Raises InvalidArgument naming every bad field of ``request``."""
    bad: list[FieldViolation] = []
    kind = KINDS.get(request.answer_kind)
    if kind is None:
        bad.append(
            FieldViolation("answer_kind", "must be ANSWER_KIND_NUMBER, ANSWER_KIND_CHOICE, ANSWER_KIND_CODE or "
                           "ANSWER_KIND_OPEN")
        )  # fmt: skip
    if not request.candidates:
        bad.append(FieldViolation("candidates", "at least one candidate is required"))
    elif len(request.candidates) > config.max_candidates:
        bad.append(
            FieldViolation("candidates", f"holds {len(request.candidates)}; the limit is {config.max_candidates}")
        )
    for i, scored in enumerate(request.candidates):
        candidate = scored.candidate
        if not math.isfinite(candidate.reliability) or not 0.0 <= candidate.reliability <= 1.0:
            bad.append(FieldViolation(f"candidates[{i}].candidate.reliability", "must be in [0, 1]"))
        if not candidate.text.strip() and not candidate.normalized_answer.strip():
            bad.append(FieldViolation(f"candidates[{i}].candidate.text", "empty: a candidate needs text or an answer"))
    if kind == "open" and not request.prompt.strip():
        bad.append(FieldViolation("prompt", "generative fusion needs the query"))
    if len(request.prompt) > config.max_prompt_chars:
        bad.append(FieldViolation("prompt", f"longer than {config.max_prompt_chars} characters"))
    bad += _fuser_violations(request.fuser_model, config)
    bad += _sampling_violations(request.sampling)
    if bad:
        raise InvalidArgument("the fuse request is invalid", bad, reason="BAD_FUSE_REQUEST")


def to_input(request: fusion_pb2.FuseRequest, config: FusionConfig) -> FuseInput:
    """The domain request for a validated ``request``, with the service's sampling defaults filled in."""
    sampling = request.sampling
    return FuseInput(
        prompt=request.prompt,
        candidates=[
            FuseCandidate(
                model=s.candidate.model,
                text=s.candidate.text,
                normalized_answer=s.candidate.normalized_answer,
                reliability=s.candidate.reliability,
                rank=s.rank,
                pruned=s.pruned,
            )
            for s in request.candidates
        ],
        kind=KINDS[request.answer_kind],
        fuser_model=request.fuser_model,
        sampling=Sampling(
            max_tokens=sampling.max_tokens or config.fuser_max_tokens,
            temperature=sampling.temperature if sampling.HasField("temperature") else config.fuser_temperature,
            top_p=sampling.top_p if sampling.HasField("top_p") else None,
            stop=tuple(sampling.stop),
            seed=sampling.seed if sampling.HasField("seed") else None,
        ),
    )


def to_summary(result: FuseResult) -> fusion_pb2.FuseSummary:
    summary = fusion_pb2.FuseSummary(
        text=result.text,
        confidence=result.confidence,
        uncertain=result.uncertain,
        method=result.method,
        usage=common_pb2.Usage(
            input_tokens=result.input_tokens, output_tokens=result.output_tokens, cost_usd=result.cost_usd
        ),
    )
    if result.agreement is not None:
        a = result.agreement
        summary.agreement.CopyFrom(
            fusion_pb2.Agreement(
                answer=a.answer, weighted_share=a.weighted_share, votes_for=a.votes_for, votes_total=a.votes_total
            )
        )
    return summary


class FusionServicer(fusion_pb2_grpc.FusionServiceServicer):
    """Thin gRPC layer over :class:`Fuser`. Idempotent for closed and code answers; open answers call the
    fuser model once per request. Cancelling the call cancels the fuser's Triton request."""

    def __init__(self, fuser: Fuser, config: FusionConfig):
        self.fuser = fuser
        self.config = config

    async def Fuse(
        self, request: fusion_pb2.FuseRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fusion_pb2.FuseResponse]:
        try:
            validate(request, self.config)
            job = to_input(request, self.config)
            async for item in self.fuser.fuse(job, time_remaining_s=context.time_remaining()):
                if isinstance(item, str):
                    yield fusion_pb2.FuseResponse(delta=fusion_pb2.FusedDelta(text=item))
                else:
                    FUSIONS.labels(job.kind, item.method, str(item.uncertain).lower()).inc()
                    yield fusion_pb2.FuseResponse(summary=to_summary(item))
        except ConstellationError as error:
            await abort(context, error, service="fusion")
        except Exception as exc:
            log.exception("Fuse failed")
            await abort(context, InternalError(f"fusion failed: {exc!r}"), service="fusion")
