"""Per-tenant budgets and rate limits: the token bucket, the daily budget (predicted cost reserved,
actual cost charged), the errors' QuotaFailure and RetryInfo, the bounded metric labels, and a fan-out
through the real Ask pipeline (a fake model server in Triton's place) whose actual cost exceeds its
prediction."""

from __future__ import annotations

import datetime
import time

import pytest
from google.rpc import error_details_pb2

from constellation.auth import _CURRENT, Principal, Role
from constellation.errors import ResourceExhausted, from_status_proto, to_status_proto
from constellation.semconv import Policy
from constellation.triton import Sampling, TritonClient
from services.dispatch.budget import TENANT_COST, BudgetSettings, TenantBudgets
from services.dispatch.config import ModelEntry
from services.dispatch.events import Finished, PlanMade
from services.dispatch.pipeline import Dispatcher
from services.dispatch.query import Query
from services.dispatch.routing import PlannedModel
from tests.unit.dispatch_fakes import FakeGenerator, Script, config

NOON = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC).timestamp()


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_the_token_bucket_allows_a_burst_then_the_rate() -> None:
    ticks = Clock(100.0)
    budgets = TenantBudgets(BudgetSettings(rate_per_s=2.0, burst=3), monotonic=ticks)
    for _ in range(3):
        budgets.admit("acme")
    with pytest.raises(ResourceExhausted) as raised:
        budgets.admit("acme")
    assert raised.value.reason == "RATE_LIMITED"
    assert raised.value.retry_after_s == pytest.approx(0.5)
    assert raised.value.quota[0][0] == "tenant:acme"
    budgets.admit("other-tenant")  # buckets are per tenant
    ticks.now += 0.5
    budgets.admit("acme")


def test_the_budget_holds_predictions_and_charges_actual_costs() -> None:
    wall = Clock(NOON)
    budgets = TenantBudgets(BudgetSettings(daily_usd=1.0, tenant_daily_usd={"big": 100.0}), clock=wall)
    first = budgets.reserve("acme", 0.6)
    with pytest.raises(ResourceExhausted) as raised:
        budgets.reserve("acme", 0.5)  # 0.6 in flight + 0.5 > 1.0
    assert raised.value.reason == "BUDGET_EXHAUSTED"
    assert raised.value.retry_after_s == pytest.approx(12 * 3600)  # until the next UTC midnight
    budgets.settle(first, 0.2)
    budgets.settle(first, 5.0)  # settling twice charges once
    assert budgets.spent("acme") == pytest.approx(0.2)
    second = budgets.reserve("acme", 0.5)
    budgets.settle(second, 0.7)  # more than predicted: the actual is charged
    assert budgets.spent("acme") == pytest.approx(0.9)
    with pytest.raises(ResourceExhausted):
        budgets.reserve("acme", 0.2)
    budgets.reserve("big", 50.0)
    wall.now += 12 * 3600 + 1  # a new UTC day
    assert budgets.spent("acme") == 0.0
    budgets.reserve("acme", 0.9)


def test_a_refusal_carries_quota_failure_and_retry_info_on_the_wire() -> None:
    error = ResourceExhausted(
        "over budget", retry_after_s=30.0, quota=[("tenant:acme", "daily cost budget: $1")], reason="BUDGET_EXHAUSTED"
    )
    status = to_status_proto(error, service="dispatch")
    kinds = {d.TypeName() for d in status.details}
    assert {"google.rpc.ErrorInfo", "google.rpc.QuotaFailure", "google.rpc.RetryInfo"} <= kinds
    failure = error_details_pb2.QuotaFailure()
    next(d for d in status.details if d.Is(failure.DESCRIPTOR)).Unpack(failure)
    assert failure.violations[0].subject == "tenant:acme"
    back = from_status_proto(status)
    assert isinstance(back, ResourceExhausted)
    assert back.retry_after_s == 30.0
    assert back.quota == [("tenant:acme", "daily cost budget: $1")]
    assert back.reason == "BUDGET_EXHAUSTED"


def test_metric_labels_are_the_known_tenants_and_other() -> None:
    budgets = TenantBudgets(BudgetSettings(), known_tenants=lambda: {"acme"})
    assert [budgets.label(t) for t in ("acme", "default", "mallory-1", "mallory-2")] == [
        "acme",
        "default",
        "other",
        "other",
    ]
    before = TENANT_COST.labels("other")._value.get()
    budgets.settle(budgets.reserve("mallory-3", 0.0), 0.25)
    assert TENANT_COST.labels("other")._value.get() == pytest.approx(before + 0.25)


async def test_a_fan_out_costing_more_than_predicted_is_charged_its_actual_cost() -> None:
    # Three members predicted at $0.01 each; every call really costs 10 input + 3 output tokens at $1 a token.
    models = {name: ModelEntry(price_in_per_mtok=1e6, price_out_per_mtok=1e6) for name in ("a", "b", "c")}
    fake = FakeGenerator({name: Script("4") for name in models})
    budgets = TenantBudgets(BudgetSettings(daily_usd=1.0), known_tenants=lambda: {"acme"})
    async with TritonClient("127.0.0.1:1") as triton:
        dispatcher = Dispatcher(config(routing=False, models=models), triton, generator=fake, budgets=budgets)
        members = [PlannedModel(name, quality=0.8, cost_usd=0.01, chosen=True) for name in models]
        dispatcher.plan = lambda query, classification=None: PlanMade(  # type: ignore[method-assign]
            Policy.VOTE, members, "fan-out", members, quorum=3
        )
        query = Query("What is 2 + 2?", Sampling(max_tokens=8), model="", time_budget_ms=0, request_tag="")
        token = _CURRENT.set(Principal("k1", "acme", Role.TENANT))
        try:
            events = [e async for e in dispatcher.ask(query, deadline_s=10.0, received_at=time.perf_counter())]
            final = events[-1]
            assert isinstance(final, Finished)
            assert final.cost_usd > 0.03  # more than predicted
            assert budgets.spent("acme") == pytest.approx(final.cost_usd)
            with pytest.raises(ResourceExhausted) as raised:  # the actual spend used up the day
                [e async for e in dispatcher.ask(query, deadline_s=10.0, received_at=time.perf_counter())]
            assert raised.value.reason == "BUDGET_EXHAUSTED"
        finally:
            _CURRENT.reset(token)
