"""Shutdown drains: NOT_SERVING first, new calls refused, in-flight streams finish, the rest get a final event.

A real server from the library's skeleton on a loopback port, serving DispatchService through a
*fake* servicer (``SlowAskFake``: a stream of deltas at a fixed pace, standing in for a slow replay
answer), stopped by a real SIGTERM to this process. Also: every server answers undecodable bytes with
INVALID_ARGUMENT (the wire interceptor is hooked into the skeleton).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from constellation.config import load_config
from constellation.server import Registration, RunningServer, create_server, run_until_stopped, serving
from constellation.v1 import dispatch_pb2, dispatch_pb2_grpc
from services.dispatch.config import DispatchConfig
from services.dispatch.servicer import SERVICE_NAME, cut_response

STEP_S = 0.1


class SlowAskFake(dispatch_pb2_grpc.DispatchServiceServicer):
    """Fake dispatch: answers ``prompt`` = N with N deltas, ``STEP_S`` apart, then an OK final event."""

    async def Ask(
        self, request: dispatch_pb2.AskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dispatch_pb2.AskResponse]:
        for index in range(int(request.prompt)):
            await asyncio.sleep(STEP_S)
            yield dispatch_pb2.AskResponse(delta=dispatch_pb2.AnswerDelta(text=f"{index} "))
        yield dispatch_pb2.AskResponse(final=dispatch_pb2.FinalEvent(finish_reason="stop"))


def _config(notice_s: float, grace_s: float) -> DispatchConfig:
    return load_config(
        DispatchConfig, None, port=0, metrics_port=-1, shutdown_notice_s=notice_s, shutdown_grace_s=grace_s
    )


def _lifespan(config: DispatchConfig) -> AbstractAsyncContextManager[RunningServer]:
    registration = Registration(
        SlowAskFake(),  # type: ignore[abstract]
        dispatch_pb2_grpc.add_DispatchServiceServicer_to_server,  # type: ignore[arg-type]
        SERVICE_NAME,
        cut_messages={"Ask": cut_response},
    )
    return serving([registration], config)


async def _ask(port: int, steps: int) -> list[dispatch_pb2.AskResponse]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = dispatch_pb2_grpc.DispatchServiceStub(channel).Ask(
            dispatch_pb2.AskRequest(prompt=str(steps)), timeout=30
        )
        return [event async for event in call]


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        return int(reply.status)


async def _outcome(call: asyncio.Future[list[dispatch_pb2.AskResponse]]) -> grpc.StatusCode | str:
    try:
        events = await call
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return events[-1].final.finish_reason


async def test_sigterm_turns_health_not_serving_first_then_refuses_new_calls_while_streams_finish() -> None:
    config = _config(notice_s=0.6, grace_s=5.0)
    seen: dict[str, asyncio.Future[object]] = {}

    def started(running: RunningServer) -> None:
        loop = asyncio.get_running_loop()
        seen["long"] = asyncio.ensure_future(_ask(running.port, 15))  # 1.5 s, well inside the drain window
        loop.call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)
        loop.call_later(0.4, lambda: seen.setdefault("health", asyncio.ensure_future(_health(running.port))))
        loop.call_later(0.45, lambda: seen.setdefault("during_notice", asyncio.ensure_future(_ask(running.port, 1))))
        loop.call_later(1.0, lambda: seen.setdefault("after_notice", asyncio.ensure_future(_ask(running.port, 1))))

    await asyncio.wait_for(run_until_stopped(_lifespan(config), started), timeout=20)
    assert await seen["health"] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await _outcome(seen["during_notice"]) == "stop"  # type: ignore[arg-type]
    assert await _outcome(seen["after_notice"]) == grpc.StatusCode.UNAVAILABLE  # type: ignore[arg-type]
    long = await seen["long"]
    assert isinstance(long, list) and len(long) == 16 and long[-1].final.finish_reason == "stop"


async def test_a_stream_longer_than_the_drain_window_ends_with_a_final_event_saying_unavailable() -> None:
    config = _config(notice_s=0.0, grace_s=1.5)
    seen: dict[str, asyncio.Future[list[dispatch_pb2.AskResponse]]] = {}

    def started(running: RunningServer) -> None:
        seen["long"] = asyncio.ensure_future(_ask(running.port, 200))  # 20 s: cut by the window
        asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signal.SIGTERM)

    await asyncio.wait_for(run_until_stopped(_lifespan(config), started), timeout=20)
    events = await seen["long"]
    final = events[-1].final
    assert len(events) > 5 and events[-2].HasField("delta")
    assert final.finish_reason == "cancelled"
    assert final.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "shut down" in final.status.message


async def test_every_server_answers_undecodable_request_bytes_with_invalid_argument() -> None:
    async with _lifespan(_config(notice_s=0.0, grace_s=0.5)) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            ask = channel.unary_stream(f"/{SERVICE_NAME}/Ask")  # raw bytes, no serializer
            call = ask(b"\x0a\x05\xff\xfe\xfd\xfc\xfb", timeout=5)  # field 1 (prompt): invalid UTF-8
            code = None
            try:
                async for _ in call:
                    pass
            except grpc.RpcError as error:
                code = error.code()
    assert code == grpc.StatusCode.INVALID_ARGUMENT


class FloodFake(dispatch_pb2_grpc.DispatchServiceServicer):
    """Fake dispatch: an endless stream of 2 kB deltas, so a cancel usually lands while grpc writes."""

    async def Ask(
        self, request: dispatch_pb2.AskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dispatch_pb2.AskResponse]:
        index = 0
        while True:
            yield dispatch_pb2.AskResponse(delta=dispatch_pb2.AnswerDelta(text="x" * 2000))
            index += 1
            if index % 50 == 0:
                await asyncio.sleep(0)


async def test_cancelled_streams_close_their_spans_in_their_own_task(caplog: pytest.LogCaptureFixture) -> None:
    registration = Registration(
        FloodFake(),  # type: ignore[abstract]
        dispatch_pb2_grpc.add_DispatchServiceServicer_to_server,  # type: ignore[arg-type]
        SERVICE_NAME,
    )
    caplog.set_level(logging.ERROR, logger="opentelemetry.context")
    async with serving([registration], _config(notice_s=0.0, grace_s=0.5)) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = dispatch_pb2_grpc.DispatchServiceStub(channel)
            for _ in range(20):
                call = stub.Ask(dispatch_pb2.AskRequest(prompt="1"))
                received = 0
                async for _ in call:
                    received += 1
                    if received == 30:
                        break
                call.cancel()
                await asyncio.sleep(0.05)
        gc.collect()  # abandoned generators would be finalized (in another task) now
        await asyncio.sleep(0.3)
    assert received == 30
    assert not [r for r in caplog.records if "Failed to detach context" in r.getMessage()]


async def test_an_endless_stream_ends_with_unavailable_when_the_drain_starts_not_at_its_end() -> None:
    registration = Registration(
        FloodFake(),  # type: ignore[abstract]
        dispatch_pb2_grpc.add_DispatchServiceServicer_to_server,  # type: ignore[arg-type]
        SERVICE_NAME,
        endless=frozenset({"Ask"}),
    )
    running = await create_server([registration], _config(notice_s=0.0, grace_s=60.0))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = dispatch_pb2_grpc.DispatchServiceStub(channel).Ask(dispatch_pb2.AskRequest(prompt="1"))
        await call.read()
        # A 60 s drain window: the stop must not wait it out for a stream that never ends.
        await asyncio.wait_for(running.stop(60.0), timeout=10)
        with pytest.raises(grpc.RpcError) as raised:
            while await call.read() is not grpc.aio.EOF:
                pass
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
