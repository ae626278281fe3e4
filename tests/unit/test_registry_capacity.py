"""Model capacity in the registry: COLD / LOADING / READY with measured load times (schema 3)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from constellation.errors import InvalidArgument, NotFound
from constellation.v1 import common_pb2, registry_pb2
from services.registry.registry import Registry
from services.registry.store import ModelStore

COLD = common_pb2.MODEL_STATE_COLD
LOADING = common_pb2.MODEL_STATE_LOADING
READY = common_pb2.MODEL_STATE_READY


def _registry(path: Path | str = ":memory:") -> Registry:
    registry = Registry(ModelStore(path), clock=lambda: 1000.0)
    registry.register(registry_pb2.ModelRecord(name="m", params_b=8.0))
    return registry


async def test_a_load_from_zero_is_measured_and_published() -> None:
    registry = _registry()
    with registry.watch() as (_, watcher):
        registry.set_state("m", COLD)
        registry.set_state("m", LOADING)
        [record] = registry.set_state("m", READY, load_time_ms=4000.0, replicas=2)
        assert record.state == READY and record.replicas == 2
        assert record.load_time_ms == pytest.approx(4000.0) and record.loads_measured == 1
        assert record.state_since.seconds == 1000
        registry.set_state("m", COLD)
        registry.set_state("m", LOADING)
        [record] = registry.set_state("m", READY, load_time_ms=2000.0, replicas=1)
        # An exponentially weighted mean with weight 0.5 on the newest load.
        assert record.load_time_ms == pytest.approx(3000.0) and record.loads_measured == 2
        states = [(await watcher.next())[1].state for _ in range(6)]
    assert states == [COLD, LOADING, READY, COLD, LOADING, READY]
    await registry.close()


async def test_the_same_report_twice_changes_nothing() -> None:
    registry = _registry()
    registry.set_state("m", COLD)
    with registry.watch() as (_, watcher):
        registry.set_state("m", COLD)
        registry.set_state("m", LOADING)
        assert (await watcher.next())[1].state == LOADING  # the repeated COLD published nothing
    await registry.close()


async def test_bad_reports_are_refused() -> None:
    registry = _registry()
    with pytest.raises(InvalidArgument) as error:
        registry.set_state("m", common_pb2.MODEL_STATE_UNHEALTHY, load_time_ms=-1.0)
    assert {v.field for v in error.value.violations} == {"state", "load_time_ms"}
    with pytest.raises(NotFound):
        registry.set_state("nope", COLD)
    await registry.close()


async def test_measured_load_times_survive_a_restart_and_a_re_registration(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    registry = _registry(path)
    registry.set_state("m", READY, load_time_ms=1500.0, replicas=1)
    await registry.close()
    reopened = Registry(ModelStore(path))
    assert reopened.get("m").load_time_ms == pytest.approx(1500.0)
    # The seed file registers the model again: what was measured stays.
    reopened.register(registry_pb2.ModelRecord(name="m", params_b=8.0))
    assert reopened.get("m").load_time_ms == pytest.approx(1500.0)
    assert reopened.store.load_time_ms("m") == pytest.approx(1500.0)
    await reopened.close()


def test_a_version_3_file_gets_its_load_times_backfilled(tmp_path: Path) -> None:
    path = tmp_path / "v3.sqlite"
    ModelStore(path, target_version=3).close()
    record = registry_pb2.ModelRecord(name="old", load_time_ms=750.0, state=COLD)
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO models (name, record, state) VALUES (?, ?, ?)", ("old", record.SerializeToString(), COLD)
        )
    with ModelStore(path) as store:
        assert store.migrated_from == 3 and store.schema_version == 4
        assert store.load_time_ms("old") == pytest.approx(750.0)
        assert store.get("old") == record


async def test_a_backend_model_report_changes_every_record_it_serves() -> None:
    registry = Registry(ModelStore(":memory:"))
    for name in ("a", "b"):
        registry.register(registry_pb2.ModelRecord(name=name, backend=common_pb2.Backend(model_name="replay")))
    registry.register(registry_pb2.ModelRecord(name="other"))
    changed = registry.set_state("replay", COLD)
    assert [r.name for r in changed] == ["a", "b"]
    assert [registry.get(n).state for n in ("a", "b", "other")] == [COLD, COLD, READY]
    await registry.close()
