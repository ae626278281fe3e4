"""Durable span storage in SQLite, in the shape the analyzer reads.

One row per span. Writes are batched in one transaction per OTLP export; the database runs in WAL
mode so the analyzer can read while the collector writes. The schema is versioned with
``PRAGMA user_version``; :meth:`SpanStore.open` migrates older files forward.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

SCHEMA_VERSION = 1
_MIGRATIONS = {
    1: """
    CREATE TABLE IF NOT EXISTS spans (
        trace_id TEXT NOT NULL,
        span_id TEXT NOT NULL,
        parent_span_id TEXT NOT NULL,
        name TEXT NOT NULL,
        kind INTEGER NOT NULL,
        service TEXT NOT NULL,
        start_ns INTEGER NOT NULL,
        end_ns INTEGER NOT NULL,
        status_code INTEGER NOT NULL,
        attributes TEXT NOT NULL,
        events TEXT NOT NULL,
        PRIMARY KEY (trace_id, span_id)
    );
    CREATE INDEX IF NOT EXISTS spans_by_start ON spans (start_ns);
    """,
}


@dataclass
class SpanRow:
    """One stored span. Times in nanoseconds since the epoch; ids in lower-case hex."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    service: str
    start_ns: int
    end_ns: int
    status_code: int
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    def event_ns(self, name: str) -> int | None:
        for event in self.events:
            if event.get("name") == name:
                return int(event["time_ns"])
        return None


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def _attributes(pairs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


def rows_from_otlp(resource_spans: Iterable[trace_pb2.ResourceSpans]) -> list[SpanRow]:
    """Flattens an OTLP export request's spans into rows."""
    rows = []
    for resource in resource_spans:
        service = str(_attributes(resource.resource.attributes).get("service.name", "unknown"))
        for scope in resource.scope_spans:
            for span in scope.spans:
                rows.append(
                    SpanRow(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=int(span.kind),
                        service=service,
                        start_ns=int(span.start_time_unix_nano),
                        end_ns=int(span.end_time_unix_nano),
                        status_code=int(span.status.code),
                        attributes=_attributes(span.attributes),
                        events=[
                            {"name": e.name, "time_ns": int(e.time_unix_nano), **_attributes(e.attributes)}
                            for e in span.events
                        ],
                    )
                )
    return rows


class SpanStore:
    """A SQLite file of spans. Thread-safe: one connection guarded by a lock."""

    def __init__(self, connection: sqlite3.Connection):
        self._db = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path | str) -> SpanStore:
        """Opens (creating and migrating as needed) the store at ``path``."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for target in range(version + 1, SCHEMA_VERSION + 1):
            db.executescript(_MIGRATIONS[target])
            db.execute(f"PRAGMA user_version={target}")
        return cls(db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, rows: Iterable[SpanRow]) -> int:
        """Stores ``rows`` in one transaction (a span seen twice is replaced); returns how many."""
        values = [
            (
                r.trace_id,
                r.span_id,
                r.parent_span_id,
                r.name,
                r.kind,
                r.service,
                r.start_ns,
                r.end_ns,
                r.status_code,
                json.dumps(r.attributes),
                json.dumps(r.events),
            )
            for r in rows
        ]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO spans VALUES (?,?,?,?,?,?,?,?,?,?,?)", values)
            self._db.execute("COMMIT")
        return len(values)

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM spans").fetchone()[0])

    def spans(self) -> Iterator[SpanRow]:
        """Every stored span, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM spans ORDER BY start_ns").fetchall()
        for row in rows:
            yield SpanRow(*row[:9], attributes=json.loads(row[9]), events=json.loads(row[10]))  # type: ignore[misc]
