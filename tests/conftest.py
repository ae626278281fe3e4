"""Shared fixtures. A global tracer provider with an in-memory exporter is installed before any server
starts, so every test can inspect the spans the mesh produced."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_EXPORTER = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
trace.set_tracer_provider(_provider)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The in-memory span exporter, emptied before the test."""
    _EXPORTER.clear()
    yield _EXPORTER


@pytest.fixture
async def dispatch_factory():  # type: ignore[no-untyped-def]
    """Starts in-process dispatch servers on port 0: ``await factory(triton_url=...)`` -> address."""
    from contextlib import AsyncExitStack

    from constellation.config import load_config
    from services.dispatch.config import DispatchConfig
    from services.dispatch.main import running_dispatch

    async with AsyncExitStack() as stack:

        async def start(**overrides: object) -> str:
            config = load_config(DispatchConfig, None, **{"port": 0, "shutdown_grace_s": 1.0, **overrides})
            running = await stack.enter_async_context(running_dispatch(config))
            return f"127.0.0.1:{running.port}"

        yield start
