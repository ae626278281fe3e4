"""Undecodable request bytes over a real loopback channel: UNKNOWN without the guard, INVALID_ARGUMENT with it.

The server is a real grpc.aio server on port 0 with the real RegistryService (an in-memory SQLite store)
behind the mesh's own tracing and metrics interceptors; the raw bytes are sent with
``channel.unary_unary(path)`` and identity serializers, as a fuzzer or a broken client would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from constellation import telemetry
from constellation.metrics import RpcMetricsInterceptor
from constellation.v1 import classifier_pb2, registry_pb2, registry_pb2_grpc
from constellation.wire import REASON, UndecodableRequestInterceptor
from services.registry.config import RegistryConfig
from services.registry.registry import Registry
from services.registry.servicer import RegistryServicer
from services.registry.store import ModelStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

GARBAGE = {
    "invalid UTF-8 in a string field": b"\x0a\x02\xff\xfe",
    "truncated varint": b"\x08\x80\x80",
    "garbage": b"\xff\xff\xff\xff\xff\xff\xff\xff",
}
GET_MODEL = "/constellation.v1.RegistryService/GetModel"
WATCH = "/constellation.v1.RegistryService/WatchModels"
COUNT = "/test.Counter/Count"


async def _count(requests: AsyncIterator[classifier_pb2.ClassifyRequest], context: grpc.aio.ServicerContext) -> bytes:
    """A client-streaming method for the test: the number of requests read, as text."""
    seen = 0
    async for _ in requests:
        seen += 1
    return str(seen).encode()


async def _server(guarded: bool) -> tuple[grpc.aio.Server, int, Registry]:
    interceptors: list[grpc.aio.ServerInterceptor] = [*telemetry.server_interceptors(), RpcMetricsInterceptor()]
    if guarded:
        interceptors.append(UndecodableRequestInterceptor())
    server = grpc.aio.server(interceptors=interceptors)
    registry = Registry(ModelStore(":memory:"))
    registry.register(registry_pb2.ModelRecord(name="m"))
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(registry, RegistryConfig()), server)
    counter = grpc.stream_unary_rpc_method_handler(_count, classifier_pb2.ClassifyRequest.FromString, None)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Counter", {"Count": counter})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, registry


@pytest.fixture
async def guarded() -> AsyncIterator[grpc.aio.Channel]:
    server, port, registry = await _server(guarded=True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(None)
    registry.store.close()


def _bad_request(error: grpc.aio.AioRpcError) -> error_details_pb2.BadRequest:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    found = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.append(bad)
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.reason == REASON
    assert len(found) == 1
    return found[0]


async def test_without_the_guard_grpc_answers_unknown() -> None:
    server, port, registry = await _server(guarded=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary(GET_MODEL)(GARBAGE["garbage"], timeout=10)
    finally:
        await server.stop(None)
        registry.store.close()
    assert caught.value.code() == grpc.StatusCode.UNKNOWN  # what the guard exists to fix


@pytest.mark.parametrize("raw", GARBAGE.values(), ids=GARBAGE.keys())
async def test_undecodable_unary_request_is_invalid_argument(guarded: grpc.aio.Channel, raw: bytes) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await guarded.unary_unary(GET_MODEL)(raw, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "constellation.v1.GetModelRequest" in (caught.value.details() or "")
    (violation,) = _bad_request(caught.value).field_violations
    assert violation.field == "" and "undecodable" in violation.description


async def test_undecodable_server_streaming_request_is_invalid_argument(guarded: grpc.aio.Channel) -> None:
    call = guarded.unary_stream(WATCH)(GARBAGE["garbage"], timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(_bad_request(caught.value).field_violations) == 1


async def test_undecodable_message_in_a_request_stream_is_invalid_argument(guarded: grpc.aio.Channel) -> None:
    good = classifier_pb2.ClassifyRequest(prompt="fine").SerializeToString()
    count = guarded.stream_unary(COUNT)
    assert await count(iter([good, good]), timeout=10) == b"2"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await count(iter([good, GARBAGE["invalid UTF-8 in a string field"], good]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_decodable_requests_are_untouched(guarded: grpc.aio.Channel) -> None:
    raw = registry_pb2.GetModelRequest(name="m").SerializeToString()
    response = registry_pb2.GetModelResponse.FromString(await guarded.unary_unary(GET_MODEL)(raw, timeout=10))
    assert response.model.name == "m"
    missing = registry_pb2.GetModelRequest(name="nope").SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await guarded.unary_unary(GET_MODEL)(missing, timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # the servicer's own errors pass through
    stream = guarded.unary_stream(WATCH)(registry_pb2.WatchModelsRequest().SerializeToString(), timeout=10)
    first = registry_pb2.WatchModelsResponse.FromString(await stream.read())
    assert first.model.name == "m"
    stream.cancel()
