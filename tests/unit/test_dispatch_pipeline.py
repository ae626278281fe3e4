"""The Ask pipeline wired end to end in process, with a fake model server in Triton's place.

The Triton client is real but never contacted: the fake generator makes the model calls, so the test
covers planning, the strategy chosen by the plan's policy, and what the Ask span records.
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from constellation import semconv
from constellation.semconv import Policy
from constellation.triton import Sampling, TritonClient
from services.dispatch.events import Finished, PlanMade
from services.dispatch.pipeline import Dispatcher
from services.dispatch.query import Query
from services.dispatch.strategies import STRATEGIES
from tests.unit.dispatch_fakes import FakeGenerator, Script, config

tracer = trace.get_tracer("tests.dispatch_pipeline")


def test_every_policy_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(Policy)


async def test_an_ask_runs_its_plan_and_records_the_request_tag_on_its_span(spans: InMemorySpanExporter) -> None:
    fake = FakeGenerator({"smollm2": Script("Hello there.")})
    async with TritonClient("127.0.0.1:1") as triton:
        dispatcher = Dispatcher(config(routing=False), triton, generator=fake)
        query = Query("Say hi.", Sampling(max_tokens=8), model="", time_budget_ms=0, request_tag="nightly-eval")
        with tracer.start_as_current_span("ask"):
            events = [e async for e in dispatcher.ask(query, deadline_s=10.0, received_at=time.perf_counter())]
    plan = next(e for e in events if isinstance(e, PlanMade))
    assert plan.policy == Policy.SINGLE
    assert [m.model for m in plan.members] == ["smollm2"]
    last = events[-1]
    assert isinstance(last, Finished)
    assert last.text == "Hello there."
    ask = next(s for s in spans.get_finished_spans() if s.name == "ask")
    assert ask.attributes is not None
    assert ask.attributes[semconv.REQUEST_TAG] == "nightly-eval"
    assert ask.attributes[semconv.ROUTE] == "single"
    call = next(s for s in spans.get_finished_spans() if s.name == semconv.SPAN_MODEL_CALL)
    assert call.attributes is not None
    assert call.attributes[semconv.MODEL] == "smollm2"
    assert call.attributes[semconv.MEMBER_ROLE] == "member"
    assert call.parent is not None and call.parent.span_id == ask.context.span_id
