"""An OTLP trace collector small enough to run beside the mesh: ``constellation traces collect``.

Receives spans over OTLP/gRPC (``opentelemetry.proto.collector.trace.v1.TraceService/Export``, port
4317 by default) and OTLP/HTTP (``POST /v1/traces`` with ``application/x-protobuf``, port 4318 by
default, which is what Triton's OpenTelemetry trace mode sends) and stores them durably in SQLite.
Services point at it with the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``; any OpenTelemetry Collector,
Jaeger or Tempo can take its place.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from aiohttp import web
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from apps.traces.store import SpanStore, rows_from_otlp
from constellation.config import ServiceConfig
from constellation.server import Registration, create_server

log = logging.getLogger(__name__)
TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


class CollectorConfig(ServiceConfig):
    """Settings of the trace collector (``[collector]``, ``CONSTELLATION_COLLECTOR_*``)."""

    service_name: ClassVar[str] = "collector"
    model_config = SettingsConfigDict(env_prefix="CONSTELLATION_COLLECTOR_", env_nested_delimiter="__", extra="forbid")

    port: int = Field(default=4317, ge=0, le=65535)
    http_port: int = Field(default=4318, ge=-1, le=65535)
    db: str = "traces.sqlite"


class TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    """Stores every exported span. Writes run off the event loop."""

    def __init__(self, store: SpanStore):
        self.store = store

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        rows = rows_from_otlp(request.resource_spans)
        await asyncio.to_thread(self.store.add, rows)
        return trace_service_pb2.ExportTraceServiceResponse()


_ID_FIELDS = {"traceId", "spanId", "parentSpanId"}
PROTOBUF_TYPES = ("application/x-protobuf", "application/protobuf")


def parse_otlp_json(body: bytes) -> trace_service_pb2.ExportTraceServiceRequest:
    """Parses an OTLP/JSON export (what Triton's OpenTelemetry mode sends).

    OTLP/JSON writes trace and span ids as hex, while protobuf's JSON mapping expects base64 for
    bytes fields; ids are converted before parsing.
    """

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                key: base64.b64encode(bytes.fromhex(value)).decode()
                if key in _ID_FIELDS and isinstance(value, str)
                else fix(value)
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [fix(item) for item in node]
        return node

    message = trace_service_pb2.ExportTraceServiceRequest()
    json_format.ParseDict(fix(json.loads(body)), message, ignore_unknown_fields=True)
    return message


def http_app(store: SpanStore) -> web.Application:
    """OTLP/HTTP intake on ``/v1/traces``: protobuf or JSON bodies (Triton sends JSON)."""

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            if request.content_type in PROTOBUF_TYPES:
                message = trace_service_pb2.ExportTraceServiceRequest()
                message.ParseFromString(body)
            elif request.content_type == "application/json":
                message = parse_otlp_json(body)
            else:
                return web.json_response(
                    {"error": "send OTLP as application/x-protobuf or application/json"}, status=415
                )
        except Exception:
            return web.json_response({"error": "body is not an OTLP ExportTraceServiceRequest"}, status=400)
        await asyncio.to_thread(store.add, rows_from_otlp(message.resource_spans))
        if request.content_type == "application/json":
            return web.json_response({})
        return web.Response(
            body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    return app


@dataclass
class RunningCollector:
    store: SpanStore
    grpc_port: int
    http_port: int | None


@asynccontextmanager
async def running_collector(config: CollectorConfig) -> AsyncIterator[RunningCollector]:
    """Runs both intakes until the context exits; ports 0 pick free ones."""
    store = SpanStore.open(config.db)
    server = await create_server(
        [Registration(TraceServicer(store), trace_service_pb2_grpc.add_TraceServiceServicer_to_server, TRACE_SERVICE)],
        config,
    )
    runner: web.AppRunner | None = None
    http_port: int | None = None
    if config.http_port >= 0:
        runner = web.AppRunner(http_app(store), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.http_port)
        await site.start()
        http_port = runner.addresses[0][1]
    try:
        yield RunningCollector(store, server.port, http_port)
    finally:
        if runner is not None:
            await runner.cleanup()
        await server.stop(config.shutdown_grace_s)
        store.close()
