"""A small async client for FusionService, for dispatch, the benchmarks and the tests.

Errors come back as the library's exception tree (:mod:`constellation.errors`), never as raw
``grpc.RpcError``: a bad request as ``InvalidArgument`` with its field violations, an unreachable
service as ``Unavailable``, a passed deadline as ``DeadlineExceeded``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from constellation.channel import ServiceClient, server_stream
from constellation.v1 import common_pb2, fusion_pb2, fusion_pb2_grpc


class FusionClient(ServiceClient[fusion_pb2_grpc.FusionServiceStub]):
    """One channel to a fusion server (see :class:`~constellation.channel.ServiceClient`)."""

    stub_class = fusion_pb2_grpc.FusionServiceStub

    def fuse(
        self,
        prompt: str,
        candidates: Sequence[common_pb2.ScoredCandidate],
        answer_kind: common_pb2.AnswerKind.ValueType,
        fuser_model: str = "",
        sampling: common_pb2.SamplingParams | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[fusion_pb2.FuseResponse]:
        """Streams the fused answer: ``delta`` messages, then one ``summary`` (whose text is the answer).

        Args:
            prompt: The user's query (required for open answers).
            candidates: Ranked candidates.
            answer_kind: How to fuse: vote for NUMBER/CHOICE, top candidate for CODE, generative for OPEN.
            fuser_model: Triton model that writes open answers; empty: the service default.
            sampling: The fuser's decoding settings; None: the service defaults.
            timeout_s: Deadline of the whole stream in seconds (pass ``min(own budget, time remaining)``;
                the service keeps a margin of it to return its fallback); None waits indefinitely.

        Raises:
            constellation.errors.ConstellationError: the call failed (mapped from its status).

        Leaving the loop early cancels the call, and with it the fuser's request to Triton.
        """
        request = fusion_pb2.FuseRequest(
            prompt=prompt,
            candidates=list(candidates),
            answer_kind=answer_kind,
            fuser_model=fuser_model,
            sampling=sampling,
        )
        return server_stream(lambda: self.stub.Fuse(request, timeout=timeout_s))
