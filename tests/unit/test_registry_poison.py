"""Nothing a caller sends, and nothing an older version stored, can poison the registry.

Range and size checks on records and outcomes (one field violation per bad field), statistics that skip
non-finite samples, stored poison repaired on load, and a property test: no sequence of calls the
registry accepts leaves a NaN or infinite value where routing reads it, before or after a restart.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constellation.errors import InvalidArgument
from constellation.v1 import common_pb2, registry_pb2
from services.dispatch.routing import PoolModel, Router
from services.registry.registry import Registry
from services.registry.stats import LatencySeries, ModelStats, StatsSettings
from services.registry.store import ModelStore
from services.registry.validation import MAX_CAPABILITIES

INF = math.inf
NAN = math.nan


def _record(name: str = "m", **fields: object) -> registry_pb2.ModelRecord:
    values: dict[str, object] = {"family": "llama", "params_b": 8.0, "price_in_per_mtok": 0.2, "traffic_weight": 1.0}
    values.update(fields)
    return registry_pb2.ModelRecord(name=name, **values)  # type: ignore[arg-type]


def _outcome(**fields: object) -> registry_pb2.Outcome:
    values: dict[str, object] = {
        "model": "m",
        "success": True,
        "time_to_first_token_ms": 50.0,
        "total_ms": 500.0,
        "usage": common_pb2.Usage(output_tokens=10),
    }
    values.update(fields)
    return registry_pb2.Outcome(**values)  # type: ignore[arg-type]


def _fields(error: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return sorted(v.field for v in error.value.violations)


def test_a_poisoned_record_is_refused_with_one_violation_per_field() -> None:
    registry = Registry(ModelStore(":memory:"))
    poison = _record(
        params_b=INF,
        price_out_per_mtok=NAN,
        quality=[registry_pb2.QualityEstimate(quality=7.5), registry_pb2.QualityEstimate(task=99, quality=0.5)],  # type: ignore[arg-type]
        tasks=[common_pb2.TASK_TYPE_MATH, 42],  # type: ignore[list-item]
        state=17,  # type: ignore[arg-type]
        capabilities=["chat", "x" * 65],
        family="f" * 129,
    )
    with pytest.raises(InvalidArgument) as caught:
        registry.register(poison)
    assert _fields(caught) == [
        "model.capabilities[1]",
        "model.family",
        "model.params_b",
        "model.price_out_per_mtok",
        "model.quality[0].quality",
        "model.quality[1].task",
        "model.state",
        "model.tasks",
    ]
    assert caught.value.reason == "INVALID_MODEL_RECORD"
    assert registry.records == {}


def test_list_sizes_are_bounded() -> None:
    registry = Registry(ModelStore(":memory:"))
    with pytest.raises(InvalidArgument) as caught:
        registry.register(_record(capabilities=[f"c{i}" for i in range(400_000)]))
    assert _fields(caught) == ["model.capabilities"]
    assert (
        "400000" in caught.value.violations[0].description
        and str(MAX_CAPABILITIES) in caught.value.violations[0].description
    )
    registry.register(_record(capabilities=[f"c{i}" for i in range(MAX_CAPABILITIES)]))  # the limit itself is fine


def test_a_poisoned_outcome_rejects_its_whole_batch_and_changes_nothing() -> None:
    registry = Registry(ModelStore(":memory:"))
    registry.register(_record())
    registry.report([_outcome()])
    before = registry.get("m")
    bad = [
        _outcome(),
        _outcome(total_ms=INF),
        _outcome(time_to_first_token_ms=NAN, quality=7.5, task=99),  # type: ignore[arg-type]
        _outcome(usage=common_pb2.Usage(cost_usd=-1.0)),
    ]
    with pytest.raises(InvalidArgument) as caught:
        registry.report(bad)
    assert _fields(caught) == [
        "outcomes[1].total_ms",
        "outcomes[2].quality",
        "outcomes[2].task",
        "outcomes[2].time_to_first_token_ms",
        "outcomes[3].usage.cost_usd",
    ]
    assert registry.stats["m"].calls == 1
    assert registry.get("m").stats == before.stats


def test_statistics_skip_non_finite_samples() -> None:
    series = LatencySeries(alpha=0.5, window=8)
    for value in (100.0, NAN, INF, -5.0, 300.0):
        series.add(value)
    assert series.ewma_ms == 200.0 and list(series.values) == [100.0, 300.0]
    stats = ModelStats(StatsSettings())
    stats.observe(_outcome(total_ms=INF, quality=NAN))
    stats.observe(_outcome(quality=1.5))
    assert stats.calls == 2 and stats.quality == {}
    restored = ModelStats(
        StatsSettings(), _record(stats=registry_pb2.LiveStats(per_token=registry_pb2.LatencyStats(ewma_ms=NAN)))
    )
    assert restored.per_token.ewma_ms == 0.0


def test_a_store_holding_poison_from_an_older_version_is_repaired_on_load(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    poison = _record(
        params_b=INF,
        price_in_per_mtok=-3.0,
        traffic_weight=INF,
        quality=[
            registry_pb2.QualityEstimate(task=common_pb2.TASK_TYPE_MATH, quality=7.5),
            registry_pb2.QualityEstimate(task=common_pb2.TASK_TYPE_CODE, quality=0.7, observations=3),
        ],
        tasks=[42, common_pb2.TASK_TYPE_CODE],  # type: ignore[list-item]
        capabilities=[f"c{i}" for i in range(1000)],
        state=17,  # type: ignore[arg-type]
        stats=registry_pb2.LiveStats(
            time_to_first_token=registry_pb2.LatencyStats(ewma_ms=NAN, p50_ms=INF), error_rate=NAN
        ),
    )
    with ModelStore(path) as store:  # written as an older version would have: no checks
        store.put([poison, _record("clean")])
    registry = Registry(ModelStore(path))
    repaired = registry.get("m")
    assert repaired.params_b == 0.0 and repaired.price_in_per_mtok == 0.0 and repaired.traffic_weight == 0.0
    assert [(q.task, q.quality) for q in repaired.quality] == [(common_pb2.TASK_TYPE_CODE, pytest.approx(0.7))]
    assert list(repaired.tasks) == [common_pb2.TASK_TYPE_CODE]
    assert len(repaired.capabilities) == MAX_CAPABILITIES
    assert repaired.state == common_pb2.MODEL_STATE_UNHEALTHY
    assert repaired.stats.time_to_first_token.ewma_ms == 0.0 and repaired.stats.error_rate == 0.0
    assert registry.get("clean") == _record("clean")
    registry.store.close()
    with ModelStore(path) as store:  # the repair was written back
        assert store.get("m") == repaired


# -- property: no accepted sequence of calls yields a non-finite routing input ----------------------

ANY_FLOAT = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 1e308, 5e-324, -0.0]))


def _mostly(good: st.SearchStrategy[float], bad: st.SearchStrategy[float]) -> st.SearchStrategy[float]:
    """Valid values three times in four, so that sequences get past validation and reach the statistics."""
    return st.one_of(good, good, good, bad)


FLOATS = _mostly(st.floats(min_value=0.0, max_value=5000.0), ANY_FLOAT)
UNIT = _mostly(st.floats(min_value=0.0, max_value=1.0), ANY_FLOAT)
ENUMS = st.one_of(st.integers(min_value=0, max_value=3), st.integers(min_value=-2, max_value=99))
NAMES = st.sampled_from(["a", "b"])

REGISTER = st.builds(
    lambda name, params, price_in, price_out, weight, quality, task, state: (
        "register",
        registry_pb2.ModelRecord(
            name=name,
            params_b=params,
            price_in_per_mtok=price_in,
            price_out_per_mtok=price_out,
            traffic_weight=weight,
            quality=[registry_pb2.QualityEstimate(task=task, complexity=1, quality=quality)],
            state=state,
        ),
    ),
    NAMES, FLOATS, FLOATS, FLOATS, UNIT, UNIT, ENUMS, st.integers(min_value=0, max_value=5),
)  # fmt: skip
REPORT = st.builds(
    lambda name, success, ttft, total, tokens, quality, task: (
        "report",
        registry_pb2.Outcome(
            model=name,
            success=success,
            time_to_first_token_ms=ttft,
            total_ms=total,
            usage=common_pb2.Usage(output_tokens=tokens),
            quality=quality,
            task=task,
        ),
    ),
    NAMES, st.booleans(), FLOATS, FLOATS, st.integers(min_value=0, max_value=2**32 - 1), UNIT, ENUMS,
)  # fmt: skip


def _finite_routing_inputs(registry: Registry) -> None:
    """Every number dispatch reads from a record is finite and in range, and routing scores stay finite."""
    pool = []
    for record in registry.records.values():
        stats = record.stats
        numbers = [record.params_b, record.price_in_per_mtok, record.price_out_per_mtok, record.traffic_weight,
                   stats.error_rate, *(q.quality for q in record.quality)]  # fmt: skip
        for series in (stats.time_to_first_token, stats.per_token):
            numbers += [series.ewma_ms, series.p50_ms, series.p95_ms, series.p99_ms]
        assert all(math.isfinite(n) and n >= 0 for n in numbers), record
        assert 0 <= stats.error_rate <= 1 and all(0 <= q.quality <= 1 for q in record.quality)
        assert record.state in common_pb2.ModelState.values()
        ttft, per_token = stats.time_to_first_token.p50_ms, stats.per_token.p50_ms
        pool.append(
            PoolModel(record.name, record.price_in_per_mtok, record.price_out_per_mtok, None,
                      record.params_b or None, frozenset(), ttft if ttft > 0 else None,
                      per_token if per_token > 0 else None)
        )  # fmt: skip
    if pool:
        route = Router(None).route(pool, input_tokens=4000, expected_output_tokens=4096)
        assert all(np.isfinite([c.score, c.latency_ms, c.cost_usd]).all() for c in route.candidates)


@pytest.fixture
def store_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as root:
        yield Path(root)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(st.one_of(REGISTER, REPORT), max_size=25))
def test_no_accepted_calls_yield_a_non_finite_routing_input(calls: list[tuple[str, object]], store_path: Path) -> None:
    path = store_path / f"{abs(hash(tuple(repr(c) for c in calls)))}.sqlite"
    registry = Registry(ModelStore(path))
    registry.register(registry_pb2.ModelRecord(name="a"))
    registry.register(registry_pb2.ModelRecord(name="b", params_b=70.0))
    for kind, message in calls:
        try:
            if kind == "register":
                registry.register(message)  # type: ignore[arg-type]
            else:
                registry.report([message])  # type: ignore[list-item]
        except InvalidArgument:
            continue
        _finite_routing_inputs(registry)
    registry.store.close()
    restarted = Registry(ModelStore(path))
    _finite_routing_inputs(restarted)
    restarted.store.close()
    path.unlink()
