"""ClassifierService over gRPC: maps protobuf to :class:`~services.classifier.classify.Classifier` and back."""

from __future__ import annotations

import logging

import grpc
from prometheus_client import Counter

from constellation.errors import ConstellationError, FieldViolation, InternalError, InvalidArgument, abort
from constellation.metrics import REGISTRY
from constellation.v1 import classifier_pb2, classifier_pb2_grpc, common_pb2
from services.classifier.classify import Classification, Classifier, validate_prompts
from services.classifier.config import ClassifierConfig

log = logging.getLogger(__name__)

SERVICE_NAME = classifier_pb2.DESCRIPTOR.services_by_name["ClassifierService"].full_name

DECISIONS = Counter(
    "constellation_classifier_decisions_total",
    "Classified prompts, by the path that decided the task and by task.",
    ["decided_by", "task"],
    registry=REGISTRY,
)

_TASKS = {
    "math": common_pb2.TASK_TYPE_MATH,
    "code": common_pb2.TASK_TYPE_CODE,
    "multiple_choice": common_pb2.TASK_TYPE_MULTIPLE_CHOICE,
    "extraction": common_pb2.TASK_TYPE_EXTRACTION,
    "writing": common_pb2.TASK_TYPE_WRITING,
    "reasoning": common_pb2.TASK_TYPE_REASONING,
    "dialogue": common_pb2.TASK_TYPE_DIALOGUE,
}
_COMPLEXITIES = {
    "low": common_pb2.COMPLEXITY_LOW,
    "medium": common_pb2.COMPLEXITY_MEDIUM,
    "high": common_pb2.COMPLEXITY_HIGH,
}
_ANSWER_KINDS = {
    "number": common_pb2.ANSWER_KIND_NUMBER,
    "choice": common_pb2.ANSWER_KIND_CHOICE,
    "code": common_pb2.ANSWER_KIND_CODE,
    "open": common_pb2.ANSWER_KIND_OPEN,
}


def to_proto(result: Classification) -> common_pb2.Classification:
    """One domain classification as the ``Classification`` message."""
    DECISIONS.labels(result.decided_by, result.task).inc()
    message = common_pb2.Classification(
        task=_TASKS[result.task],
        task_confidence=result.task_confidence,
        complexity=_COMPLEXITIES[result.complexity],
        complexity_confidence=result.complexity_confidence,
        answer_kind=_ANSWER_KINDS[result.answer_kind],
        answer_kind_confidence=result.answer_kind_confidence,
        expected_output_tokens=result.expected_output_tokens,
        decided_by=result.decided_by,
        truncated=result.truncated,
        domain=result.domain,
    )
    if result.embedding is not None:
        message.embedding.extend(result.embedding.tolist())
    return message


class ClassifierServicer(classifier_pb2_grpc.ClassifierServiceServicer):
    """Thin gRPC layer over :class:`Classifier`. Errors end the call with a rich status.

    Both methods are idempotent and side-effect free; the CPU work runs off the event loop.
    """

    def __init__(self, classifier: Classifier, config: ClassifierConfig):
        self.classifier = classifier
        self.config = config

    async def Classify(
        self, request: classifier_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ClassifyResponse:
        try:
            validate_prompts([request.prompt], ["prompt"], max_chars=self.config.max_prompt_chars)
            (result,) = await self.classifier.classify([request.prompt], [not request.omit_embedding])
        except ConstellationError as error:
            await abort(context, error, service="classifier")
        except Exception as exc:
            log.exception("Classify failed")
            await abort(context, InternalError(f"classification failed: {exc!r}"), service="classifier")
        return classifier_pb2.ClassifyResponse(classification=to_proto(result))

    async def ClassifyBatch(
        self, request: classifier_pb2.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ClassifyBatchResponse:
        try:
            count = len(request.requests)
            if count > self.config.max_batch_requests:
                raise InvalidArgument(
                    f"a batch may hold at most {self.config.max_batch_requests} requests; split it into several calls",
                    [FieldViolation("requests", f"holds {count}; the limit is {self.config.max_batch_requests}")],
                    reason="BATCH_TOO_LARGE",
                )
            prompts = [r.prompt for r in request.requests]
            validate_prompts(
                prompts, [f"requests[{i}].prompt" for i in range(count)], max_chars=self.config.max_prompt_chars
            )
            results = await self.classifier.classify(prompts, [not r.omit_embedding for r in request.requests])
        except ConstellationError as error:
            await abort(context, error, service="classifier")
        except Exception as exc:
            log.exception("ClassifyBatch failed")
            await abort(context, InternalError(f"classification failed: {exc!r}"), service="classifier")
        return classifier_pb2.ClassifyBatchResponse(classifications=[to_proto(r) for r in results])
