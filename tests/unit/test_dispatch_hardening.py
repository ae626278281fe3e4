"""Faults a caller should see clearly: prompts past a model's context, a lost classifier, a dead Triton,
unhealthy pools, made-up model names (bounded metrics) and what error messages reveal.

The dispatcher runs in process with a fake model server in Triton's place (the Triton client is real but
never contacted); the health test serves the real gRPC health service on a loopback port.
"""

from __future__ import annotations

import random
import string
import time
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from constellation.config import ServiceConfig
from constellation.errors import (
    ConstellationError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    to_status_proto,
)
from constellation.metrics import REGISTRY
from constellation.server import create_server
from constellation.triton import Sampling, TritonClient, triton_error
from constellation.v1 import common_pb2, registry_pb2
from services.dispatch.config import ModelEntry
from services.dispatch.events import Event, Finished, PlanMade
from services.dispatch.health import TritonWatch
from services.dispatch.pipeline import Dispatcher
from services.dispatch.query import Query
from services.dispatch.routing import Router
from tests.unit.dispatch_fakes import FakeGenerator, Script, config

TRITON = "127.0.0.1:1"


def query(prompt: str = "What is 2 + 2?", model: str = "") -> Query:
    return Query(prompt, Sampling(max_tokens=8), model=model, time_budget_ms=0, request_tag="")


async def ask(dispatcher: Dispatcher, q: Query) -> list[Event]:
    return [e async for e in dispatcher.ask(q, deadline_s=10.0, received_at=time.perf_counter())]


@dataclass
class FakeRegistryView:
    """The registry's live view as the planner reads it: a name -> record mapping."""

    models: dict[str, registry_pb2.ModelRecord] = field(default_factory=dict)


async def test_a_requested_model_refuses_a_prompt_past_its_context_naming_the_limit() -> None:
    settings = config(models={"small": ModelEntry(context_length=1000)})
    async with TritonClient(TRITON) as triton:
        dispatcher = Dispatcher(settings, triton, generator=FakeGenerator({"small": Script("x")}))
        with pytest.raises(InvalidArgument) as caught:
            await ask(dispatcher, query("a" * 8000, model="small"))
    error = caught.value
    assert error.reason == "PROMPT_TOO_LONG"
    assert "1000" in error.message and "small" in error.message
    assert [v.field for v in error.violations] == ["prompt"]


async def test_routing_asks_only_models_whose_context_holds_the_prompt() -> None:
    settings = config(
        models={"small": ModelEntry(context_length=1000), "large": ModelEntry(context_length=100_000)},
        max_fallbacks=0,
    )
    fake = FakeGenerator({"small": Script("short"), "large": Script("long")})
    async with TritonClient(TRITON) as triton:
        dispatcher = Dispatcher(settings, triton, router=Router(None), generator=fake)
        events = await ask(dispatcher, query("b" * 8000))
        with pytest.raises(InvalidArgument, match="100000"):
            await ask(dispatcher, query("c" * 500_000))
    plan = next(e for e in events if isinstance(e, PlanMade))
    assert {c.model for c in plan.candidates} == {"large"}
    assert list(fake.started) == ["large"]


async def test_internal_failures_do_not_fall_back_to_another_model() -> None:
    settings = config(models={"a": ModelEntry(), "b": ModelEntry()}, max_fallbacks=2)
    broken = triton_error(grpc.StatusCode.INTERNAL, "boom", url=TRITON, model="a")
    fake = FakeGenerator({"a": Script(fails=broken), "b": Script(fails=broken)})
    async with TritonClient(TRITON) as triton:
        dispatcher = Dispatcher(settings, triton, router=Router(None), generator=fake)
        with pytest.raises(ConstellationError) as caught:
            await ask(dispatcher, query())
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert len(fake.started) == 1


async def test_a_pool_the_registry_marks_unhealthy_is_retryable_not_a_precondition() -> None:
    unhealthy = common_pb2.MODEL_STATE_UNHEALTHY
    view = FakeRegistryView({name: registry_pb2.ModelRecord(name=name, state=unhealthy) for name in ("a", "b")})
    async with TritonClient(TRITON) as triton:
        dispatcher = Dispatcher(config(), triton, router=Router(None), registry=view)  # type: ignore[arg-type]
        with pytest.raises(Unavailable) as caught:
            dispatcher.plan(query())
    assert caught.value.reason == "NO_HEALTHY_MODEL"
    assert not isinstance(caught.value, FailedPrecondition)


async def test_while_triton_is_down_asks_fail_fast_with_unavailable_without_its_address() -> None:
    fake = FakeGenerator({"smollm2": Script("hi")})
    async with TritonClient(TRITON) as triton:
        dispatcher = Dispatcher(config(routing=False), triton, generator=fake)
        dispatcher.triton_up = False
        with pytest.raises(Unavailable) as caught:
            await ask(dispatcher, query())
        dispatcher.triton_up = True
        assert isinstance((await ask(dispatcher, query()))[-1], Finished)
    assert TRITON not in to_status_proto(caught.value).SerializeToString().decode("latin-1")
    assert TRITON in caught.value.detail


class FlakyClassifier:
    """A classifier whose every call times out."""

    async def classify(self, prompt: str, *, timeout_s: float, omit_embedding: bool) -> common_pb2.Classification:
        raise DeadlineExceeded("classification timed out")


def degraded_count() -> float:
    value = REGISTRY.get_sample_value("constellation_degraded_plans_total", {"cause": "classification_lost"})
    return value or 0.0


async def test_a_plan_made_without_its_classification_says_so_and_is_counted() -> None:
    fake = FakeGenerator({"a": Script("4"), "b": Script("4")})
    settings = config(models={"a": ModelEntry(), "b": ModelEntry()})
    before = degraded_count()
    async with TritonClient(TRITON) as triton:
        dispatcher = Dispatcher(settings, triton, FlakyClassifier(), router=Router(None), generator=fake)  # type: ignore[arg-type]
        events = await ask(dispatcher, query())
        requested = await ask(dispatcher, query(model="a"))
    done = events[-1]
    assert isinstance(done, Finished)
    assert done.text == "4"
    assert done.problems[0].reason == "CLASSIFICATION_LOST"
    assert isinstance(done.problems[0], DeadlineExceeded)
    assert degraded_count() == before + 1  # the request that named its model lost nothing
    last = requested[-1]
    assert isinstance(last, Finished) and last.problems == []


def series() -> int:
    return sum(1 for line in generate_latest(REGISTRY).decode().splitlines() if line and not line.startswith("#"))


async def test_asks_naming_random_models_leave_the_metric_series_flat() -> None:
    names = ["".join(random.choices(string.ascii_lowercase, k=12)) for _ in range(300)]
    missing = NotFound("no such model")
    fake = FakeGenerator({name: Script(fails=missing) for name in ["warm-up", *names]})
    async with TritonClient(TRITON) as triton:
        dispatcher = Dispatcher(config(routing=False), triton, generator=fake)

        async def absent(model: str) -> None:
            raise NotFound(f"model {model!r} is not served")

        object.__setattr__(dispatcher.tools, "require_model", absent)
        with pytest.raises(NotFound):
            await ask(dispatcher, query(model="warm-up"))
        before = series()
        for name in names:
            with pytest.raises(NotFound):
                await ask(dispatcher, query(model=name))
        after = series()
    assert after == before
    text = generate_latest(REGISTRY).decode()
    assert not any(name in text for name in names)
    assert 'model="other"' in text


class ToggledProbe:
    """Triton's liveness as a switch the test flips."""

    url = TRITON

    def __init__(self) -> None:
        self.up = True

    async def server_live(self) -> bool:
        return self.up


async def test_health_follows_triton_liveness() -> None:
    running = await create_server([], ServiceConfig(host="127.0.0.1", port=0, metrics_port=-1))
    probe = ToggledProbe()

    async def follow(ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        await running.health.set("", status)

    watch = TritonWatch(probe, follow, interval_s=0.05)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def status() -> int:
                return (await stub.Check(health_pb2.HealthCheckRequest(service=""))).status

            await watch.check()
            assert await status() == health_pb2.HealthCheckResponse.SERVING
            probe.up = False
            await watch.check()
            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
            probe.up = True
            await watch.check()
            assert await status() == health_pb2.HealthCheckResponse.SERVING
    finally:
        await running.server.stop(0)


def test_triton_errors_keep_its_address_and_hints_out_of_what_callers_see() -> None:
    cases = {
        grpc.StatusCode.UNAVAILABLE: "failed to connect to all addresses; last error: 10.1.2.3:8001: refused",
        grpc.StatusCode.INTERNAL: "Stub process at 10.1.2.3:8001 is not healthy",
        grpc.StatusCode.NOT_FOUND: "Request for unknown model: 'm' is not found",
    }
    for code, details in cases.items():
        error = triton_error(code, details, url="10.1.2.3:8001", model="m")
        sent = to_status_proto(error, service="dispatch").SerializeToString()
        assert b"10.1.2.3" not in sent
        assert b"constellation up" not in sent
        assert "10.1.2.3:8001" in error.detail
    assert "constellation models list" in triton_error(grpc.StatusCode.NOT_FOUND, "", url="x", model="m").message
