"""The model pool as the registry keeps it: records, their live statistics, health, and watchers.

:class:`Registry` is the domain core behind RegistryService; it knows nothing of gRPC. It holds every
record in memory (reads never touch the disk) and writes each change through to a
:class:`~services.registry.store.ModelStore`. Changes are published to watchers, each with its own
bounded queue: a watcher that falls ``watch_queue_max`` changes behind is dropped (its next read
raises ``ResourceExhausted``) so that no subscriber can hold the registry up. Changes that touch only
statistics are coalesced to at most one UPDATED per model per ``coalesce_s``; everything else
(registration, removal, a state change) is published at once.

Concurrency: every method runs on the event loop thread; none awaits while it changes state, so each
change and its publication are atomic with respect to other calls.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

from constellation.errors import FieldViolation, InvalidArgument, NotFound, ResourceExhausted
from constellation.tasks import BackgroundTask
from constellation.v1 import common_pb2, registry_pb2
from services.registry.health import HealthPolicy
from services.registry.stats import ModelStats, StatsSettings
from services.registry.store import ModelStore
from services.registry.validation import sanitize_record, validate_outcomes, validate_record

log = logging.getLogger(__name__)

Change = registry_pb2.WatchModelsResponse.Change
SNAPSHOT = registry_pb2.WatchModelsResponse.CHANGE_SNAPSHOT
ADDED = registry_pb2.WatchModelsResponse.CHANGE_ADDED
UPDATED = registry_pb2.WatchModelsResponse.CHANGE_UPDATED
REMOVED = registry_pb2.WatchModelsResponse.CHANGE_REMOVED

READY = common_pb2.MODEL_STATE_READY
LOADING = common_pb2.MODEL_STATE_LOADING
UNHEALTHY = common_pb2.MODEL_STATE_UNHEALTHY
COLD = common_pb2.MODEL_STATE_COLD
CAPACITY_STATES = (COLD, LOADING, READY)
"""The states the scaler reports (READY is WARM: at least one replica serves)."""
LOAD_TIME_ALPHA = 0.5
"""Weight of the newest measured load in the load-time mean (loads are few, and the latest says most)."""

ChangeListener = Callable[[int, registry_pb2.ModelRecord], None]
"""Called with ``(change, record)`` for every published change; must not block or raise."""


def _keep_capacity(record: registry_pb2.ModelRecord, existing: registry_pb2.ModelRecord) -> None:
    """Keeps what the registry measured of capacity (load time, replicas) across a re-registration; a
    declared load time (a prior, with nothing measured yet) is taken as given."""
    if existing.loads_measured or not record.load_time_ms:
        record.load_time_ms = existing.load_time_ms
        record.loads_measured = existing.loads_measured
    record.replicas = existing.replicas
    record.state_since.CopyFrom(existing.state_since)


def _copy(record: registry_pb2.ModelRecord) -> registry_pb2.ModelRecord:
    clone = registry_pb2.ModelRecord()
    clone.CopyFrom(record)
    return clone


@dataclass(frozen=True)
class RegistrySettings:
    """Behaviour of a :class:`Registry`.

    Attributes:
        stats: Statistics windows and EWMA weight.
        health: Thresholds that turn a model unhealthy from its outcomes.
        coalesce_s: Least time between two statistics-only UPDATED changes of one model, in seconds.
        watch_queue_max: Changes a watcher may fall behind before it is dropped.
        min_unhealthy_s: Least time a model stays UNHEALTHY before a ready probe may bring it back, in
            seconds (a model that fails calls while Triton calls it ready must not flap).
    """

    stats: StatsSettings = field(default_factory=StatsSettings)
    health: HealthPolicy = field(default_factory=HealthPolicy)
    coalesce_s: float = 0.5
    watch_queue_max: int = 1024
    min_unhealthy_s: float = 5.0


class Watcher:
    """One subscriber's queue of changes. Read it with :meth:`next`."""

    def __init__(self, limit: int):
        # One slot more than the limit, so the drop marker always fits.
        self._queue: asyncio.Queue[tuple[int, registry_pb2.ModelRecord] | None] = asyncio.Queue(limit + 1)
        self.limit = limit
        self.dropped = False

    def offer(self, change: int, record: registry_pb2.ModelRecord) -> bool:
        """Queues a change without waiting; False (and the watcher is dropped) when it is ``limit`` behind."""
        if self.dropped:
            return False
        if self._queue.qsize() >= self.limit:
            self.dropped = True
            self._queue.put_nowait(None)
            return False
        self._queue.put_nowait((change, record))
        return True

    async def next(self) -> tuple[int, registry_pb2.ModelRecord]:
        """The next change, waiting for one.

        Raises:
            ResourceExhausted: the watcher fell too far behind and was dropped; start a new watch.
        """
        item = await self._queue.get()
        if item is None:
            raise ResourceExhausted(
                f"the watcher fell {self.limit} changes behind and was dropped; watch again for a fresh snapshot",
                reason="WATCHER_TOO_SLOW",
            )
        return item


class Registry:
    """The pool of model records (see the module doc).

    Args:
        store: Where records persist; records already in it are loaded.
        settings: Statistics, health and watch behaviour.
        clock: Wall-clock time in seconds (``time.time``), for ``stats.updated_at``.
    """

    def __init__(
        self,
        store: ModelStore,
        settings: RegistrySettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.settings = settings or RegistrySettings()
        self.clock = clock
        self.records: dict[str, registry_pb2.ModelRecord] = {}
        self.stats: dict[str, ModelStats] = {}
        self._unhealthy_since: dict[str, float] = {}
        self._watchers: set[Watcher] = set()
        self._listeners: list[ChangeListener] = []
        self._pending: set[str] = set()
        self._flusher = BackgroundTask("registry-coalesce")
        for record in self._load(store):
            self.records[record.name] = record
            self.stats[record.name] = ModelStats(self.settings.stats, record)
            if record.state == UNHEALTHY:
                self._unhealthy_since[record.name] = 0.0

    @staticmethod
    def _load(store: ModelStore) -> list[registry_pb2.ModelRecord]:
        """The stored records, each brought within today's limits (files from older versions may hold
        NaN statistics, out-of-range quality or oversized lists); repaired records are written back."""
        records, repaired = [], []
        for stored in store.all():
            record, changed = sanitize_record(stored)
            records.append(record)
            if changed:
                repaired.append(record)
        if repaired:
            log.warning(
                "repaired %d stored records that broke the registry's limits: %s",
                len(repaired),
                ", ".join(r.name for r in repaired[:10]),
            )
            store.put(repaired)
        return records

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the task that publishes coalesced statistics updates. Needs a running loop."""
        self._flusher.start(self._flush_loop())

    async def close(self) -> None:
        """Publishes pending updates, stops the background task and closes the store."""
        await self._flusher.stop()
        self.flush_pending()
        self.store.close()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.coalesce_s)
            self.flush_pending()

    def flush_pending(self) -> None:
        """Publishes one UPDATED for each model whose statistics changed since the last one."""
        pending, self._pending = self._pending, set()
        for name in sorted(pending):
            record = self.records.get(name)
            if record is not None:
                self._publish(UPDATED, record)

    # -- publication ---------------------------------------------------------------------------------

    def add_listener(self, listener: ChangeListener) -> None:
        """Calls ``listener`` for every change from now on (the Consul mirror uses this)."""
        self._listeners.append(listener)

    def _publish(self, change: int, record: registry_pb2.ModelRecord) -> None:
        self._pending.discard(record.name)
        shared = _copy(record)
        for watcher in list(self._watchers):
            if not watcher.offer(change, shared):
                self._watchers.discard(watcher)
                log.warning("dropped a watcher %d changes behind", watcher.limit)
        for listener in self._listeners:
            try:
                listener(change, shared)
            except Exception:
                log.exception("change listener failed")

    @contextmanager
    def watch(self) -> Iterator[tuple[list[registry_pb2.ModelRecord], Watcher]]:
        """Subscribes to changes: yields ``(snapshot, watcher)``, the records now and every change after.

        Nothing can happen between the snapshot and the subscription. The watcher is removed on exit.
        """
        watcher = Watcher(self.settings.watch_queue_max)
        snapshot = [_copy(self.records[name]) for name in sorted(self.records)]
        self._watchers.add(watcher)
        try:
            yield snapshot, watcher
        finally:
            self._watchers.discard(watcher)

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    # -- records -------------------------------------------------------------------------------------

    def register(self, incoming: registry_pb2.ModelRecord) -> tuple[registry_pb2.ModelRecord, bool]:
        """Adds or replaces a record; idempotent for the same record.

        Declared fields come from ``incoming``. Learned data is kept: live statistics always, and
        quality estimates for every slice already observed (``incoming.quality`` only seeds the others).
        ``state`` UNSPECIFIED keeps the current state (READY for a new model).

        Returns:
            The stored record and whether it was new.

        Raises:
            InvalidArgument: a declared field is out of range (see :func:`validate_record`).
        """
        validate_record(incoming)
        name = incoming.name
        existing = self.records.get(name)
        record = _copy(incoming)
        stats = self.stats.get(name) or ModelStats(self.settings.stats)
        stats.seed_quality(list(incoming.quality))
        if existing is not None:
            record.stats.CopyFrom(existing.stats)
            _keep_capacity(record, existing)
        if record.state == common_pb2.MODEL_STATE_UNSPECIFIED:
            record.state = existing.state if existing is not None else READY
        stats.write_to(record, now=self.clock())
        if existing is not None:
            record.stats.updated_at.CopyFrom(existing.stats.updated_at)
            if existing.SerializeToString(deterministic=True) == record.SerializeToString(deterministic=True):
                return _copy(existing), False
        if record.state == UNHEALTHY:
            self._unhealthy_since.setdefault(name, time.monotonic())
        else:
            self._unhealthy_since.pop(name, None)
            if existing is not None and existing.state == UNHEALTHY:
                stats.reset_errors()
        self.store.put([record])
        self.records[name] = record
        self.stats[name] = stats
        self._publish(ADDED if existing is None else UPDATED, record)
        return _copy(record), existing is None

    def deregister(self, name: str) -> registry_pb2.ModelRecord:
        """Removes a record and returns it.

        Raises:
            NotFound: no model has that name.
        """
        record = self.get(name)
        self.store.delete(name)
        del self.records[name]
        self.stats.pop(name, None)
        self._unhealthy_since.pop(name, None)
        self._pending.discard(name)
        self._publish(REMOVED, record)
        return record

    def get(self, name: str) -> registry_pb2.ModelRecord:
        """One record (a copy).

        Raises:
            NotFound: no model has that name; the message lists the known ones.
        """
        record = self.records.get(name)
        if record is None:
            known = ", ".join(sorted(self.records)) or "none"
            raise NotFound(f"no model {name!r} in the registry; known: {known}", metadata={"model": name})
        return _copy(record)

    def list(self, state: int = 0, required_capabilities: Sequence[str] = ()) -> list[registry_pb2.ModelRecord]:
        """Records by name that are in ``state`` (0: any) and have every one of ``required_capabilities``."""
        wanted = set(required_capabilities)
        return [
            _copy(record)
            for name, record in sorted(self.records.items())
            if (not state or record.state == state) and wanted <= set(record.capabilities)
        ]

    # -- outcomes and health -------------------------------------------------------------------------

    def report(self, outcomes: Sequence[registry_pb2.Outcome]) -> int:
        """Folds a batch of call outcomes into the statistics and persists the touched records.

        The batch is checked whole first (see :mod:`services.registry.validation`): one out-of-range
        value rejects it and nothing is recorded. Outcomes of unknown models (just removed, or not yet
        registered) are not counted, never an error. A model whose outcomes cross the health thresholds
        turns UNHEALTHY at once.

        Returns:
            How many outcomes were accepted.

        Raises:
            InvalidArgument: an outcome breaks a limit; each bad field is named ``outcomes[i].<field>``.
        """
        validate_outcomes(outcomes)
        accepted = 0
        touched: dict[str, bool] = {}
        for outcome in outcomes:
            stats = self.stats.get(outcome.model)
            if stats is None:
                continue
            stats.observe(outcome)
            accepted += 1
            touched.setdefault(outcome.model, False)
            record = self.records[outcome.model]
            if record.state == READY and self.settings.health.unhealthy(stats):
                record.state = UNHEALTHY
                self._unhealthy_since[outcome.model] = time.monotonic()
                touched[outcome.model] = True
                log.warning(
                    "%s is unhealthy: error rate %.0f%% over %d calls, %d failures in a row",
                    outcome.model,
                    stats.error_rate * 100,
                    stats.recent_calls,
                    stats.consecutive_failures,
                )
        if not touched:
            return accepted
        now = self.clock()
        for name in touched:
            self.stats[name].write_to(self.records[name], now=now)
        self.store.put(self.records[name] for name in touched)
        for name, state_changed in touched.items():
            if state_changed:
                self._publish(UPDATED, self.records[name])
            else:
                self._pending.add(name)
        return accepted

    def served_by(self, name: str) -> builtins.list[str]:
        """Names of the records ``name`` stands for: the record of that name, else every record whose
        backend serves it under that model name (a Triton model serving several pool models)."""
        if name in self.records:
            return [name]
        return sorted(n for n, r in self.records.items() if r.backend.model_name == name)

    def set_state(
        self, name: str, state: int, *, load_time_ms: float = 0.0, replicas: int = 0
    ) -> builtins.list[registry_pb2.ModelRecord]:
        """Records a capacity change that the scaler reports: COLD, LOADING or READY (WARM).

        ``name`` is a record's name or a backend model name (every record it serves changes). A measured
        ``load_time_ms`` (a load from zero that just finished) is folded into each record's load-time mean.
        An UNHEALTHY model stays so on READY until a probe or registration clears it. Published at once (a
        state change), and idempotent: the same report again changes nothing.

        Returns:
            The records after the change, by name.

        Raises:
            NotFound: no record has that name or backend model name.
            InvalidArgument: ``state`` is not one of COLD, LOADING, READY, or the load time is negative.
        """
        problems = []
        if state not in CAPACITY_STATES:
            problems.append(
                FieldViolation("state", "must be MODEL_STATE_COLD, MODEL_STATE_LOADING or MODEL_STATE_READY")
            )
        if not load_time_ms >= 0:
            problems.append(FieldViolation("load_time_ms", "must be a number >= 0"))
        if problems:
            raise InvalidArgument("bad model state report", problems)
        names = self.served_by(name)
        if not names:
            self.get(name)  # NotFound, naming the known models
        return [self._set_state(self.records[n], state, load_time_ms, replicas) for n in names]

    def _set_state(
        self, record: registry_pb2.ModelRecord, state: int, load_time_ms: float, replicas: int
    ) -> registry_pb2.ModelRecord:
        before = record.SerializeToString(deterministic=True)
        if record.state != state and not (record.state == UNHEALTHY and state == READY):
            record.state = cast("common_pb2.ModelState.ValueType", state)
            record.state_since.FromNanoseconds(int(self.clock() * 1e9))
        if load_time_ms > 0:
            previous = record.load_time_ms
            record.load_time_ms = (
                LOAD_TIME_ALPHA * load_time_ms + (1 - LOAD_TIME_ALPHA) * previous
                if record.loads_measured
                else load_time_ms
            )
            record.loads_measured += 1
        record.replicas = 0 if state == COLD else max(replicas, 0)
        if record.SerializeToString(deterministic=True) != before:
            self.store.put([record])
            self._publish(UPDATED, record)
            state_name = common_pb2.ModelState.Name(record.state)
            log.info(
                "%s is %s (load %.0f ms, %d replicas)", record.name, state_name, record.load_time_ms, record.replicas
            )
        return _copy(record)

    def apply_probe(self, name: str, ready: bool) -> None:
        """Takes a readiness probe's answer for ``name``.

        Ready brings an UNHEALTHY model (after ``min_unhealthy_s``) or a LOADING one to READY and
        resets its error window; not ready turns a READY model UNHEALTHY. COLD models are left alone
        (scaled to zero is not a fault). Unknown names are ignored (the model was just removed).
        """
        record = self.records.get(name)
        if record is None:
            return
        if ready:
            if record.state == UNHEALTHY:
                since = self._unhealthy_since.get(name, 0.0)
                if time.monotonic() - since < self.settings.min_unhealthy_s:
                    return
            elif record.state != LOADING:
                return
            record.state = READY
            self._unhealthy_since.pop(name, None)
            self.stats[name].reset_errors()
            log.info("%s is ready again", name)
        else:
            if record.state != READY:
                return
            record.state = UNHEALTHY
            self._unhealthy_since[name] = time.monotonic()
            log.warning("%s is unhealthy: its backend says it is not ready or cannot be reached", name)
        self.stats[name].write_to(record, now=self.clock())
        self.store.put([record])
        self._publish(UPDATED, record)
