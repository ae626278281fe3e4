"""A small async client for ClassifierService, for dispatch, the benchmarks and the tests.

Errors come back as the library's exception tree (:mod:`constellation.errors`), never as raw
``grpc.RpcError``: INVALID_ARGUMENT as ``InvalidArgument`` with its field violations, a full encoder
queue as ``ResourceExhausted``, an unreachable service as ``Unavailable``, a passed deadline as
``DeadlineExceeded``.
"""

from __future__ import annotations

from collections.abc import Sequence

from constellation.channel import ServiceClient
from constellation.v1 import classifier_pb2, classifier_pb2_grpc, common_pb2


class ClassifierClient(ServiceClient[classifier_pb2_grpc.ClassifierServiceStub]):
    """One channel to a classifier server (see :class:`~constellation.channel.ServiceClient`)."""

    stub_class = classifier_pb2_grpc.ClassifierServiceStub

    async def classify(
        self, prompt: str, timeout_s: float | None = None, *, omit_embedding: bool = False
    ) -> common_pb2.Classification:
        """Classifies one prompt.

        Args:
            prompt: The query, as the user sent it.
            timeout_s: Deadline of the call in seconds (callers pass ``min(own budget, time remaining)``);
                None waits indefinitely.
            omit_embedding: Skip the 384-float embedding (cheaper when routing does not need it).

        Raises:
            constellation.errors.ConstellationError: the call failed (mapped from its status).
        """
        request = classifier_pb2.ClassifyRequest(prompt=prompt, omit_embedding=omit_embedding)
        response = await self.stub.Classify(request, timeout=timeout_s)
        return response.classification

    async def classify_batch(
        self, prompts: Sequence[str], timeout_s: float | None = None, *, omit_embedding: bool = False
    ) -> list[common_pb2.Classification]:
        """Classifies many prompts in one call; results are in ``prompts`` order.

        Raises:
            constellation.errors.ConstellationError: the call failed; an ``InvalidArgument`` names each
                bad prompt as ``requests[i].prompt``.
        """
        request = classifier_pb2.ClassifyBatchRequest(
            requests=[classifier_pb2.ClassifyRequest(prompt=p, omit_embedding=omit_embedding) for p in prompts]
        )
        response = await self.stub.ClassifyBatch(request, timeout=timeout_s)
        return list(response.classifications)
