"""Cold-start-aware routing: a cold model's predicted latency includes its load time, so a warm model wins
when the load would break the request's latency ceiling or deadline."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from constellation.v1 import common_pb2, registry_pb2
from services.dispatch.capacity import cold_start_ms, load_prior_ms
from services.dispatch.routing import PoolModel, Prediction, Router, Weights

# Quality decides (speed weighs little): the cold model is the better one.
WEIGHTS = Weights(quality=1.0, cost=0.0, latency=0.1)
PREDICTIONS = {"warm": Prediction(0.6, 10.0, None, "test"), "cold": Prediction(0.9, 10.0, None, "test")}


def pool(cold_start: float) -> list[PoolModel]:
    return [
        PoolModel("warm", 1.0, 1.0, ttft_ms=300.0, per_token_ms=10.0, live=True),
        PoolModel("cold", 1.0, 1.0, ttft_ms=200.0, per_token_ms=10.0, live=True, cold_start_ms=cold_start),
    ]


def chosen(cold_start: float, max_latency_ms: float = 0.0, deadline_ms: float = 0.0) -> tuple[str, dict[str, str]]:
    route = Router(None).route(
        pool(cold_start),
        weights=WEIGHTS,
        predictions=PREDICTIONS,
        expected_output_tokens=100,
        max_latency_ms=max_latency_ms,
        deadline_ms=deadline_ms,
    )
    return route.members[0].model, {c.model: c.reason for c in route.candidates}


def test_a_warm_better_model_is_chosen_with_nothing_in_the_way() -> None:
    assert chosen(0.0)[0] == "cold"
    assert chosen(8000.0)[0] == "cold"  # no ceiling, no deadline: quality wins, the request waits for the load


def test_the_load_time_counts_against_the_latency_ceiling() -> None:
    # Warm it would take 200 + 100 x 10 = 1200 ms, within 2000; 8 s of load breaks the ceiling.
    assert chosen(0.0, max_latency_ms=2000.0)[0] == "cold"
    model, reasons = chosen(8000.0, max_latency_ms=2000.0)
    assert model == "warm"
    assert reasons["cold"] == "left out: predicted 9200 ms (cold start 8000 ms) > max_latency_ms"


def test_a_load_longer_than_the_deadline_leaves_the_cold_model_out() -> None:
    model, reasons = chosen(8000.0, deadline_ms=5000.0)
    assert model == "warm"
    assert reasons["cold"].startswith("left out: cold: predicted 9200 ms")
    assert chosen(8000.0, deadline_ms=30_000.0)[0] == "cold"  # the load fits in the deadline


def test_when_only_cold_models_could_answer_the_request_waits_for_a_load() -> None:
    only_cold = [PoolModel("cold", 1.0, 1.0, ttft_ms=200.0, per_token_ms=10.0, cold_start_ms=8000.0)]
    route = Router(None).route(only_cold, predictions=PREDICTIONS, deadline_ms=1000.0)
    assert [m.model for m in route.members] == ["cold"]
    assert route.members[0].latency_ms > 8000.0


def _record(state: int, **fields: object) -> registry_pb2.ModelRecord:
    return registry_pb2.ModelRecord(name="m", params_b=8.0, state=state, **fields)  # type: ignore[arg-type]


def test_cold_start_of_a_record_by_state() -> None:
    assert cold_start_ms(None, 0.0) == 0.0
    assert cold_start_ms(_record(common_pb2.MODEL_STATE_READY, load_time_ms=4000.0), 0.0) == 0.0
    assert cold_start_ms(_record(common_pb2.MODEL_STATE_COLD, load_time_ms=4000.0), 0.0) == 4000.0
    assert cold_start_ms(_record(common_pb2.MODEL_STATE_COLD), 0.0) == load_prior_ms(8.0) == 3200.0
    since = Timestamp(seconds=100)
    loading = _record(common_pb2.MODEL_STATE_LOADING, load_time_ms=4000.0, state_since=since)
    assert cold_start_ms(loading, 101.0) == pytest.approx(3000.0)  # one second into a four-second load
    assert cold_start_ms(loading, 200.0) == pytest.approx(400.0)  # overdue: a tenth of the load, not zero
