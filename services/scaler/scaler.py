"""The scaler's control loop: every ``interval_s`` it asks the policy for a decision per model and hands
non-hold decisions to the actuator (unless in dry-run); and it loads a model at zero replicas when a request
for it arrives (:meth:`Scaler.ensure_ready`), one load per burst. No gRPC here.

Each decision is logged, counted (``constellation_scaler_decisions_total``), recorded as a span
(``scaler.decide``, applied ones only) and kept as the model's latest for ``GetStatus``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from constellation.metrics import REGISTRY
from services.scaler.actuators import Actuator
from services.scaler.policy import Decision, ScalingPolicy
from services.scaler.reporting import NoReports, StateReporter
from services.scaler.sources import ArrivalWindow

log = logging.getLogger(__name__)
tracer = trace.get_tracer("constellation.scaler")

DECISIONS = Counter(
    "constellation_scaler_decisions_total",
    "Scaling decisions by model, action and whether they were applied (false: hold, dry-run or failed).",
    ["model", "action", "applied"],
    registry=REGISTRY,
)
REPLICAS = Gauge("constellation_scaler_replicas", "Replicas the actuator reports.", ["model"], registry=REGISTRY)
TARGET = Gauge("constellation_scaler_target_replicas", "Replicas the scaler wants.", ["model"], registry=REGISTRY)
COLD_STARTS = Counter(
    "constellation_scaler_cold_starts_total",
    "Loads from zero replicas for a waiting request.",
    ["model"],
    registry=REGISTRY,
)

LOAD_SECONDS = Histogram(
    "constellation_scaler_load_seconds",
    "Measured time of a load from zero replicas to ready.",
    ["model"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
    registry=REGISTRY,
)


@dataclass
class ModelCapacity:
    """What the scaler knows of one model."""

    model: str
    replicas: int = 0
    target: int = 0
    last: Decision | None = None
    applied: bool = False


@dataclass(frozen=True)
class Readiness:
    """The answer of :meth:`Scaler.ensure_ready`."""

    replicas: int
    cold_start: bool
    waited_s: float


@dataclass
class _Lane:
    """Serialises actuation of one model; ``loading`` is the shared load from zero while one runs."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loading: asyncio.Task[tuple[int, bool]] | None = None


class Scaler:
    """Decides and applies replicas for a set of models. Use from one event loop.

    Args:
        policy: Decides replicas (its demand source should be ``arrivals``).
        actuator: Carries decisions out.
        arrivals: Where :meth:`record_arrivals` and :meth:`ensure_ready` count requests.
        models: Models managed from the start; a model that gets an arrival joins.
        interval_s: Seconds between two rounds of decisions in :meth:`run`.
        dry_run: Decide and report, but do not apply (``ensure_ready`` still loads: a request waits).
        states: Where capacity changes go (COLD before an unload to zero, LOADING then READY with the
            measured load time around a load from zero); nowhere by default.
    """

    def __init__(
        self,
        policy: ScalingPolicy,
        actuator: Actuator,
        arrivals: ArrivalWindow,
        models: Sequence[str] = (),
        *,
        interval_s: float = 5.0,
        dry_run: bool = False,
        states: StateReporter | None = None,
    ) -> None:
        self.policy = policy
        self.states: StateReporter = states or NoReports()
        self.actuator = actuator
        self.arrivals = arrivals
        self.interval_s = interval_s
        self.dry_run = dry_run
        self.capacity: dict[str, ModelCapacity] = {m: ModelCapacity(m) for m in models}
        self._lanes: dict[str, _Lane] = {}

    def _lane(self, model: str) -> _Lane:
        self.capacity.setdefault(model, ModelCapacity(model))
        return self._lanes.setdefault(model, _Lane())

    def record_arrivals(self, model: str, count: int = 1) -> None:
        """Counts ``count`` requests sent to ``model`` now (a fan-out reports one per member)."""
        self._lane(model)
        self.arrivals.record(model, count)

    async def tick(self) -> list[Decision]:
        """One round: a decision per managed model, applied unless dry-run. A model whose actuator fails is
        logged and skipped, and so is a model being loaded for a waiting request (next round); the others
        still get their decision."""
        decisions = []
        for model in sorted(self.capacity):
            if self._lane(model).loading is not None:
                continue
            try:
                decisions.append(await self._decide_and_apply(model))
            except Exception as exc:  # one model's failure must not stop the round
                log.warning("scaler: %s: %s", model, exc)
        return decisions

    async def _decide_and_apply(self, model: str) -> Decision:
        lane = self._lane(model)
        async with lane.lock:
            current = await self.actuator.replicas(model)
            decision = self.policy.decide(model, current)
            applied = decision.action != "hold" and not self.dry_run
            if applied:
                with tracer.start_as_current_span("scaler.decide") as span:
                    span.set_attributes(_attributes(decision))
                    await self._apply(decision)
            self._note(decision, applied, decision.target if applied else current)
        if decision.action != "hold":
            log.info(
                "scaler: %s %s %d -> %d%s: %s",
                model,
                decision.action,
                decision.current,
                decision.target,
                "" if applied else " (dry-run)",
                decision.reason,
            )
        return decision

    def _note(self, decision: Decision, applied: bool, replicas: int) -> None:
        capacity = self.capacity[decision.model]
        capacity.last, capacity.applied = decision, applied
        capacity.replicas, capacity.target = replicas, decision.target
        DECISIONS.labels(decision.model, decision.action, str(applied).lower()).inc()
        REPLICAS.labels(decision.model).set(replicas)
        TARGET.labels(decision.model).set(decision.target)

    async def ensure_ready(self, model: str) -> Readiness:
        """Returns once ``model`` has a ready replica, loading it from zero if needed; counts one arrival.

        Concurrent calls for a model at zero share one load (a burst triggers one load, not one per
        request). Cancelling a caller does not cancel the shared load.

        Raises:
            constellation.errors.ConstellationError: the load failed (every waiting caller gets it).
        """
        started = time.monotonic()
        self.record_arrivals(model)
        lane = self._lane(model)
        if lane.loading is None:
            if not lane.lock.locked():
                replicas = await self.actuator.replicas(model)
                if replicas > 0:
                    return Readiness(replicas, False, time.monotonic() - started)
            if lane.loading is None:
                lane.loading = asyncio.ensure_future(self._load_from_zero(model, lane))
        replicas, cold = await asyncio.shield(lane.loading)
        return Readiness(replicas, cold, time.monotonic() - started)

    async def _load_from_zero(self, model: str, lane: _Lane) -> tuple[int, bool]:
        """Loads ``model`` unless a change made while waiting for its lane already did; (replicas, loaded)."""
        try:
            async with lane.lock:
                current = await self.actuator.replicas(model)
                if current > 0:
                    return current, False
                decision = self.policy.decide(model, 0)
                target = max(1, decision.target)
                COLD_STARTS.labels(model).inc()
                log.info("scaler: %s is at zero and a request waits: loading %d replica(s)", model, target)
                with tracer.start_as_current_span("scaler.cold_start") as span:
                    span.set_attributes(_attributes(decision))
                    await self._load(model, target)
                self._note(decision, True, target)
                return target, True
        finally:
            lane.loading = None

    async def _apply(self, decision: Decision) -> None:
        """Scales to ``decision.target``, telling the registry: COLD before going to zero (so routing stops
        sending work there first), the measured load around a scale from zero, the replicas otherwise."""
        model, target = decision.model, decision.target
        if decision.current == 0 and target > 0:
            await self._load(model, target)
            return
        if target == 0:
            await self.states.report(model, "cold")
        await self.actuator.scale(model, target)
        if target > 0:
            await self.states.report(model, "ready", replicas=target)

    async def _load(self, model: str, target: int) -> None:
        """Loads ``model`` from zero to ``target`` replicas, measuring how long it takes (the load time that
        routing adds to a cold model's latency). A failed load reports the model COLD again and raises."""
        await self.states.report(model, "loading")
        started = time.monotonic()
        try:
            await self.actuator.scale(model, target)
        except BaseException:
            await self.states.report(model, "cold")
            raise
        elapsed = time.monotonic() - started
        LOAD_SECONDS.labels(model).observe(elapsed)
        await self.states.report(model, "ready", load_time_s=elapsed, replicas=target)

    async def run(self) -> None:
        """Runs :meth:`tick` every ``interval_s`` until cancelled."""
        while True:
            await self.tick()
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        """Waits for a load in flight (so no Triton call is left half done), then closes the actuator."""
        for lane in list(self._lanes.values()):
            if lane.loading is not None:
                with contextlib.suppress(Exception):
                    await lane.loading
        await self.actuator.close()


def _attributes(decision: Decision) -> dict[str, str | int | float]:
    return {
        "constellation.model": decision.model,
        "constellation.scaler.action": decision.action,
        "constellation.scaler.current": decision.current,
        "constellation.scaler.target": decision.target,
        "constellation.scaler.rate_per_s": decision.rate_per_s,
        "constellation.scaler.latency_s": decision.latency_s,
        "constellation.scaler.reason": decision.reason,
    }
