"""Live statistics, the health policy, the prober, and pool files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from constellation.errors import InvalidArgument
from constellation.v1 import common_pb2, registry_pb2
from services.registry.health import HealthPolicy, Prober
from services.registry.registry import Registry, RegistrySettings
from services.registry.seed import load_pool_file, records_from_model_cards
from services.registry.stats import ModelStats, StatsSettings, percentile
from services.registry.store import ModelStore

EXAMPLE_POOL = Path(__file__).resolve().parents[2] / "services" / "registry" / "data" / "pool.example.toml"
MODELS_JSON = Path(__file__).resolve().parents[3] / "shared" / "data" / "models.json"


def _ok(ttft: float, total: float, tokens: int) -> registry_pb2.Outcome:
    return registry_pb2.Outcome(
        model="m",
        success=True,
        time_to_first_token_ms=ttft,
        total_ms=total,
        usage=common_pb2.Usage(output_tokens=tokens),
    )


def _failed(code: str = "UNAVAILABLE") -> registry_pb2.Outcome:
    return registry_pb2.Outcome(model="m", success=False, error_code=code)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, q) for q in (50, 95, 99, 100)] == [50.0, 95.0, 99.0, 100.0]
    assert percentile([], 50) == 0.0


def test_latency_window_ewma_and_per_token_time() -> None:
    stats = ModelStats(StatsSettings(ewma_alpha=0.5, window=4))
    for first in (100.0, 200.0, 300.0, 400.0, 500.0):
        stats.observe(_ok(first, first + 90.0, 10))
    record = registry_pb2.ModelRecord(name="m")
    stats.write_to(record, now=1_700_000_000.0)
    ttft = record.stats.time_to_first_token
    assert ttft.ewma_ms == pytest.approx(100 + 50 + 75 + 87.5 + 93.75)
    # The window keeps the last 4: 200..500.
    assert (ttft.p50_ms, ttft.p95_ms, ttft.p99_ms) == (300.0, 500.0, 500.0)
    assert record.stats.per_token.p50_ms == pytest.approx(10.0)  # 90 ms over 9 tokens after the first
    assert record.stats.updated_at.seconds == 1_700_000_000
    # One output token gives no per-token time; a failure gives no latency at all.
    stats.observe(_ok(50.0, 50.0, 1))
    stats.observe(_failed())
    assert len(stats.per_token.values) == 4
    assert list(stats.ttft.values) == [300.0, 400.0, 500.0, 50.0]


def test_error_rate_and_the_health_policy() -> None:
    policy = HealthPolicy(error_rate_threshold=0.5, min_calls=4, max_consecutive_failures=3)
    stats = ModelStats(StatsSettings(error_window=10))
    stats.observe(_failed())
    stats.observe(_ok(10, 20, 2))
    stats.observe(_failed())
    assert stats.error_rate == pytest.approx(2 / 3)
    assert not policy.unhealthy(stats)  # fewer than 4 calls
    stats.observe(_ok(10, 20, 2))
    assert stats.error_rate == 0.5 and policy.unhealthy(stats)
    stats.reset_errors()
    assert stats.error_rate == 0.0 and not policy.unhealthy(stats)
    for _ in range(3):
        stats.observe(_failed("DEADLINE_EXCEEDED"))
    assert stats.consecutive_timeouts == 3
    assert policy.unhealthy(stats)


async def test_prober_recovers_unhealthy_models_and_flags_unreachable_ones() -> None:
    registry = Registry(ModelStore(":memory:"), RegistrySettings(min_unhealthy_s=0.0))
    for name, endpoint in (("down", "127.0.0.1:1"), ("up", "127.0.0.1:2"), ("local", "")):
        registry.register(
            registry_pb2.ModelRecord(name=name, backend=common_pb2.Backend(endpoint=endpoint, model_name=name))
        )
    registry.register(registry_pb2.ModelRecord(name="cold", state=common_pb2.MODEL_STATE_COLD))
    registry.report([registry_pb2.Outcome(model="up", success=False)] * 5)
    assert registry.get("up").state == common_pb2.MODEL_STATE_UNHEALTHY
    probed: list[str] = []

    async def probe(record: registry_pb2.ModelRecord) -> bool | None:
        probed.append(record.name)
        if not record.backend.endpoint:
            return None
        return record.name == "up"

    prober = Prober(probe, lambda: list(registry.records.values()), registry.apply_probe)
    await prober.sweep(everything=False)
    assert probed == ["up"]
    assert registry.get("up").state == common_pb2.MODEL_STATE_READY
    assert registry.stats["up"].recent_calls == 0
    await prober.sweep(everything=True)
    states = {r.name: common_pb2.ModelState.Name(r.state) for r in registry.list()}
    assert states == {
        "cold": "MODEL_STATE_COLD",
        "down": "MODEL_STATE_UNHEALTHY",
        "local": "MODEL_STATE_READY",
        "up": "MODEL_STATE_READY",
    }
    await registry.close()


def test_example_pool_file_parses() -> None:
    records = load_pool_file(EXAMPLE_POOL)
    by_name = {r.name: r for r in records}
    mini = by_name["gpt-4o-mini-2024-07-18"]
    assert mini.backend.model_name == "replay"
    assert dict(mini.backend.parameters) == {"recorded_model": "gpt-4o-mini-2024-07-18"}
    assert common_pb2.ANSWER_KIND_NUMBER in mini.answer_kinds
    assert mini.quality[0].task == common_pb2.TASK_TYPE_MATH
    assert mini.simulated


def test_json_pool_files_and_their_errors(tmp_path: Path) -> None:
    good = tmp_path / "pool.json"
    good.write_text(json.dumps({"models": [{"name": "x", "tasks": ["code"], "state": "cold"}]}))
    (record,) = load_pool_file(good)
    assert record.state == common_pb2.MODEL_STATE_COLD and list(record.tasks) == [common_pb2.TASK_TYPE_CODE]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": [{"name": "x", "price_in_per_mtok": -2, "colour": "red"}]}))
    with pytest.raises(InvalidArgument) as caught:
        load_pool_file(bad)
    assert sorted(v.field for v in caught.value.violations) == ["models[0].colour", "models[0].price_in_per_mtok"]
    bad.write_text(json.dumps({"models": [{"name": "x", "tasks": ["poetry"]}]}))
    with pytest.raises(InvalidArgument) as caught:
        load_pool_file(bad)
    assert [v.field for v in caught.value.violations] == ["models[0].tasks[0]"]


@pytest.mark.skipif(not MODELS_JSON.is_file(), reason="the recorded pools are not beside the checkout")
def test_records_from_model_cards_point_at_the_replay_model() -> None:
    backend = common_pb2.Backend(endpoint="127.0.0.1:8001")
    records = records_from_model_cards(
        MODELS_JSON, ["Meta-Llama-3.1-70B-Instruct", "not-in-the-cards"], backend, tasks=[common_pb2.TASK_TYPE_MATH]
    )
    llama, unknown = records
    assert (llama.family, llama.params_b, llama.price_in_per_mtok) == ("llama-3.1", 70.6, 0.88)
    assert llama.backend.model_name == "replay" and llama.backend.endpoint == "127.0.0.1:8001"
    assert dict(llama.backend.parameters) == {"recorded_model": "Meta-Llama-3.1-70B-Instruct"}
    assert llama.simulated and list(llama.tasks) == [common_pb2.TASK_TYPE_MATH]
    assert unknown.family == "" and unknown.price_out_per_mtok == 0.0
    assert not backend.parameters  # the template is not changed


async def test_triton_probe_says_not_ready_when_nothing_listens() -> None:
    from constellation.net import free_port
    from services.registry.health import TritonReadiness

    readiness = TritonReadiness(timeout_s=1.0)
    record = registry_pb2.ModelRecord(
        name="m", backend=common_pb2.Backend(endpoint=f"127.0.0.1:{free_port()}", model_name="replay")
    )
    try:
        assert await readiness(record) is False
        assert await readiness(registry_pb2.ModelRecord(name="no-endpoint")) is None
    finally:
        await readiness.close()
