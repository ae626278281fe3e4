"""The trace collector receives real OTLP exports (gRPC and HTTP) and keeps them in SQLite."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from apps.traces.collector import CollectorConfig, running_collector
from apps.traces.store import SpanStore
from constellation.config import load_config


async def test_otlp_grpc_and_http_exports_are_stored_durably(tmp_path: Path) -> None:
    db = tmp_path / "traces.sqlite"
    config = load_config(CollectorConfig, None, port=0, http_port=0, db=str(db), shutdown_grace_s=0.5)
    async with running_collector(config) as collector:
        provider = TracerProvider(resource=Resource.create({"service.name": "dispatch"}))
        exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{collector.grpc_port}", insecure=True)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("test")

        def emit() -> None:
            with tracer.start_as_current_span("parent") as parent:
                parent.set_attribute("constellation.model", "m1")
                with tracer.start_as_current_span("child") as child:
                    child.add_event("first_token")
            provider.shutdown()

        await asyncio.to_thread(emit)  # the exporter is synchronous: keep it off the collector's loop

        body = trace_service_pb2.ExportTraceServiceRequest(
            resource_spans=[
                trace_pb2.ResourceSpans(
                    scope_spans=[
                        trace_pb2.ScopeSpans(
                            spans=[
                                trace_pb2.Span(
                                    trace_id=b"\x01" * 16,
                                    span_id=b"\x02" * 8,
                                    name="triton.infer",
                                    start_time_unix_nano=1,
                                    end_time_unix_nano=5,
                                )
                            ]
                        )
                    ]
                )
            ]
        ).SerializeToString()
        url = f"http://127.0.0.1:{collector.http_port}/v1/traces"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=body, headers={"Content-Type": "application/x-protobuf"}) as reply:
                assert reply.status == 200
            async with session.post(url, data=b"<xml/>", headers={"Content-Type": "text/xml"}) as reply:
                assert reply.status == 415
            async with session.post(url, json={"resourceSpans": []}) as reply:
                assert reply.status == 200
    store = SpanStore.open(db)  # reopened after the collector stopped: the spans survived
    spans = {s.name: s for s in store.spans()}
    store.close()
    assert set(spans) == {"parent", "child", "triton.infer"}
    assert spans["child"].parent_span_id == spans["parent"].span_id
    assert spans["child"].trace_id == spans["parent"].trace_id
    assert spans["parent"].service == "dispatch"
    assert spans["parent"].attributes["constellation.model"] == "m1"
    assert spans["child"].event_ns("first_token") is not None
    assert spans["triton.infer"].duration_ms == 4e-6
