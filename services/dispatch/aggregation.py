"""From a fan-out's answers to one answer: rank (ranking service), fuse (fusion service) or vote locally.

Ranking orders open-answer candidates; fusion votes with calibrated confidence or writes a fused answer;
without a fusion service (or when it fails before streaming) dispatch votes itself, with uncalibrated
confidence (the winner's weighted share).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from opentelemetry import trace

from constellation import semconv, telemetry
from constellation.errors import ConstellationError
from constellation.ml.vote import Ballot, tally
from constellation.v1 import common_pb2
from services.dispatch.calls import CallResult, Run
from services.dispatch.config import DispatchConfig
from services.dispatch.events import Delta, Event, Finished, Stage
from services.dispatch.planning import ANSWER_KIND_ENUMS
from services.dispatch.routing import CLOSED_KINDS
from services.fusion.client import FusionClient
from services.ranking.client import RankingClient

log = logging.getLogger(__name__)


@dataclass
class Fused:
    """What the fusion service returned."""

    text: str = ""
    confidence: float = 0.0
    uncertain: bool = False
    method: str = ""
    cost_usd: float = 0.0
    streamed: bool = False


@dataclass
class Decision:
    """The answer chosen among the candidates, and by whom (``answering`` is None for a fused text)."""

    text: str
    confidence: float
    uncertain: bool
    answering: CallResult | None
    method: str
    cost_usd: float = 0.0


def candidate_message(result: CallResult) -> common_pb2.Candidate:
    """A finished call as the ranking and fusion services take it; its predicted quality is the
    candidate's ``reliability``."""
    return common_pb2.Candidate(
        model=result.model,
        text=result.text,
        normalized_answer=result.answer or "",
        usage=common_pb2.Usage(
            input_tokens=result.input_tokens, output_tokens=result.output_tokens, cost_usd=result.cost_usd
        ),
        latency_ms=(result.ended_at - result.started_at) * 1000,
        reliability=min(max(result.quality, 0.0), 1.0),
    )


def vote(ordered: list[CallResult]) -> Decision:
    """Dispatch's own vote, weighted by predicted quality; confidence is the winner's weighted share."""
    outcome = tally([Ballot(r.answer, r.quality, rank) for rank, r in enumerate(ordered)])
    if outcome.answer is None:
        answering = ordered[0]
    else:
        answering = max((ordered[i] for i in outcome.winners), key=lambda r: r.quality)
    uncertain = outcome.answer is None or outcome.weighted_share < 0.5
    return Decision(answering.text, outcome.weighted_share, uncertain, answering, "dispatch_vote")


class Aggregator:
    """Turns the deciding answers of a fan-out into the streamed answer and its ``Finished`` event.

    Args:
        config: Dispatch settings (rank and fuse deadlines).
        ranking: Orders open-answer candidates; None keeps the predicted-quality order.
        fusion: Fuses the candidates; None votes in dispatch.
    """

    def __init__(
        self, config: DispatchConfig, ranking: RankingClient | None = None, fusion: FusionClient | None = None
    ):
        self.config = config
        self.ranking = ranking
        self.fusion = fusion

    async def answer(
        self, run: Run, deciding: list[CallResult], results: list[CallResult], problems: list[ConstellationError]
    ) -> AsyncGenerator[Event, None]:
        """Streams the answer of ``deciding`` (ranked, fused or voted), then ``Finished`` for all ``results``."""
        ordered = sorted(deciding, key=lambda r: -r.quality)
        if self.ranking is not None and run.answer_kind not in CLOSED_KINDS and len(ordered) >= 2:
            rank_start = time.perf_counter()
            try:
                ordered = await self._rank(run, ordered)
            except ConstellationError as exc:
                problems.append(exc)
                log.warning("ranking failed, keeping the predicted-quality order: %s", exc)
            run.stages.append(Stage("rank", (time.perf_counter() - rank_start) * 1000))
        decision: Decision | None = None
        if self.fusion is not None:
            fuse_start = time.perf_counter()
            fused = Fused()
            try:
                async for piece in self._fuse(run, ordered, fused):
                    yield piece
                answering = next((r for r in ordered if r.text == fused.text), None)
                decision = Decision(
                    fused.text, fused.confidence, fused.uncertain, answering, fused.method, fused.cost_usd
                )
            except ConstellationError as exc:
                problems.append(exc)
                log.warning("fusion failed, voting in dispatch: %s", exc)
                if fused.streamed:
                    raise
            run.stages.append(Stage("fuse", (time.perf_counter() - fuse_start) * 1000))
        if decision is None:
            decision = vote(ordered)
            assert decision.answering is not None
            yield Delta(decision.text, decision.answering.model)
        yield _finished(run, decision, results, problems)

    async def _rank(self, run: Run, ordered: list[CallResult]) -> list[CallResult]:
        """The candidates in the ranking service's order (pruned ones last)."""
        assert self.ranking is not None
        timeout = min(self.config.rank_timeout_s, max(0.0, run.remaining_s()))
        scored = await self.ranking.rank(
            run.query.prompt,
            [candidate_message(r) for r in ordered],
            ANSWER_KIND_ENUMS.get(run.answer_kind, common_pb2.ANSWER_KIND_UNSPECIFIED),
            timeout_s=timeout,
        )
        by_model = {r.model: r for r in ordered}
        return [by_model[c.candidate.model] for c in scored if c.candidate.model in by_model]

    async def _fuse(self, run: Run, ordered: list[CallResult], fused: Fused) -> AsyncGenerator[Delta, None]:
        """Streams the fusion service's answer as deltas and fills ``fused`` from its summary."""
        assert self.fusion is not None
        timeout = min(self.config.fuse_timeout_s, max(0.0, run.remaining_s()))
        candidates = [
            common_pb2.ScoredCandidate(candidate=candidate_message(r), score=r.quality, rank=i)
            for i, r in enumerate(ordered)
        ]
        stream = self.fusion.fuse(
            run.query.prompt,
            candidates,
            ANSWER_KIND_ENUMS.get(run.answer_kind, common_pb2.ANSWER_KIND_OPEN),
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


def _finished(run: Run, decision: Decision, results: list[CallResult], problems: list[ConstellationError]) -> Finished:
    """The fan-out's ``Finished`` event; the Ask span gets the fan-out's size and the decision's method."""
    run.stages.append(Stage("total", run.elapsed_ms()))
    span = trace.get_current_span()
    span.set_attribute(semconv.FUSED_CONFIDENCE, decision.confidence)
    span.set_attribute(semconv.FUSED_METHOD, decision.method)
    answering = decision.answering
    first = [answering.model] if answering is not None else ["fusion"]
    return Finished(
        text=decision.text,
        input_tokens=sum(r.input_tokens for r in results),
        output_tokens=sum(r.output_tokens for r in results),
        cost_usd=sum(r.cost_usd for r in results) + decision.cost_usd,
        stages=run.stages,
        trace_id=telemetry.current_trace_id(),
        finish_reason=answering.finish_reason if answering is not None else "stop",
        models=[*first, *(r.model for r in results if r is not answering)],
        confidence=decision.confidence,
        uncertain=decision.uncertain,
        problems=problems,
    )
