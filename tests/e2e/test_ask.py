"""DispatchService/Ask end to end: a real dispatch server, real Triton, the real SmolLM2 model."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from constellation.client import DispatchClient, ask_request
from constellation.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from services.dispatch.config import ModelEntry
from services.inference.launcher import TritonServer
from tests.e2e.triton_metrics import generations, in_flight, scrape

PRICE = ModelEntry(price_in_per_mtok=1.0, price_out_per_mtok=2.0)


@pytest.fixture
async def dispatch(dispatch_factory, triton: TritonServer) -> str:  # type: ignore[no-untyped-def]
    return str(await dispatch_factory(triton_url=triton.grpc_url, models={"smollm2": PRICE}))


async def wait_idle(triton: TritonServer, within_s: float = 10.0) -> float:
    """Polls Triton's in-flight gauge until it reads 0; returns the last reading."""
    deadline = time.monotonic() + within_s
    value = in_flight(await asyncio.to_thread(scrape, triton))
    while value and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        value = in_flight(await asyncio.to_thread(scrape, triton))
    return value


async def test_answer_streams_while_the_model_is_still_generating(dispatch: str, triton: TritonServer) -> None:
    kinds: list[str] = []
    deltas: list[str] = []
    in_flight_at_first_delta = None
    final = None
    async with DispatchClient(dispatch) as client:
        request = ask_request("What is the capital of France?", max_tokens=40, temperature=0)
        async for event in client.ask(request, timeout_s=120):
            kind = event.WhichOneof("event")
            kinds.append(kind)
            if kind == "delta":
                if not deltas:
                    in_flight_at_first_delta = in_flight(await asyncio.to_thread(scrape, triton))
                deltas.append(event.delta.text)
            elif kind == "final":
                final = event.final
    # The first piece of text reached the client while Triton was still generating the rest.
    assert in_flight_at_first_delta == 1
    assert len(deltas) >= 5
    assert kinds[0] == "plan" and kinds[-1] == "final"
    assert final is not None
    assert final.text == "".join(deltas)
    assert "Paris" in final.text
    assert final.models == ["smollm2"]
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0
    expected_cost = (final.usage.input_tokens * 1.0 + final.usage.output_tokens * 2.0) / 1e6
    assert final.usage.cost_usd == pytest.approx(expected_cost)
    stages = {s.stage: s.milliseconds for s in final.stages}
    assert {"validate", "plan", "first_token", "generate", "total"} <= set(stages)
    assert stages["total"] >= stages["first_token"] + stages["generate"]
    assert len(final.trace_id) == 32


async def test_client_cancel_mid_stream_ends_the_request_inside_triton(dispatch: str, triton: TritonServer) -> None:
    before = generations(await asyncio.to_thread(scrape, triton), "cancelled")
    received = 0
    async with DispatchClient(dispatch) as client:
        request = ask_request("Write a long story about a lighthouse keeper.", max_tokens=400, temperature=0)
        stream = client.ask(request, timeout_s=120)
        async for event in stream:
            if event.WhichOneof("event") == "delta":
                received += 1
                if received == 3:
                    break
        await stream.aclose()
    assert received == 3
    assert await wait_idle(triton) == 0
    after = generations(await asyncio.to_thread(scrape, triton), "cancelled")
    assert after == before + 1


async def test_expired_deadline_is_deadline_exceeded_and_frees_triton(dispatch: str, triton: TritonServer) -> None:
    async with DispatchClient(dispatch) as client:
        request = ask_request("Write a long story about a dragon.", max_tokens=400, temperature=0)
        with pytest.raises(DeadlineExceeded) as caught:
            async for _ in client.ask(request, timeout_s=0.5):
                pass
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await wait_idle(triton) == 0


async def test_unknown_model_is_not_found_and_says_how_to_list_models(dispatch: str, triton: TritonServer) -> None:
    async with DispatchClient(dispatch) as client:
        with pytest.raises(NotFound) as caught:
            async for _ in client.ask(ask_request("hello", model="no-such-model", max_tokens=4), timeout_s=30):
                pass
    message = caught.value.message
    assert "no-such-model" in message
    assert "constellation models list" in message
    assert "smollm2" not in message  # not the inventory
    port = triton.grpc_url.rsplit(":", 1)[-1]
    assert port not in message and port not in str(caught.value.metadata)


async def test_a_prompt_past_the_models_context_is_invalid_argument_without_fallback(
    dispatch: str, triton: TritonServer
) -> None:
    """32,000 characters of digits (about one token each for SmolLM2) pass dispatch's prompt limit and its
    lenient estimate; the model's own tokenizer refuses them, and the caller gets INVALID_ARGUMENT."""
    before = generations(await asyncio.to_thread(scrape, triton), "error")
    async with DispatchClient(dispatch) as client:
        with pytest.raises(InvalidArgument) as caught:
            async for _ in client.ask(ask_request("0123456789" * 3200, max_tokens=4), timeout_s=60):
                pass
    assert "context" in caught.value.message
    after = generations(await asyncio.to_thread(scrape, triton), "error")
    assert after - before <= 1  # one call, no fallback


async def test_a_requested_model_with_a_known_context_refuses_a_long_prompt_before_calling_it(
    dispatch_factory,
    triton: TritonServer,  # type: ignore[no-untyped-def]
) -> None:
    short = ModelEntry(price_in_per_mtok=1.0, price_out_per_mtok=2.0, context_length=1000)
    address = await dispatch_factory(triton_url=triton.grpc_url, models={"smollm2": short})
    async with DispatchClient(address) as client:
        with pytest.raises(InvalidArgument) as caught:
            async for _ in client.ask(ask_request("word " * 2000, model="smollm2", max_tokens=4), timeout_s=30):
                pass
    assert "1000 tokens" in caught.value.message
    assert [v.field for v in caught.value.violations] == ["prompt"]


async def test_health_is_not_serving_while_triton_is_unreachable_and_asks_stay_retryable(
    dispatch_factory,  # type: ignore[no-untyped-def]
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from constellation.net import free_port

    address = await dispatch_factory(triton_url=f"127.0.0.1:{free_port()}", triton_check_s=0.1)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = health_pb2.HealthCheckResponse.SERVING
        for _ in range(50):
            status = (await stub.Check(health_pb2.HealthCheckRequest(service=""))).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    async with DispatchClient(address) as client:
        for _ in range(3):
            with pytest.raises(Unavailable) as caught:
                async for _ in client.ask(ask_request("hello", max_tokens=4), timeout_s=10):
                    pass
            assert "127.0.0.1" not in caught.value.message


async def test_one_trace_spans_client_dispatch_and_the_triton_call(dispatch: str, spans: InMemorySpanExporter) -> None:
    async with DispatchClient(dispatch) as client:
        events = [e async for e in client.ask(ask_request("Say hi.", max_tokens=8, temperature=0), timeout_s=60)]
    trace_id = events[-1].final.trace_id
    finished = spans.get_finished_spans()
    mine = [s for s in finished if format(s.context.trace_id, "032x") == trace_id]
    ask = "/constellation.v1.DispatchService/Ask"
    (server,) = [s for s in mine if s.name == ask and s.kind == SpanKind.SERVER]
    (caller,) = [s for s in mine if s.name == ask and s.kind == SpanKind.CLIENT]
    (model_call,) = [s for s in mine if s.name == "model.generate"]
    assert model_call.kind == SpanKind.CLIENT
    assert model_call.parent is not None and model_call.parent.span_id == server.context.span_id
    assert server.parent is not None and server.parent.span_id == caller.context.span_id
    attributes = dict(model_call.attributes or {})
    assert attributes["constellation.model"] == "smollm2"
    assert attributes["constellation.output_tokens"] > 0
    assert attributes["constellation.time_to_first_token_ms"] > 0
    assert len({format(s.context.trace_id, "032x") for s in mine}) == 1


async def test_asks_naming_300_random_models_leave_the_metric_series_flat(dispatch: str) -> None:
    """Every label dispatch writes comes from a bounded set: made-up model names all count as ``other``."""
    import random
    import string

    from prometheus_client import generate_latest

    from constellation.metrics import REGISTRY

    def series() -> int:
        return sum(1 for line in generate_latest(REGISTRY).decode().splitlines() if line and line[0] != "#")

    names = ["".join(random.choices(string.ascii_lowercase, k=10)) for _ in range(301)]
    gate = asyncio.Semaphore(16)

    async def ask_for(client: DispatchClient, name: str) -> None:
        async with gate:
            with pytest.raises(NotFound):
                async for _ in client.ask(ask_request("hello", model=name, max_tokens=4), timeout_s=30):
                    pass

    async with DispatchClient(dispatch) as client:
        await ask_for(client, names[0])
        before = series()
        await asyncio.gather(*(ask_for(client, name) for name in names[1:]))
    after = series()
    assert after == before
    text = generate_latest(REGISTRY).decode()
    assert not any(name in text for name in names)
