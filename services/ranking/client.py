"""Async client of RankingService, for dispatch, the benchmark and the tests.

Errors come back as the library's exception tree (:mod:`constellation.errors`), never as raw
``grpc.RpcError``: INVALID_ARGUMENT as ``InvalidArgument`` with its field violations, a full queue as
``ResourceExhausted``, an unreachable service as ``Unavailable``, a passed deadline as ``DeadlineExceeded``.
"""

from __future__ import annotations

from collections.abc import Sequence

from constellation.channel import ServiceClient
from constellation.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc


class RankingClient(ServiceClient[ranking_pb2_grpc.RankingServiceStub]):
    """One channel to a ranking server (see :class:`~constellation.channel.ServiceClient`)."""

    stub_class = ranking_pb2_grpc.RankingServiceStub

    async def rank(
        self,
        prompt: str,
        candidates: Sequence[common_pb2.Candidate],
        answer_kind: common_pb2.AnswerKind.ValueType = common_pb2.ANSWER_KIND_UNSPECIFIED,
        keep: int = 0,
        timeout_s: float | None = None,
    ) -> list[common_pb2.ScoredCandidate]:
        """Ranks the candidate answers to ``prompt``; idempotent.

        Args:
            prompt: The query the candidates answer.
            candidates: At most 64 candidates (the service's ``max_candidates``).
            answer_kind: How to compare them; unspecified ranks them as open text.
            keep: Survivors of the cheap first stage; 0 lets the service decide (about a third of a large set).
            timeout_s: Deadline of the call in seconds (callers pass ``min(own budget, time remaining)``);
                None waits indefinitely. Ranking costs about 30 ms per candidate on one core.

        Returns:
            Every candidate once, best first, pruned ones last (``rank`` is the 0-based position).

        Raises:
            constellation.errors.ConstellationError: the call failed (mapped from its status).
        """
        request = ranking_pb2.RankRequest(prompt=prompt, candidates=candidates, answer_kind=answer_kind, keep=keep)
        response = await self.stub.Rank(request, timeout=timeout_s)
        return list(response.candidates)
