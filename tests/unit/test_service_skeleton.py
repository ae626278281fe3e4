"""The service skeleton: flags become config fields, and a service's lifespan runs until SIGTERM, then
stops its server (a real one on a loopback port) before the dependencies it used are closed."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from constellation.server import RunningServer, run_until_stopped, serving
from constellation.service import Flag, ServiceMain, disable
from services.classifier.config import ClassifierConfig


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        return int(reply.status)


class Lifespan:
    """A service lifespan with one dependency that checks, when it is closed, that the server is gone."""

    def __init__(self) -> None:
        self.server_gone_when_closed: bool | None = None

    @asynccontextmanager
    async def __call__(self, config: ClassifierConfig) -> AsyncIterator[RunningServer]:
        async with AsyncExitStack() as stack:
            stack.push_async_callback(self._close_dependency)
            running = await stack.enter_async_context(serving([], config))
            self.port = running.port
            yield running

    async def _close_dependency(self) -> None:
        try:
            await _health(self.port)
            self.server_gone_when_closed = False
        except grpc.RpcError:
            self.server_gone_when_closed = True


def _service(lifespan: Lifespan) -> ServiceMain[ClassifierConfig, RunningServer]:
    return ServiceMain(
        name="classifier",
        config=ClassifierConfig,
        description="test",
        lifespan=lifespan,
        flags=(Flag("--keyword-min-confidence", type=float), disable("--no-encoder", "encoder", "rules only")),
        details=lambda running: "no servicers",
    )


def test_flags_override_config_fields_and_absent_flags_change_nothing() -> None:
    service = _service(Lifespan())
    given = service.load(["--port", "0", "--no-encoder", "--keyword-min-confidence", "0.8"])
    assert (given.port, given.encoder, given.keyword_min_confidence) == (0, False, 0.8)
    default = service.load([])
    assert (default.port, default.encoder) == (50052, True)
    assert "default 50052" in service.parser().format_help()
    with pytest.raises(SystemExit):
        service.load(["--port", "nine"])


async def test_the_lifespan_serves_until_sigterm_then_stops_the_server_before_its_dependencies() -> None:
    lifespan = Lifespan()
    service = _service(lifespan)
    config = service.load(["--port", "0", "--metrics-port", "-1"])
    seen: dict[str, object] = {}

    def started(running: RunningServer) -> None:
        seen["banner"] = service.banner(config, running)
        seen["health"] = asyncio.ensure_future(_health(running.port))
        asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signal.SIGTERM)

    await asyncio.wait_for(run_until_stopped(lifespan(config), started), timeout=20)
    assert seen["banner"] == f"classifier listening on 127.0.0.1:{lifespan.port} (no servicers)"
    health = seen["health"]
    assert isinstance(health, asyncio.Future) and health.result() == health_pb2.HealthCheckResponse.SERVING
    assert lifespan.server_gone_when_closed is True
