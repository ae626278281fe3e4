"""How many replicas each model should have, and why: Little's law with a warm floor, scale-to-zero,
cooldowns and hysteresis. Plain domain code: no gRPC, no I/O, an injected clock.

Per model, over a telemetry window:

* ``in_system = arrival_rate x latency`` (Little's law: requests inside the model at once), where the arrival
  rate counts fan-out (a vote of five adds the query rate to each member; see
  :class:`services.scaler.sources.ArrivalWindow`) and the latency is one request's time in the model.
* ``raw = ceil(in_system / concurrency)``: replicas that serve it, each holding ``concurrency`` requests.
* ``wanted = clamp(raw, lower, max_replicas)`` where ``lower`` is the tier's warm floor
  (``min_replicas``), raised to 1 while the model saw an arrival within ``idle_to_zero_s``. After that much
  idle time ``wanted`` is the floor itself, whatever the (stale) window rate; so a model with a floor of 0
  goes to zero exactly then.
* Up is fast: to ``wanted`` at once (from zero with no cooldown at all; otherwise after ``up_cooldown_s``
  since the model's last change).
* Down is slow: to the highest of ``wanted`` over the last ``down_stabilization_s``, and of the replicas
  needed with a ``hysteresis`` margin (``ceil(in_system / (concurrency x (1 - hysteresis)))``), and only
  ``down_cooldown_s`` after the model's last change.

Every :class:`Decision` carries its figures and a reason in words.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

Action = Literal["hold", "scale_up", "scale_down", "scale_to_zero", "scale_from_zero"]
"""What a decision does to a model's replicas."""

Clock = Callable[[], float]
"""Monotonic seconds (``time.monotonic`` in service, a fake in tests)."""

DEFAULT_TIER = "default"


class Knobs(BaseModel):
    """The scaling settings of one tier (or one model).

    Attributes:
        concurrency: Requests one replica serves at once (a Triton model instance; for the replay model its
            ``max_concurrency`` parameter).
        min_replicas: The warm floor: replicas kept however idle the model is. 0 allows scale-to-zero.
        max_replicas: Never more than this.
        idle_to_zero_s: Seconds without an arrival after which a model with floor 0 goes to zero.
        window_s: Telemetry window the arrival rate is averaged over, in seconds.
        up_cooldown_s: Least seconds between a change and a following scale-up (from zero: none).
        down_cooldown_s: Least seconds between a change and a following scale-down.
        down_stabilization_s: A scale-down goes only as low as the highest replicas wanted over this many
            past seconds.
        hysteresis: Fraction of headroom a smaller replica count must leave before it is chosen, in [0, 1).
        default_latency_s: Latency of one request when no live statistic is known, in seconds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    concurrency: float = Field(default=1.0, gt=0.0)
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    idle_to_zero_s: float = Field(default=300.0, ge=0.0)
    window_s: float = Field(default=60.0, gt=0.0)
    up_cooldown_s: float = Field(default=5.0, ge=0.0)
    down_cooldown_s: float = Field(default=60.0, ge=0.0)
    down_stabilization_s: float = Field(default=120.0, ge=0.0)
    hysteresis: float = Field(default=0.1, ge=0.0, lt=1.0)
    default_latency_s: float = Field(default=1.0, gt=0.0)


class DemandSource(Protocol):
    """Arrivals per model (fan-out counted)."""

    def rate(self, model: str, window_s: float, now: float) -> float:
        """Requests per second to ``model`` over the ``window_s`` seconds before ``now``."""
        ...

    def last_arrival(self, model: str) -> float | None:
        """Clock time of the latest arrival to ``model``; None when none was seen."""
        ...


class LatencySource(Protocol):
    """How long one request stays in a model."""

    def latency_s(self, model: str) -> float | None:
        """Seconds one request holds a replica slot; None when unknown."""
        ...


@dataclass(frozen=True)
class Decision:
    """One decision for one model. ``target == current`` on hold."""

    model: str
    tier: str
    current: int
    target: int
    raw: int
    action: Action
    reason: str
    rate_per_s: float
    latency_s: float
    at: float


@dataclass
class _History:
    first_seen: float
    last_change: float = -math.inf
    wanted: deque[tuple[float, int]] = field(default_factory=deque)


@dataclass(frozen=True)
class _Load:
    rate: float
    latency: float
    in_system: float
    raw: int
    wanted: int
    lower: int
    idle_s: float


class ScalingPolicy:
    """Decides replicas per model. Not thread-safe: call from one event loop.

    Decisions are stateful (cooldowns, the stabilization window): :meth:`decide` assumes a non-hold
    decision is carried out (or, in dry-run, would have been) and starts the model's cooldown.

    Args:
        tiers: Knobs per tier name; a missing ``"default"`` tier gets :class:`Knobs` defaults.
        model_tiers: Tier of each model; other models are in ``"default"``.
        model_knobs: Knobs of single models, replacing their tier's.
        demand: Arrival rates.
        latency: Per-request latency.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        *,
        demand: DemandSource,
        latency: LatencySource,
        clock: Clock,
        tiers: Mapping[str, Knobs] | None = None,
        model_tiers: Mapping[str, str] | None = None,
        model_knobs: Mapping[str, Knobs] | None = None,
    ) -> None:
        self.tiers = {DEFAULT_TIER: Knobs(), **(tiers or {})}
        self.model_tiers = dict(model_tiers or {})
        self.model_knobs = dict(model_knobs or {})
        self.demand = demand
        self.latency = latency
        self.clock = clock
        self._history: dict[str, _History] = {}

    def tier_of(self, model: str) -> str:
        return self.model_tiers.get(model, DEFAULT_TIER)

    def knobs_for(self, model: str) -> Knobs:
        """The model's own knobs, else its tier's, else the default tier's."""
        if model in self.model_knobs:
            return self.model_knobs[model]
        return self.tiers.get(self.tier_of(model), self.tiers[DEFAULT_TIER])

    def idle_s(self, model: str) -> float:
        """Seconds since the model's last arrival (or since the policy first saw it)."""
        last = self.demand.last_arrival(model)
        history = self._history_of(model)
        since = history.first_seen if last is None else max(last, history.first_seen)
        return self.clock() - since

    def decide_all(self, current: Mapping[str, int], models: Iterable[str] = ()) -> list[Decision]:
        """One decision per model of ``current`` (replicas now) plus ``models`` (taken as at 0)."""
        names = sorted(set(current) | set(models))
        return [self.decide(name, current.get(name, 0)) for name in names]

    def decide(self, model: str, current: int) -> Decision:
        """The decision for ``model`` at ``current`` replicas now; starts its cooldown unless it holds."""
        knobs = self.knobs_for(model)
        history = self._history_of(model)
        now = self.clock()
        load = self._load(model, knobs, now)
        history.wanted.append((now, load.wanted))
        while history.wanted and history.wanted[0][0] < now - knobs.down_stabilization_s:
            history.wanted.popleft()
        action, target, why = self._step(knobs, history, load, current, now)
        if action != "hold":
            history.last_change = now
        reason = (
            f"{load.rate:.3g} req/s x {load.latency:.3g} s = {load.in_system:.3g} in flight / "
            f"{knobs.concurrency:g} per replica -> {load.raw}; floor {load.lower}, max {knobs.max_replicas} "
            f"-> want {load.wanted}; {why}"
        )
        return Decision(
            model, self.tier_of(model), current, target, load.raw, action, reason, load.rate, load.latency, now
        )

    def _history_of(self, model: str) -> _History:
        if model not in self._history:
            self._history[model] = _History(first_seen=self.clock())
        return self._history[model]

    def _load(self, model: str, knobs: Knobs, now: float) -> _Load:
        rate = self.demand.rate(model, knobs.window_s, now)
        latency = self.latency.latency_s(model) or knobs.default_latency_s
        in_system = rate * latency
        raw = replicas_for(in_system, knobs.concurrency)
        idle = self.idle_s(model)
        if idle >= knobs.idle_to_zero_s:  # the window's rate is stale: no arrival for the idle timeout
            lower = wanted = min(knobs.min_replicas, knobs.max_replicas)
        else:
            lower = max(knobs.min_replicas, 1)
            wanted = min(max(raw, lower), knobs.max_replicas)
        return _Load(rate, latency, in_system, raw, wanted, lower, idle)

    def _step(self, knobs: Knobs, history: _History, load: _Load, current: int, now: float) -> tuple[Action, int, str]:
        since_change = now - history.last_change
        if load.wanted > current:
            if current == 0:
                return "scale_from_zero", load.wanted, "up from zero at once"
            if since_change < knobs.up_cooldown_s:
                return "hold", current, f"up cooldown ({since_change:.1f} of {knobs.up_cooldown_s:g} s)"
            return "scale_up", load.wanted, "up at once"
        if load.wanted == current:
            return "hold", current, "at target"
        if load.wanted == 0:
            return "scale_to_zero", 0, f"idle {load.idle_s:.0f} s >= {knobs.idle_to_zero_s:g} s, floor 0"
        stable = max(wanted for _, wanted in history.wanted)
        margin = replicas_for(load.in_system, knobs.concurrency * (1.0 - knobs.hysteresis))
        down_to = min(max(load.wanted, stable, margin), knobs.max_replicas)
        if down_to >= current:
            return (
                "hold",
                current,
                (
                    f"down held: {stable} wanted within {knobs.down_stabilization_s:g} s, "
                    f"{margin} with {knobs.hysteresis:.0%} headroom"
                ),
            )
        if since_change < knobs.down_cooldown_s:
            return "hold", current, f"down cooldown ({since_change:.1f} of {knobs.down_cooldown_s:g} s)"
        return "scale_down", down_to, "down after stabilization"


def replicas_for(in_system: float, concurrency: float) -> int:
    """``ceil(in_system / concurrency)``, 0 for no load; tolerant of float noise (2.0000000001 -> 2)."""
    if in_system <= 0.0:
        return 0
    return max(1, math.ceil(in_system / concurrency - 1e-9))
