"""Every Triton call carries the caller's ``traceparent``: the Triton client's header hook, on real gRPC.

A recording stand-in for Triton's KServe v2 service (a real in-process aio server on a loopback port)
answers ``ModelStreamInfer`` with one final response and ``ModelReady`` with ready, and keeps each call's
metadata. Fusion's generative path runs through the real fusion server, so the test also shows that its
fuser call to Triton is a child of the fusion server's span, in the caller's trace.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tritonclient.grpc import service_pb2

from constellation.config import load_config
from constellation.triton import STREAM_METHOD, Sampling, TritonClient
from constellation.v1 import common_pb2
from services.fusion.client import FusionClient
from services.fusion.config import FusionConfig
from services.fusion.main import running_fusion

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

READY_METHOD = "/inference.GRPCInferenceService/ModelReady"
tracer = trace.get_tracer("tests.triton_traceparent")


@dataclass
class RecordingTriton:
    """The two Triton methods the test needs; ``metadata`` keeps each call's method and headers."""

    port: int = 0
    metadata: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def _record(self, method: str, context: grpc.aio.ServicerContext) -> None:
        headers = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.metadata.append((method, headers))

    async def stream_infer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        self._record(STREAM_METHOD, context)
        text = b"A fused answer."
        response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        response.raw_output_contents.append(len(text).to_bytes(4, "little") + text)
        response.parameters["triton_final_response"].bool_param = True
        yield service_pb2.ModelStreamInferResponse(infer_response=response)

    async def model_ready(
        self, request: service_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelReadyResponse:
        self._record(READY_METHOD, context)
        return service_pb2.ModelReadyResponse(ready=True)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {
                "ModelStreamInfer": grpc.unary_stream_rpc_method_handler(
                    self.stream_infer,
                    request_deserializer=service_pb2.ModelInferRequest.FromString,
                    response_serializer=service_pb2.ModelStreamInferResponse.SerializeToString,
                ),
                "ModelReady": grpc.unary_unary_rpc_method_handler(
                    self.model_ready,
                    request_deserializer=service_pb2.ModelReadyRequest.FromString,
                    response_serializer=service_pb2.ModelReadyResponse.SerializeToString,
                ),
            },
        )


@pytest.fixture
async def triton() -> AsyncIterator[RecordingTriton]:
    recording = RecordingTriton()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((recording.handler(),))
    recording.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield recording
    finally:
        await server.stop(None)


def parent_of(traceparent: str) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C ``traceparent`` header."""
    _version, trace_id, span_id, _flags = traceparent.split("-")
    return trace_id, span_id


async def test_every_triton_call_carries_the_current_spans_traceparent(triton: RecordingTriton) -> None:
    async with TritonClient(f"127.0.0.1:{triton.port}") as client:
        with tracer.start_as_current_span("caller") as span:
            chunks = [c async for c in client.generate("m", "hi", Sampling(max_tokens=4), timeout_s=10)]
            assert await client.model_ready("m")
    assert "".join(c.text for c in chunks) == "A fused answer."
    context = span.get_span_context()
    expected = (format(context.trace_id, "032x"), format(context.span_id, "016x"))
    assert [method for method, _ in triton.metadata] == [STREAM_METHOD, READY_METHOD]
    for _method, headers in triton.metadata:
        assert parent_of(headers["traceparent"]) == expected


async def test_a_calls_own_headers_join_the_hooks() -> None:
    client = TritonClient("127.0.0.1:1", call_headers=lambda: {"traceparent": "hook", "x-a": "1"})
    try:
        assert client._headers({"x-b": "2"}) == {"traceparent": "hook", "x-a": "1", "x-b": "2"}
        assert client._headers({"traceparent": "own"})["traceparent"] == "own"
    finally:
        await client.close()


async def test_fusions_triton_call_is_a_child_of_the_fusion_span_in_the_callers_trace(
    triton: RecordingTriton, spans: InMemorySpanExporter, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = load_config(
        FusionConfig,
        None,
        port=0,
        shutdown_grace_s=1.0,
        triton_url=f"127.0.0.1:{triton.port}",
        artifact=str(tmp_path_factory.mktemp("no-artifact")),
    )
    candidate = common_pb2.ScoredCandidate(candidate=common_pb2.Candidate(model="a", text="An answer."), rank=0)
    async with running_fusion(config) as running, FusionClient(f"127.0.0.1:{running.port}") as client:
        with tracer.start_as_current_span("asker") as asker:
            responses = [
                r async for r in client.fuse("Explain.", [candidate], common_pb2.ANSWER_KIND_OPEN, timeout_s=30)
            ]
    assert responses[-1].summary.method == "generative"
    trace_id, parent_id = parent_of(dict(triton.metadata)[STREAM_METHOD]["traceparent"])
    assert trace_id == format(asker.get_span_context().trace_id, "032x")
    parent = next(s for s in spans.get_finished_spans() if format(s.context.span_id, "016x") == parent_id)
    assert parent.kind == trace.SpanKind.SERVER
    assert parent.name.endswith("FusionService/Fuse")
