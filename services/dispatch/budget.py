"""Per-tenant limits at the front door: a daily cost budget and a token-bucket request rate.

A request first takes a token from its tenant's bucket (:meth:`TenantBudgets.admit`). Once planned, its
*predicted* cost (the plan's members' predicted costs) is reserved against the tenant's budget for the
UTC day (:meth:`TenantBudgets.reserve`): a reservation that would take spent + reserved past the budget
is refused. When the request ends, the reservation is settled with the *actual* cost (what the model
calls cost, which a fan-out or a cascade can make larger than predicted): the tenant is charged what
it used, never what was guessed. Refusals are RESOURCE_EXHAUSTED with ``QuotaFailure`` (which quota)
and ``RetryInfo`` (when a retry can pass: the next token, or the next UTC midnight).

Per-tenant metrics carry a bounded label set: tenants known from the key table (and ``default``, the
tenant of unauthenticated loopback use) by name, every other one as ``other``.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field

from constellation.errors import ResourceExhausted
from constellation.metrics import REGISTRY

TENANT_REQUESTS = Counter(
    "constellation_tenant_requests_total",
    "Requests per tenant, by outcome (admitted, rate_limited, over_budget).",
    ["tenant", "outcome"],
    registry=REGISTRY,
)
TENANT_COST = Counter(
    "constellation_tenant_cost_usd_total", "Actual cost charged per tenant, in USD.", ["tenant"], registry=REGISTRY
)
TENANT_TOKENS = Counter(
    "constellation_tenant_tokens_total",
    "Tokens per tenant, by kind (input, output).",
    ["tenant", "kind"],
    registry=REGISTRY,
)
OTHER = "other"


class BudgetSettings(BaseModel):
    """Limits per tenant (``[dispatch.budgets]``).

    Attributes:
        daily_usd: Cost budget of each tenant per UTC day; 0: unlimited.
        tenant_daily_usd: Budgets of named tenants, over ``daily_usd``.
        rate_per_s: Requests per second each tenant may sustain; 0: unlimited.
        burst: Requests a tenant may make at once (the bucket's size).
    """

    model_config = ConfigDict(extra="forbid")

    daily_usd: float = Field(default=0.0, ge=0)
    tenant_daily_usd: dict[str, float] = Field(default_factory=dict)
    rate_per_s: float = Field(default=0.0, ge=0)
    burst: int = Field(default=10, ge=1)

    def budget_of(self, tenant: str) -> float:
        return self.tenant_daily_usd.get(tenant, self.daily_usd)


@dataclass
class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Takes one token; returns 0, or the seconds until one is available (nothing taken)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class _Day:
    date: datetime.date
    spent: float = 0.0
    reserved: float = 0.0


@dataclass
class Reservation:
    """Predicted cost held against a tenant's day until the request settles it."""

    tenant: str
    date: datetime.date
    predicted_usd: float
    settled: bool = field(default=False)


def _utc_now(clock: Callable[[], float]) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(clock(), datetime.UTC)


class TenantBudgets:
    """The limits of every tenant, in memory (one dispatch process; see the README for several).

    Not thread-safe: used from dispatch's event loop only.

    Args:
        settings: Budgets and rates.
        known_tenants: Tenants named in metrics (others are ``other``); called at most every 30 s.
        clock: Wall clock (days are UTC days); tests pass their own.
        monotonic: Clock of the token buckets.
    """

    def __init__(
        self,
        settings: BudgetSettings,
        known_tenants: Callable[[], Iterable[str]] = lambda: (),
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.known_tenants = known_tenants
        self.clock = clock
        self.monotonic = monotonic
        self._buckets: dict[str, TokenBucket] = {}
        self._days: dict[str, _Day] = {}
        self._labels: set[str] = {"default"}
        self._labels_at = -1e18

    def label(self, tenant: str) -> str:
        """``tenant`` when the key table knows it (or it is ``default``), else ``other``."""
        now = self.monotonic()
        if now - self._labels_at > 30.0:
            self._labels = {"default", *self.known_tenants()}
            self._labels_at = now
        return tenant if tenant in self._labels else OTHER

    def admit(self, tenant: str) -> None:
        """Takes one request from ``tenant``'s bucket. Raises ResourceExhausted when it is empty."""
        rate = self.settings.rate_per_s
        if rate <= 0:
            return
        now = self.monotonic()
        bucket = self._buckets.setdefault(tenant, TokenBucket(rate, self.settings.burst, self.settings.burst, now))
        wait = bucket.take(now)
        if wait > 0:
            TENANT_REQUESTS.labels(self.label(tenant), "rate_limited").inc()
            raise ResourceExhausted(
                f"tenant {tenant!r} is over its rate of {rate:g} requests/s; retry in {wait:.2f}s",
                retry_after_s=wait,
                quota=[(f"tenant:{tenant}", f"requests per second: {rate:g} (burst {self.settings.burst})")],
                reason="RATE_LIMITED",
                metadata={"tenant": tenant},
            )

    def _day(self, tenant: str) -> _Day:
        today = _utc_now(self.clock).date()
        day = self._days.get(tenant)
        if day is None or day.date != today:
            day = self._days[tenant] = _Day(today)
        return day

    def spent(self, tenant: str) -> float:
        """What ``tenant`` was charged today (UTC)."""
        return self._day(tenant).spent

    def reserve(self, tenant: str, predicted_usd: float) -> Reservation:
        """Holds ``predicted_usd`` against today's budget. Raises ResourceExhausted when it does not fit."""
        budget = self.settings.budget_of(tenant)
        day = self._day(tenant)
        if budget > 0 and day.spent + day.reserved + predicted_usd > budget:
            TENANT_REQUESTS.labels(self.label(tenant), "over_budget").inc()
            now = _utc_now(self.clock)
            midnight = datetime.datetime.combine(now.date() + datetime.timedelta(days=1), datetime.time(), datetime.UTC)
            raise ResourceExhausted(
                f"tenant {tenant!r} has ${day.spent:.6f} spent and ${day.reserved:.6f} in flight of its "
                f"${budget:g} daily budget; this request is predicted to cost ${predicted_usd:.6f}",
                retry_after_s=(midnight - now).total_seconds(),
                quota=[(f"tenant:{tenant}", f"daily cost budget: ${budget:g} (UTC day)")],
                reason="BUDGET_EXHAUSTED",
                metadata={"tenant": tenant},
            )
        day.reserved += predicted_usd
        TENANT_REQUESTS.labels(self.label(tenant), "admitted").inc()
        return Reservation(tenant, day.date, predicted_usd)

    def settle(
        self, reservation: Reservation, actual_usd: float, input_tokens: int = 0, output_tokens: int = 0
    ) -> None:
        """Releases the reservation and charges the actual cost (once; later calls do nothing)."""
        if reservation.settled:
            return
        reservation.settled = True
        day = self._day(reservation.tenant)
        if day.date == reservation.date:
            day.reserved = max(0.0, day.reserved - reservation.predicted_usd)
        day.spent += actual_usd
        label = self.label(reservation.tenant)
        TENANT_COST.labels(label).inc(actual_usd)
        TENANT_TOKENS.labels(label, "input").inc(input_tokens)
        TENANT_TOKENS.labels(label, "output").inc(output_tokens)
