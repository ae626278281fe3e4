"""RegistryService contract over real gRPC on loopback, with a real SQLite file.

The readiness probe is the one seam replaced: Triton's ModelReady is swapped for a function whose answers
the tests set (``probe_answers``), so recovery can be driven without a Triton server.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from constellation.config import load_config
from constellation.errors import InvalidArgument, NotFound, ResourceExhausted
from constellation.net import free_port
from constellation.v1 import common_pb2, registry_pb2
from services.registry.client import OutcomeReporter, RegistryClient, RegistryView
from services.registry.config import RegistryConfig
from services.registry.main import RunningRegistry, running_registry
from services.registry.servicer import SERVICE_NAME
from tests.grpc_checks import SERVING, reflected, serving

Change = registry_pb2.WatchModelsResponse


@dataclass
class Harness:
    running: RunningRegistry
    address: str
    probe_answers: dict[str, bool | None] = field(default_factory=dict)


def _config(tmp_path: Path, **overrides: object) -> RegistryConfig:
    settings: dict[str, object] = {
        "port": 0,
        "db": str(tmp_path / "registry.sqlite"),
        "shutdown_grace_s": 0.5,
        "watch_coalesce_s": 0.1,
        "probe_interval_s": 0.2,
        "unhealthy_probe_interval_s": 0.05,
        "min_unhealthy_s": 0.0,
        **overrides,
    }
    return load_config(RegistryConfig, None, **settings)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    answers: dict[str, bool | None] = {}

    async def probe(record: registry_pb2.ModelRecord) -> bool | None:
        return answers.get(record.name)

    async with running_registry(_config(tmp_path), probe=probe) as running:
        yield Harness(running, f"127.0.0.1:{running.port}", answers)


def _record(name: str, **fields: object) -> registry_pb2.ModelRecord:
    values: dict[str, object] = {
        "family": "llama-3.1",
        "params_b": 8.0,
        "price_in_per_mtok": 0.18,
        "price_out_per_mtok": 0.2,
        "capabilities": ["chat"],
        "traffic_weight": 1.0,
        "version": "1",
    }
    values.update(fields)
    return registry_pb2.ModelRecord(name=name, **values)  # type: ignore[arg-type]


async def test_health_and_reflection(harness: Harness) -> None:
    assert await serving(harness.address, ("", SERVICE_NAME)) == [SERVING, SERVING]
    names, output = await reflected(harness.address, SERVICE_NAME, "WatchModels")
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names
    assert output == "constellation.v1.WatchModelsResponse"


async def test_register_get_list_and_deregister(harness: Harness) -> None:
    async with RegistryClient(harness.address) as client:
        stored = await client.register(_record("small", capabilities=["chat"]))
        assert stored.state == common_pb2.MODEL_STATE_READY
        await client.register(_record("coder", capabilities=["chat", "code"], state=common_pb2.MODEL_STATE_COLD))
        assert (await client.get("coder")).capabilities == ["chat", "code"]
        assert [r.name for r in await client.list()] == ["coder", "small"]
        assert [r.name for r in await client.list(required_capabilities=["code"])] == ["coder"]
        assert [r.name for r in await client.list(state=common_pb2.MODEL_STATE_READY)] == ["small"]
        await client.deregister("coder")
        with pytest.raises(NotFound, match="known: small"):
            await client.get("coder")
        with pytest.raises(NotFound):
            await client.deregister("coder")


async def test_bad_records_get_invalid_argument_with_field_violations(harness: Harness) -> None:
    async with RegistryClient(harness.address) as client:
        with pytest.raises(InvalidArgument) as caught:
            await client.register(
                _record(
                    "", price_out_per_mtok=-0.1, traffic_weight=-1, quality=[registry_pb2.QualityEstimate(quality=1.2)]
                )
            )
        assert sorted(v.field for v in caught.value.violations) == [
            "model.name",
            "model.price_out_per_mtok",
            "model.quality[0].quality",
            "model.traffic_weight",
        ]
        assert caught.value.reason == "INVALID_MODEL_RECORD"
        with pytest.raises(InvalidArgument) as caught:
            await client.register(registry_pb2.ModelRecord(name="x" * 129))
        assert [v.field for v in caught.value.violations] == ["model.name"]


async def test_poison_is_refused_over_the_wire_and_never_reaches_a_record(harness: Harness) -> None:
    async with RegistryClient(harness.address) as client:
        with pytest.raises(InvalidArgument) as caught:
            await client.register(
                _record(
                    "poison",
                    params_b=math.inf,
                    quality=[registry_pb2.QualityEstimate(quality=7.5)],
                    answer_kinds=[77],
                    state=9,
                )
            )
        assert sorted(v.field for v in caught.value.violations) == [
            "model.answer_kinds",
            "model.params_b",
            "model.quality[0].quality",
            "model.state",
        ]
        with pytest.raises(InvalidArgument) as caught:
            await client.register(_record("wide", capabilities=[f"cap-{i}" for i in range(400_000)]))
        assert [v.field for v in caught.value.violations] == ["model.capabilities"]
        stored = await client.register(_record("sound"))
        with pytest.raises(InvalidArgument) as caught:
            await client.report(
                [
                    registry_pb2.Outcome(model="sound", success=True, time_to_first_token_ms=5.0, total_ms=9.0),
                    registry_pb2.Outcome(model="sound", success=True, time_to_first_token_ms=math.inf, total_ms=9.0),
                ]
            )
        assert [v.field for v in caught.value.violations] == ["outcomes[1].time_to_first_token_ms"]
        assert caught.value.reason == "INVALID_OUTCOME"
        assert [r.name for r in await client.list()] == ["sound"]
        assert (await client.get("sound")).stats == stored.stats


async def test_a_watcher_sees_a_new_model_within_one_second(harness: Harness) -> None:
    async with RegistryClient(harness.address) as client:
        await client.register(_record("first"))
        async with RegistryView(harness.address) as view:
            await view.ready(5)
            assert list(view.models) == ["first"]
            started = time.perf_counter()
            await client.register(_record("second"))
            await view.wait_for(lambda models: "second" in models, timeout_s=5)
            elapsed = time.perf_counter() - started
            assert elapsed < 1.0, f"the watcher saw the new model after {elapsed:.3f} s"
            await client.deregister("first")
            await view.wait_for(lambda models: "first" not in models, timeout_s=5)
            assert [r.name for r in view.healthy()] == ["second"]


async def test_watch_stream_order(harness: Harness) -> None:
    async with RegistryClient(harness.address) as client:
        await client.register(_record("a"))
        await client.register(_record("b"))
        seen: list[tuple[int, str]] = []
        stream = client.watch()
        async for message in stream:
            seen.append((message.change, message.model.name))
            if message.change == Change.CHANGE_SNAPSHOT_END:
                await client.register(_record("c"))
                await client.register(_record("a", version="2"))
                await client.deregister("b")
            if message.change == Change.CHANGE_REMOVED:
                break
        await stream.aclose()
    assert seen == [
        (Change.CHANGE_SNAPSHOT, "a"),
        (Change.CHANGE_SNAPSHOT, "b"),
        (Change.CHANGE_SNAPSHOT_END, ""),
        (Change.CHANGE_ADDED, "c"),
        (Change.CHANGE_UPDATED, "a"),
        (Change.CHANGE_REMOVED, "b"),
    ]


async def test_outcomes_move_stats_an_error_burst_marks_unhealthy_and_the_probe_recovers(harness: Harness) -> None:
    changes: list[tuple[int, int]] = []

    def on_change(change: int, record: registry_pb2.ModelRecord) -> None:
        if record.name == "flaky":
            changes.append((change, record.state))

    async with RegistryClient(harness.address) as client, RegistryView(harness.address, on_change=on_change) as view:
        await client.register(_record("flaky", backend=common_pb2.Backend(endpoint="127.0.0.1:1", model_name="m")))
        await view.ready(5)
        ok = [
            registry_pb2.Outcome(
                model="flaky",
                success=True,
                time_to_first_token_ms=100.0 + i,
                total_ms=600.0,
                usage=common_pb2.Usage(input_tokens=20, output_tokens=51),
                task=common_pb2.TASK_TYPE_MATH,
                complexity=common_pb2.COMPLEXITY_MEDIUM,
                quality=1.0 if i % 2 else 0.0,
            )
            for i in range(4)
        ]
        accepted = await client.report([*ok, registry_pb2.Outcome(model="nobody", success=True)])
        assert accepted == 4
        record = await client.get("flaky")
        assert record.stats.time_to_first_token.p50_ms == 101.0
        assert record.stats.per_token.ewma_ms == pytest.approx(10.0, rel=0.02)
        assert record.stats.error_rate == 0.0
        assert [(q.quality, q.observations) for q in record.quality] == [(0.5, 4)]
        # Coalesced statistics update reaches the watcher.
        await view.wait_for(lambda m: m["flaky"].stats.time_to_first_token.p50_ms == 101.0, timeout_s=5)

        harness.probe_answers["flaky"] = False  # Triton would say: not ready yet
        burst = [registry_pb2.Outcome(model="flaky", success=False, error_code="UNAVAILABLE")] * 4
        assert await client.report(burst) == 4
        assert (await client.get("flaky")).state == common_pb2.MODEL_STATE_UNHEALTHY
        await view.wait_for(lambda m: m["flaky"].state == common_pb2.MODEL_STATE_UNHEALTHY, timeout_s=5)
        assert view.healthy() == []

        harness.probe_answers["flaky"] = True  # ... and now it is ready again
        await view.wait_for(lambda m: m["flaky"].state == common_pb2.MODEL_STATE_READY, timeout_s=5)
        recovered = await client.get("flaky")
        assert recovered.stats.error_rate == 0.0
    states = [state for change, state in changes if change == Change.CHANGE_UPDATED]
    assert common_pb2.MODEL_STATE_UNHEALTHY in states
    assert states[states.index(common_pb2.MODEL_STATE_UNHEALTHY) :].count(common_pb2.MODEL_STATE_READY) >= 1


async def test_a_slow_watcher_is_dropped_not_waited_for(tmp_path: Path) -> None:
    async with running_registry(_config(tmp_path, watch_queue_max=3, probes=False)) as running:
        registry = running.registry
        with registry.watch() as (snapshot, watcher):
            assert snapshot == []
            for i in range(5):  # nobody reads: the fourth change finds the queue full
                registry.register(_record(f"m{i}"))
            assert registry.watcher_count == 0
            for _ in range(3):
                await watcher.next()
            with pytest.raises(ResourceExhausted, match="fell 3 changes behind"):
                await watcher.next()
        assert sorted(registry.records) == [f"m{i}" for i in range(5)]


async def test_records_survive_a_server_restart(tmp_path: Path) -> None:
    config = _config(tmp_path, probes=False)
    async with running_registry(config) as running, RegistryClient(f"127.0.0.1:{running.port}") as client:
        stored = await client.register(_record("durable", version="9", traffic_weight=0.1))
    async with running_registry(config) as running, RegistryClient(f"127.0.0.1:{running.port}") as client:
        assert await client.get("durable") == stored


async def test_outcome_reporter_batches_and_never_fails_its_caller(harness: Harness) -> None:
    async with RegistryClient(harness.address) as client:
        await client.register(_record("busy"))
    outcome = registry_pb2.Outcome(model="busy", success=True, time_to_first_token_ms=5.0, total_ms=9.0)
    async with OutcomeReporter(harness.address, max_batch=64, flush_interval_s=0.05) as reporter:
        for _ in range(100):
            reporter.report(outcome)
        reporter.report(registry_pb2.Outcome(model="unknown", success=True))
    assert (reporter.sent, reporter.accepted, reporter.dropped) == (101, 100, 0)
    assert harness.running.registry.stats["busy"].calls == 100

    nowhere = f"127.0.0.1:{free_port()}"
    reporter = OutcomeReporter(nowhere, max_queue=10, timeout_s=0.2, flush_interval_s=0.05)
    reporter.start()
    for _ in range(12):
        reporter.report(outcome)  # returns at once even though nobody listens
    await asyncio.sleep(0.5)
    await reporter.close()
    assert reporter.sent == 0 and reporter.dropped == 12
