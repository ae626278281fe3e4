"""The client edge: a real in-process server fails calls with rich status details, and a ServiceClient
sees the library's exceptions (details intact) for unary calls and for streams, before and after the
first message, while the tracing interceptors still run inside it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
import pytest

from constellation.channel import ServiceClient, server_stream
from constellation.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    abort,
)
from constellation.v1 import fusion_pb2, fusion_pb2_grpc, ranking_pb2, ranking_pb2_grpc


class FailingRanking(ranking_pb2_grpc.RankingServiceServicer):
    """Rejects a request without candidates with field violations; answers after ``delay_s`` otherwise."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    async def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankResponse:
        if not request.candidates:
            violation = FieldViolation("candidates", "at least one candidate is needed")
            await abort(context, InvalidArgument("nothing to rank", [violation]), service="ranking")
        await asyncio.sleep(self.delay_s)
        return ranking_pb2.RankResponse()


class FailingFusion(fusion_pb2_grpc.FusionServiceServicer):
    """Streams ``before`` deltas, then fails with UNAVAILABLE and a retry delay (or a full queue at once)."""

    def __init__(self, before: int) -> None:
        self.before = before

    async def Fuse(
        self, request: fusion_pb2.FuseRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fusion_pb2.FuseResponse]:
        if self.before == 0:
            await abort(context, ResourceExhausted("queue full"))
        for index in range(self.before):
            yield fusion_pb2.FuseResponse(delta=fusion_pb2.FusedDelta(text=f"part{index}"))
        await abort(context, Unavailable("fuser model went away", retry_after_s=1.5, reason="TRITON_DOWN"))


class RankingEdge(ServiceClient[ranking_pb2_grpc.RankingServiceStub]):
    """The bare client edge on the ranking stub (no methods: the tests call the stub)."""

    stub_class = ranking_pb2_grpc.RankingServiceStub


class FusionEdge(ServiceClient[fusion_pb2_grpc.FusionServiceStub]):
    """The bare client edge on the fusion stub."""

    stub_class = fusion_pb2_grpc.FusionServiceStub


async def _server(ranking: FailingRanking, fusion: FailingFusion) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(ranking, server)
    fusion_pb2_grpc.add_FusionServiceServicer_to_server(fusion, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.mark.parametrize("traced", [True, False])
async def test_a_unary_error_arrives_as_the_library_exception_with_its_details(traced: bool) -> None:
    server, port = await _server(FailingRanking(), FailingFusion(1))
    try:
        async with RankingEdge(f"127.0.0.1:{port}", traced=traced) as client:
            with pytest.raises(InvalidArgument) as raised:
                await client.stub.Rank(ranking_pb2.RankRequest(prompt="q"))
            assert raised.value.violations == [FieldViolation("candidates", "at least one candidate is needed")]
            assert raised.value.message == "nothing to rank"
            assert isinstance(raised.value.__cause__, grpc.RpcError)
            ok = await client.stub.Rank(ranking_pb2.RankRequest(prompt="q", candidates=[{"text": "a"}]))
            assert list(ok.candidates) == []
    finally:
        await server.stop(None)


@pytest.mark.parametrize("traced", [True, False])
async def test_a_stream_error_after_messages_is_mapped_while_iterating(traced: bool) -> None:
    server, port = await _server(FailingRanking(), FailingFusion(2))
    try:
        async with FusionEdge(f"127.0.0.1:{port}", traced=traced) as client:
            received: list[str] = []
            with pytest.raises(Unavailable) as raised:
                async for message in client.stub.Fuse(fusion_pb2.FuseRequest(prompt="q")):
                    received.append(message.delta.text)
            assert received == ["part0", "part1"]
            assert raised.value.retry_after_s == pytest.approx(1.5)
            assert raised.value.reason == "TRITON_DOWN"
    finally:
        await server.stop(None)


async def test_a_stream_that_fails_before_its_first_message_and_read_are_mapped() -> None:
    server, port = await _server(FailingRanking(), FailingFusion(0))
    try:
        async with FusionEdge(f"127.0.0.1:{port}") as client:
            with pytest.raises(ResourceExhausted, match="queue full"):
                async for _ in client.stub.Fuse(fusion_pb2.FuseRequest(prompt="q")):
                    pass
            call = client.stub.Fuse(fusion_pb2.FuseRequest(prompt="q"))
            with pytest.raises(ResourceExhausted):
                await call.read()
    finally:
        await server.stop(None)


async def test_the_default_deadline_applies_only_to_calls_without_one() -> None:
    server, port = await _server(FailingRanking(delay_s=0.5), FailingFusion(1))
    request = ranking_pb2.RankRequest(prompt="q", candidates=[{"text": "a"}])
    try:
        async with RankingEdge(f"127.0.0.1:{port}", default_timeout_s=0.05) as client:
            with pytest.raises(DeadlineExceeded):
                await client.stub.Rank(request)
            assert list((await client.stub.Rank(request, timeout=5.0)).candidates) == []
    finally:
        await server.stop(None)


async def test_an_unreachable_service_is_unavailable_and_a_cancelled_caller_stays_cancelled() -> None:
    server, port = await _server(FailingRanking(delay_s=30.0), FailingFusion(1))
    request = ranking_pb2.RankRequest(prompt="q", candidates=[{"text": "a"}])
    try:
        async with RankingEdge(f"127.0.0.1:{port}") as client:
            waiting = asyncio.ensure_future(client.stub.Rank(request))
            await asyncio.sleep(0.2)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
    finally:
        await server.stop(None)
    async with RankingEdge(f"127.0.0.1:{port}") as client:
        with pytest.raises(Unavailable):
            await client.stub.Rank(request, timeout=5.0)


class EndlessFusion(fusion_pb2_grpc.FusionServiceServicer):
    """Sends one delta, then waits; records when the client's cancel reaches it."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def Fuse(
        self, request: fusion_pb2.FuseRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fusion_pb2.FuseResponse]:
        yield fusion_pb2.FuseResponse(delta=fusion_pb2.FusedDelta(text="first"))
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def test_leaving_a_server_stream_early_cancels_the_call_in_the_server() -> None:
    fusion = EndlessFusion()
    server = grpc.aio.server()
    fusion_pb2_grpc.add_FusionServiceServicer_to_server(fusion, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with FusionEdge(f"127.0.0.1:{port}") as client:
            stream = server_stream(lambda: client.stub.Fuse(fusion_pb2.FuseRequest(prompt="q")))
            async with aclosing(stream):
                async for message in stream:
                    assert message.delta.text == "first"
                    break
            await asyncio.wait_for(fusion.cancelled.wait(), timeout=5)
    finally:
        await server.stop(None)
