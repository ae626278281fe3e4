"""The registry's SQLite store and the in-memory pool over it: restarts, migrations, upsert rules."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from constellation.errors import InvalidArgument, NotFound
from constellation.v1 import common_pb2, registry_pb2
from services.registry.registry import Registry
from services.registry.store import SCHEMA_VERSION, ModelStore


def _record(name: str, **fields: object) -> registry_pb2.ModelRecord:
    defaults: dict[str, object] = {
        "family": "llama-3.1",
        "params_b": 8.0,
        "price_in_per_mtok": 0.18,
        "price_out_per_mtok": 0.18,
        "version": "1",
        "traffic_weight": 1.0,
        "capabilities": ["chat"],
        "backend": common_pb2.Backend(
            endpoint="127.0.0.1:8001", model_name="replay", parameters={"recorded_model": name}
        ),
    }
    defaults.update(fields)
    return registry_pb2.ModelRecord(name=name, **defaults)  # type: ignore[arg-type]


async def test_records_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    registry = Registry(ModelStore(path))
    registry.register(_record("a", state=common_pb2.MODEL_STATE_COLD, version="7", traffic_weight=0.25))
    registry.register(_record("b"))
    registry.report(
        [
            registry_pb2.Outcome(
                model="b",
                success=True,
                time_to_first_token_ms=120.0,
                total_ms=1120.0,
                usage=common_pb2.Usage(output_tokens=101),
                task=common_pb2.TASK_TYPE_MATH,
                complexity=common_pb2.COMPLEXITY_LOW,
                quality=1.0,
            )
        ]
    )
    before = {name: registry.get(name) for name in ("a", "b")}
    await registry.close()

    reopened = Registry(ModelStore(path))
    assert sorted(reopened.records) == ["a", "b"]
    for name, record in before.items():
        assert reopened.get(name) == record
    assert reopened.store.columns("a") == (common_pb2.MODEL_STATE_COLD, "7", 0.25)
    stats = reopened.get("b").stats
    assert stats.time_to_first_token.ewma_ms == pytest.approx(120.0)
    assert stats.per_token.ewma_ms == pytest.approx(10.0)
    # The EWMA and the quality estimate continue from where they were.
    reopened.report(
        [
            registry_pb2.Outcome(
                model="b",
                success=True,
                time_to_first_token_ms=220.0,
                total_ms=300.0,
                task=common_pb2.TASK_TYPE_MATH,
                complexity=common_pb2.COMPLEXITY_LOW,
                quality=0.0,
            )
        ]
    )
    after = reopened.get("b")
    assert after.stats.time_to_first_token.ewma_ms == pytest.approx(130.0)
    assert [(q.quality, q.observations) for q in after.quality] == [(0.5, 2)]
    await reopened.close()


def test_a_version_1_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = ModelStore(path, target_version=1)
    assert old.schema_version == 1
    old.close()
    record = _record("legacy", state=common_pb2.MODEL_STATE_UNHEALTHY, version="3", traffic_weight=0.5)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO models (name, record) VALUES (?, ?)", ("legacy", record.SerializeToString()))

    with ModelStore(path) as store:
        assert store.migrated_from == 1
        assert store.schema_version == SCHEMA_VERSION == 3
        assert store.get("legacy") == record
        assert store.columns("legacy") == (common_pb2.MODEL_STATE_UNHEALTHY, "3", 0.5)
        assert store.names_in_state(common_pb2.MODEL_STATE_UNHEALTHY) == ["legacy"]
    with sqlite3.connect(path) as db:
        versions = [row[0] for row in db.execute("SELECT version FROM schema_version ORDER BY version")]
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert versions == [1, 2, 3]
    assert mode == "wal"


def test_a_newer_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    ModelStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version (version, applied_at) VALUES (99, 0)")
    with pytest.raises(RuntimeError, match="newer than this code knows"):
        ModelStore(path)


async def test_register_keeps_learned_quality_and_stats(tmp_path: Path) -> None:
    registry = Registry(ModelStore(tmp_path / "r.sqlite"))
    prior = registry_pb2.QualityEstimate(
        task=common_pb2.TASK_TYPE_MATH, complexity=common_pb2.COMPLEXITY_LOW, quality=0.9
    )
    registry.register(_record("m", quality=[prior]))
    registry.report(
        [
            registry_pb2.Outcome(
                model="m",
                success=True,
                time_to_first_token_ms=50.0,
                total_ms=60.0,
                task=common_pb2.TASK_TYPE_MATH,
                complexity=common_pb2.COMPLEXITY_LOW,
                quality=0.0,
            )
        ]
    )
    learned = registry.get("m")
    assert [(q.quality, q.observations) for q in learned.quality] == [(0.0, 1)]

    # Re-declaring the model (as a seed file does at every start) changes declared fields only.
    other = registry_pb2.QualityEstimate(
        task=common_pb2.TASK_TYPE_CODE, complexity=common_pb2.COMPLEXITY_HIGH, quality=0.4
    )
    stored, added = registry.register(_record("m", price_in_per_mtok=0.5, quality=[prior, other]))
    assert not added
    assert stored.price_in_per_mtok == 0.5
    assert stored.stats.time_to_first_token.ewma_ms == learned.stats.time_to_first_token.ewma_ms
    slices = {(q.task, q.complexity): (q.quality, q.observations) for q in stored.quality}
    assert slices == {
        (common_pb2.TASK_TYPE_MATH, common_pb2.COMPLEXITY_LOW): (0.0, 1),
        (common_pb2.TASK_TYPE_CODE, common_pb2.COMPLEXITY_HIGH): (0.4, 0),
    }
    assert stored.state == common_pb2.MODEL_STATE_READY
    await registry.close()


async def test_validation_names_every_bad_field(tmp_path: Path) -> None:
    registry = Registry(ModelStore(":memory:"))
    bad = _record(
        "no spaces allowed",
        price_in_per_mtok=-1.0,
        traffic_weight=1.5,
        quality=[registry_pb2.QualityEstimate(quality=2.0)],
    )
    with pytest.raises(InvalidArgument) as caught:
        registry.register(bad)
    fields = sorted(v.field for v in caught.value.violations)
    assert fields == ["model.name", "model.price_in_per_mtok", "model.quality[0].quality", "model.traffic_weight"]
    with pytest.raises(NotFound, match="known: none"):
        registry.get("missing")
    await registry.close()
