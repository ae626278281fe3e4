"""Prometheus metrics: per-RPC rate, errors and duration, and the ``/metrics`` HTTP endpoint.

Each service process exposes one registry. RPC metrics come from :class:`RpcMetricsInterceptor`;
domain metrics (time to first token, cost, fan-out size) are declared next to the code that observes
them, on :data:`REGISTRY`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

RPC_STARTED = Counter("constellation_rpc_started_total", "RPCs started.", ["service", "method"], registry=REGISTRY)
RPC_HANDLED = Counter(
    "constellation_rpc_handled_total",
    "RPCs completed, by status code.",
    ["service", "method", "code"],
    registry=REGISTRY,
)
RPC_DURATION = Histogram(
    "constellation_rpc_duration_seconds",
    "Wall time from the start of an RPC to its end (a stream's last message).",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serves ``/metrics`` over HTTP on a daemon thread; returns the bound port (``port`` 0 picks one)."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return int(server.server_port)


def _split(full_method: str) -> tuple[str, str]:
    _, service, method = full_method.split("/", 2)
    return service, method


def _code_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    if isinstance(error, BaseException) and not isinstance(error, Exception):
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    if code is None or isinstance(code, int):
        if error is not None:
            return grpc.StatusCode.UNKNOWN.name
        return grpc.StatusCode.OK.name if not code else grpc.StatusCode(code).name
    return code.name


@contextmanager
def _observed(service: str, method: str, context: grpc.aio.ServicerContext) -> Iterator[None]:
    """Counts one RPC and records its duration and final status code; re-raises whatever ends it."""
    RPC_STARTED.labels(service, method).inc()
    start = time.perf_counter()
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        RPC_DURATION.labels(service, method).observe(time.perf_counter() - start)
        RPC_HANDLED.labels(service, method, _code_of(context, error)).inc()


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every unary-unary and unary-stream RPC; other kinds pass through unmeasured."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split(handler_call_details.method)
        if service.startswith("grpc."):
            return handler

        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with _observed(service, method, context):
                    return await inner_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)

        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with _observed(service, method, context):
                    async for message in inner_stream(request, context):
                        yield message

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
