"""RankingService over gRPC: maps protobuf to :class:`~services.ranking.rank.Ranker` and back."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from prometheus_client import Counter

from constellation.errors import ConstellationError, InternalError, ResourceExhausted, abort
from constellation.metrics import REGISTRY
from constellation.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc
from services.ranking.config import RankingConfig
from services.ranking.rank import CandidateText, Ranker, Ranking, validate_request

log = logging.getLogger(__name__)

SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name

RANKED = Counter(
    "constellation_ranking_candidates_total",
    "Candidates ranked, by the stage that ordered them (pairwise or first_stage) and whether they were pruned.",
    ["stage", "pruned"],
    registry=REGISTRY,
)

KINDS = {
    common_pb2.ANSWER_KIND_NUMBER: "number",
    common_pb2.ANSWER_KIND_CHOICE: "choice",
    common_pb2.ANSWER_KIND_CODE: "code",
    common_pb2.ANSWER_KIND_OPEN: "open",
}
"""Answer kinds by enum value; ANSWER_KIND_UNSPECIFIED (and unknown values) rank as open text."""


def to_response(request: ranking_pb2.RankRequest, ranking: Ranking) -> ranking_pb2.RankResponse:
    """The response for ``ranking``: every request candidate once, in ranked order."""
    response = ranking_pb2.RankResponse()
    for item in ranking.ranked:
        RANKED.labels(ranking.stage, str(item.pruned).lower()).inc()
        scored = response.candidates.add(score=item.score, rank=item.rank, pruned=item.pruned)
        scored.candidate.CopyFrom(request.candidates[item.index])
    return response


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Thin gRPC layer over :class:`Ranker`.

    ``Rank`` is idempotent and side-effect free. The CPU work (encoder, first stage, pairwise MLP) runs
    on one worker thread, so requests are ranked one at a time in arrival order and the event loop never
    blocks; at most ``queue_max`` wait (beyond: RESOURCE_EXHAUSTED). A cancelled or expired call that is
    still waiting is dropped before any work; one already running finishes on the worker and is discarded.
    """

    def __init__(self, ranker: Ranker, config: RankingConfig):
        self.ranker = ranker
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ranking")
        self.waiting = 0

    def close(self) -> None:
        """Stops the worker thread once the running request (if any) finishes."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankResponse:
        try:
            candidates = [CandidateText(c.text, c.normalized_answer, c.reliability) for c in request.candidates]
            validate_request(
                request.prompt,
                candidates,
                max_candidates=self.config.max_candidates,
                max_chars=self.config.max_text_chars,
            )
            if self.waiting >= self.config.queue_max:
                raise ResourceExhausted(
                    f"{self.waiting} rank requests are already waiting; retry later", reason="RANKING_QUEUE_FULL"
                )
            kind = KINDS.get(request.answer_kind, "open")
            loop = asyncio.get_running_loop()
            self.waiting += 1
            try:
                ranking = await loop.run_in_executor(
                    self.executor, self.ranker.rank, request.prompt, candidates, kind, request.keep
                )
            finally:
                self.waiting -= 1
        except ConstellationError as error:
            await abort(context, error, service="ranking")
        except Exception as exc:
            log.exception("Rank failed")
            await abort(context, InternalError(f"ranking failed: {exc!r}"), service="ranking")
        return to_response(request, ranking)
