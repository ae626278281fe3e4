"""The scaler's arithmetic: Little's law, fan-out, floor, max, hysteresis, cooldowns and scale-to-zero."""

from __future__ import annotations

import pytest

from constellation.v1 import registry_pb2
from services.scaler.policy import Knobs, ScalingPolicy, replicas_for
from services.scaler.sources import ArrivalWindow, FixedLatency, RecordLatency


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def arrive(window: ArrivalWindow, clock: FakeClock, model: str, rate: float, seconds: float) -> None:
    """``rate`` arrivals per second to ``model`` for ``seconds``, spread evenly."""
    count = round(rate * seconds)
    for _ in range(count):
        clock.advance(seconds / count)
        window.record(model)


def make(knobs: Knobs, latency_s: float = 2.0) -> tuple[ScalingPolicy, ArrivalWindow, FakeClock]:
    clock = FakeClock()
    window = ArrivalWindow(clock)
    policy = ScalingPolicy(demand=window, latency=FixedLatency({"m": latency_s}), clock=clock, tiers={"default": knobs})
    return policy, window, clock


def test_replicas_for_is_a_ceiling_that_ignores_float_noise() -> None:
    assert replicas_for(0.0, 2.0) == 0
    assert replicas_for(0.1, 2.0) == 1
    assert replicas_for(4.0, 2.0) == 2
    assert replicas_for(4.0000000001, 2.0) == 2
    assert replicas_for(4.1, 2.0) == 3


def test_littles_law_sets_the_replicas() -> None:
    # 3 req/s x 2 s = 6 in flight; 2 per replica -> 3 replicas.
    policy, window, clock = make(Knobs(concurrency=2, max_replicas=10, window_s=10))
    arrive(window, clock, "m", 3.0, 10.0)
    decision = policy.decide("m", current=1)
    assert decision.rate_per_s == pytest.approx(3.0)
    assert decision.raw == 3
    assert (decision.action, decision.target) == ("scale_up", 3)
    assert "3 req/s x 2 s = 6 in flight" in decision.reason


def test_fanout_adds_the_query_rate_to_every_member() -> None:
    clock = FakeClock()
    window = ArrivalWindow(clock)
    members = ["a", "b", "c", "d", "e"]
    for _ in range(20):  # 2 queries/s for 10 s, each a vote of five
        clock.advance(0.5)
        window.record_fanout(members)
    policy = ScalingPolicy(
        demand=window,
        latency=FixedLatency(dict.fromkeys(members, 1.0)),
        clock=clock,
        tiers={"default": Knobs(window_s=10, max_replicas=8)},
    )
    decisions = policy.decide_all({m: 1 for m in members})
    assert [d.rate_per_s for d in decisions] == pytest.approx([2.0] * 5)
    assert {d.target for d in decisions} == {2}


def test_max_and_floor_bound_the_target() -> None:
    policy, window, clock = make(Knobs(concurrency=1, max_replicas=4, min_replicas=2, window_s=10))
    arrive(window, clock, "m", 10.0, 10.0)  # 20 in flight
    assert policy.decide("m", current=2).target == 4
    quiet, _, _ = make(Knobs(min_replicas=2, idle_to_zero_s=0))
    assert quiet.decide("m", current=0).target == 2


def test_up_is_fast_down_waits_for_stabilization_and_cooldown() -> None:
    knobs = Knobs(
        concurrency=1,
        max_replicas=10,
        window_s=10,
        up_cooldown_s=0,
        down_cooldown_s=30,
        down_stabilization_s=60,
        hysteresis=0.0,
        idle_to_zero_s=1000,
    )
    policy, window, clock = make(knobs, latency_s=1.0)
    arrive(window, clock, "m", 5.0, 10.0)
    assert (policy.decide("m", 1).action, policy.decide("m", 1).target) == ("scale_up", 5)
    arrive(window, clock, "m", 1.0, 10.0)  # the load falls to 1 in flight
    held = policy.decide("m", 5)
    assert held.action == "hold" and "5 wanted within 60 s" in held.reason
    clock.advance(51)  # past the stabilization window (no arrivals: the rate is 0, still not idle)
    down = policy.decide("m", 5)
    assert (down.action, down.target) == ("scale_down", 1)
    arrive(window, clock, "m", 3.0, 10.0)
    up_again = policy.decide("m", 1)
    assert (up_again.action, up_again.target) == ("scale_up", 3)


def test_down_cooldown_holds_after_a_change() -> None:
    knobs = Knobs(
        concurrency=1,
        max_replicas=10,
        window_s=10,
        up_cooldown_s=0,
        down_cooldown_s=30,
        down_stabilization_s=0,
        hysteresis=0.0,
        idle_to_zero_s=1000,
    )
    policy, window, clock = make(knobs, latency_s=1.0)
    arrive(window, clock, "m", 4.0, 10.0)
    assert policy.decide("m", 1).target == 4
    clock.advance(10)  # the window empties: 1 wanted (not idle yet), but the change was 10 s ago
    held = policy.decide("m", 4)
    assert held.action == "hold" and "down cooldown" in held.reason
    clock.advance(25)
    assert (policy.decide("m", 4).action, policy.decide("m", 1).target) == ("scale_down", 1)


def test_up_cooldown_delays_a_second_scale_up() -> None:
    knobs = Knobs(concurrency=1, max_replicas=10, window_s=10, up_cooldown_s=5, idle_to_zero_s=1000)
    policy, window, clock = make(knobs, latency_s=1.0)
    arrive(window, clock, "m", 2.0, 10.0)
    assert policy.decide("m", 1).target == 2
    arrive(window, clock, "m", 20.0, 1.0)
    held = policy.decide("m", 2)
    assert held.action == "hold" and "up cooldown" in held.reason
    clock.advance(5)
    assert policy.decide("m", 2).action == "scale_up"


def test_hysteresis_keeps_a_replica_until_the_load_leaves_headroom() -> None:
    # 1.9 in flight at 1 per replica with 10% hysteresis: 2 are kept (1 would need <= 0.9).
    knobs = Knobs(
        concurrency=1,
        max_replicas=10,
        window_s=10,
        down_cooldown_s=0,
        down_stabilization_s=0,
        hysteresis=0.1,
        idle_to_zero_s=1000,
    )
    policy, window, clock = make(knobs, latency_s=1.0)
    arrive(window, clock, "m", 0.95, 20.0)  # 0.95 req/s x 1 s = 0.95 in flight, raw 1
    decision = policy.decide("m", 2)
    assert decision.raw == 1
    assert decision.action == "hold" and "10% headroom" in decision.reason
    policy2, window2, clock2 = make(knobs, latency_s=1.0)
    arrive(window2, clock2, "m", 0.5, 20.0)
    assert (policy2.decide("m", 2).action, policy2.decide("m", 2).target) == ("scale_down", 1)


def test_scale_to_zero_after_idle_and_back_from_zero_at_once() -> None:
    knobs = Knobs(concurrency=1, window_s=10, idle_to_zero_s=60, up_cooldown_s=30, down_cooldown_s=30)
    policy, window, clock = make(knobs, latency_s=1.0)
    arrive(window, clock, "m", 1.0, 10.0)
    assert policy.decide("m", 1).action == "hold"
    clock.advance(59)
    assert policy.decide("m", 1).action == "hold"  # idle 59 s < 60 s: one replica stays
    clock.advance(1)
    to_zero = policy.decide("m", 1)
    assert (to_zero.action, to_zero.target) == ("scale_to_zero", 0)
    assert "idle 60 s" in to_zero.reason
    window.record("m")  # a request arrives while the model is at zero: no cooldown applies
    back = policy.decide("m", 0)
    assert (back.action, back.target) == ("scale_from_zero", 1)


def test_a_model_never_seen_goes_to_zero_only_after_the_idle_time() -> None:
    policy, _, clock = make(Knobs(idle_to_zero_s=30))
    assert policy.decide("m", 1).action == "hold"
    clock.advance(30)
    assert policy.decide("m", 1).action == "scale_to_zero"


def test_warm_floor_per_tier_and_model_knobs() -> None:
    clock = FakeClock()
    policy = ScalingPolicy(
        demand=ArrivalWindow(clock),
        latency=FixedLatency({}),
        clock=clock,
        tiers={"hot": Knobs(min_replicas=1, idle_to_zero_s=0, down_cooldown_s=0, down_stabilization_s=0)},
        model_tiers={"common": "hot"},
        model_knobs={"special": Knobs(min_replicas=3)},
    )
    first = {d.model: d for d in policy.decide_all({"common": 2, "rare": 1}, ["special"])}
    assert first["rare"].action == "hold"  # idle time counts from when the policy first saw a model
    clock.advance(10_000)
    decisions = {d.model: d for d in policy.decide_all({"common": 2, "rare": 1}, ["special"])}
    assert (decisions["common"].tier, decisions["common"].target) == ("hot", 1)
    assert decisions["rare"].action == "scale_to_zero"
    assert (decisions["special"].action, decisions["special"].target) == ("scale_from_zero", 3)


def test_record_latency_reads_the_registry_statistics() -> None:
    record = registry_pb2.ModelRecord(name="m")
    record.stats.time_to_first_token.ewma_ms = 200.0
    record.stats.per_token.ewma_ms = 10.0
    records = {"m": record, "new": registry_pb2.ModelRecord(name="new")}
    source = RecordLatency(lambda: records, output_tokens=100)
    assert source.latency_s("m") == pytest.approx(1.2)
    assert source.latency_s("new") is None
    assert source.latency_s("absent") is None
