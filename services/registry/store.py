"""The registry's durable store: one SQLite file holding every model record.

Each record is kept whole as a serialised ``ModelRecord`` (declared fields, learned quality estimates
and the persisted part of the live statistics), beside plain columns for what must be queryable:
name, state, version, traffic weight and load time. A ``schema_version`` table says which of :data:`MIGRATIONS`
have run; opening a file applies the missing ones in order, inside one transaction each.

Concurrency: a :class:`ModelStore` wraps one connection and is not thread-safe. The registry server
uses it from its event loop thread only. Every write is one short transaction on a WAL journal with
``synchronous=NORMAL`` (well under a millisecond for one record on a local disk), which is why it
is called inline rather than from an executor; several registry processes must not share one file.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from constellation.auth import StoredKey, row_to_key
from constellation.v1 import registry_pb2


@dataclass(frozen=True)
class Migration:
    """One forward step of the schema.

    Attributes:
        sql: Statements run with ``executescript`` semantics (separated by ``;``).
        backfill: Python run after ``sql`` in the same transaction, for data SQL cannot derive (such as
            columns read out of a serialised record). None when the SQL is enough.
    """

    sql: str
    backfill: Callable[[sqlite3.Connection], None] | None = None


def _backfill_columns(connection: sqlite3.Connection) -> None:
    rows = connection.execute("SELECT name, record FROM models").fetchall()
    for name, blob in rows:
        record = registry_pb2.ModelRecord.FromString(blob)
        connection.execute(
            "UPDATE models SET state = ?, version = ?, traffic_weight = ? WHERE name = ?",
            (record.state, record.version, record.traffic_weight, name),
        )


def _backfill_load_times(connection: sqlite3.Connection) -> None:
    for name, blob in connection.execute("SELECT name, record FROM models").fetchall():
        record = registry_pb2.ModelRecord.FromString(blob)
        connection.execute("UPDATE models SET load_time_ms = ? WHERE name = ?", (record.load_time_ms, name))


# Index i holds the step from schema version i to i + 1. Never edit a released step: append a new one.
MIGRATIONS: list[Migration] = [
    # 1: records as opaque blobs keyed by name.
    Migration("CREATE TABLE models (name TEXT PRIMARY KEY, record BLOB NOT NULL)"),
    # 2: queryable columns, filled from the blobs written by version 1.
    Migration(
        "ALTER TABLE models ADD COLUMN state INTEGER NOT NULL DEFAULT 0;"
        "ALTER TABLE models ADD COLUMN version TEXT NOT NULL DEFAULT '';"
        "ALTER TABLE models ADD COLUMN traffic_weight REAL NOT NULL DEFAULT 0;"
        "ALTER TABLE models ADD COLUMN updated_at REAL NOT NULL DEFAULT 0;"
        "CREATE INDEX models_by_state ON models (state)",
        _backfill_columns,
    ),
    # 3: API keys, stored as a salted SHA-256 of their secret (see constellation.auth for why).
    Migration(
        "CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, role TEXT NOT NULL, "
        "salt BLOB NOT NULL, digest BLOB NOT NULL, created_at REAL NOT NULL, revoked_at REAL)"
    ),
    # 4: the measured load time of each model (COLD / LOADING / READY capacity), filled from the blobs.
    Migration("ALTER TABLE models ADD COLUMN load_time_ms REAL NOT NULL DEFAULT 0", _backfill_load_times),
]
SCHEMA_VERSION = len(MIGRATIONS)


class ModelStore:
    """Model records in one SQLite file. Not thread-safe: use it from one thread (see the module doc).

    Args:
        path: The database file; its directory is created. ``":memory:"`` keeps nothing on disk.
        target_version: Migrate only up to this schema version (tests build old files with it).
    """

    def __init__(self, path: Path | str, *, target_version: int = SCHEMA_VERSION):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=2000")
        self.migrated_from = self._migrate(target_version)

    @property
    def schema_version(self) -> int:
        row = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def _migrate(self, target: int) -> int:
        self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at REAL)")
        start = self.schema_version
        if start > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {start}, newer than this code knows ({SCHEMA_VERSION}); "
                "upgrade Constellation or point the registry at another file"
            )
        for version in range(start, target):
            step = MIGRATIONS[version]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(None, (s.strip() for s in step.sql.split(";"))):
                    self._db.execute(statement)
                if step.backfill is not None:
                    step.backfill(self._db)
                self._db.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version + 1, time.time())
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return start

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ModelStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def put(self, records: Iterable[registry_pb2.ModelRecord]) -> None:
        """Inserts or replaces ``records`` in one transaction."""
        now = time.time()
        rows = [
            (r.name, r.SerializeToString(deterministic=True), r.state, r.version, r.traffic_weight, r.load_time_ms, now)
            for r in records
        ]
        if not rows:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT INTO models (name, record, state, version, traffic_weight, load_time_ms, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET record = excluded.record, "
                "state = excluded.state, version = excluded.version, traffic_weight = excluded.traffic_weight, "
                "load_time_ms = excluded.load_time_ms, updated_at = excluded.updated_at",
                rows,
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def delete(self, name: str) -> bool:
        """Removes one record; True when it existed."""
        cursor = self._db.execute("DELETE FROM models WHERE name = ?", (name,))
        return cursor.rowcount > 0

    def get(self, name: str) -> registry_pb2.ModelRecord | None:
        row = self._db.execute("SELECT record FROM models WHERE name = ?", (name,)).fetchone()
        return None if row is None else registry_pb2.ModelRecord.FromString(row[0])

    def all(self) -> list[registry_pb2.ModelRecord]:
        """Every record, by name."""
        rows = self._db.execute("SELECT record FROM models ORDER BY name").fetchall()
        return [registry_pb2.ModelRecord.FromString(row[0]) for row in rows]

    def names_in_state(self, state: int) -> list[str]:
        """Names of the records in ``state`` (a ``ModelState`` value), by name."""
        rows = self._db.execute("SELECT name FROM models WHERE state = ? ORDER BY name", (state,)).fetchall()
        return [str(row[0]) for row in rows]

    def load_time_ms(self, name: str) -> float | None:
        """The stored load time of one record (its queryable column), None when there is no such record."""
        row = self._db.execute("SELECT load_time_ms FROM models WHERE name = ?", (name,)).fetchone()
        return None if row is None else float(row[0])

    def columns(self, name: str) -> tuple[int, str, float] | None:
        """The queryable columns ``(state, version, traffic_weight)`` of one record."""
        row = self._db.execute("SELECT state, version, traffic_weight FROM models WHERE name = ?", (name,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]), float(row[2]))

    # API keys (constellation.auth reads the same table read-only from other services).

    def add_key(self, key: StoredKey) -> None:
        """Stores a new key's row (its salt and digest; the secret is never stored)."""
        self._db.execute(
            "INSERT INTO api_keys (key_id, tenant, role, salt, digest, created_at, revoked_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key.key_id, key.tenant, str(key.role), key.salt, key.digest, key.created_at, key.revoked_at),
        )

    def key(self, key_id: str) -> StoredKey | None:
        """One key's row, or None."""
        row = self._db.execute(
            "SELECT key_id, tenant, role, salt, digest, created_at, revoked_at FROM api_keys WHERE key_id = ?",
            (key_id,),
        ).fetchone()
        return None if row is None else row_to_key(row)

    def keys(self) -> list[StoredKey]:
        """Every key, oldest first, revoked ones included."""
        rows = self._db.execute(
            "SELECT key_id, tenant, role, salt, digest, created_at, revoked_at FROM api_keys ORDER BY created_at"
        ).fetchall()
        return [row_to_key(row) for row in rows]

    def revoke_key(self, key_id: str) -> StoredKey | None:
        """Marks a key revoked (kept for the audit trail); None when there is no such key."""
        self._db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (time.time(), key_id)
        )
        return self.key(key_id)

    def tenants(self) -> set[str]:
        """The tenants of the keys not revoked (the label set of per-tenant metrics)."""
        rows = self._db.execute("SELECT DISTINCT tenant FROM api_keys WHERE revoked_at IS NULL").fetchall()
        return {str(row[0]) for row in rows}
