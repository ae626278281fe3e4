"""Where the policy's figures come from: arrivals per model (:class:`ArrivalWindow`) and per-request latency
(:class:`FixedLatency`, :class:`RecordLatency` over the registry's live statistics).

These implement :class:`~services.scaler.policy.DemandSource` and :class:`~services.scaler.policy.LatencySource`;
dispatch's own queue figures or a Prometheus query can implement the same protocols later.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class ArrivalWindow:
    """Counts arrivals per model in a sliding window; a :class:`~services.scaler.policy.DemandSource`.

    A query fanned out to five models is five arrivals, one to each member (:meth:`record_fanout`). Keeps at
    most ``horizon_s`` seconds of history. Not thread-safe: use from one event loop.

    Args:
        clock: Monotonic seconds, the same clock the policy uses.
        horizon_s: History kept, in seconds (at least the longest telemetry window in use).
    """

    def __init__(self, clock: Callable[[], float], horizon_s: float = 600.0) -> None:
        self.clock = clock
        self.horizon_s = horizon_s
        self._arrivals: dict[str, deque[tuple[float, int]]] = {}
        self._last: dict[str, float] = {}

    def record(self, model: str, count: int = 1) -> None:
        """Adds ``count`` arrivals to ``model`` now."""
        now = self.clock()
        arrivals = self._arrivals.setdefault(model, deque())
        arrivals.append((now, max(1, count)))
        self._last[model] = now
        while arrivals and arrivals[0][0] < now - self.horizon_s:
            arrivals.popleft()

    def record_fanout(self, models: Iterable[str]) -> None:
        """One query sent to every model of ``models``: one arrival each."""
        for model in models:
            self.record(model)

    def rate(self, model: str, window_s: float, now: float) -> float:
        """Arrivals per second to ``model`` in ``(now - window_s, now]``."""
        arrivals = self._arrivals.get(model, ())
        total = sum(count for at, count in arrivals if now - window_s < at <= now)
        return total / window_s

    def last_arrival(self, model: str) -> float | None:
        return self._last.get(model)

    def models(self) -> list[str]:
        """Models that saw an arrival (within the horizon or before)."""
        return sorted(self._last)


class FixedLatency:
    """Known latencies in seconds per model; a :class:`~services.scaler.policy.LatencySource`."""

    def __init__(self, latencies: Mapping[str, float]) -> None:
        self.latencies = dict(latencies)

    def latency_s(self, model: str) -> float | None:
        return self.latencies.get(model)


class RecordLatency:
    """Latency from the registry's live statistics of each model record.

    A request holds its replica for ``TTFT + per_token x output_tokens``; both from the records' EWMA
    means (``stats.time_to_first_token.ewma_ms`` and ``stats.per_token.ewma_ms``). A record without
    statistics (both 0) gives None, so the policy falls back to its ``default_latency_s``.

    Args:
        records: Returns model name -> ``constellation.v1.ModelRecord`` as known now (for example
            ``lambda: view.models`` of a :class:`services.registry.client.RegistryView`, which replaces its
            mapping on every reconnection); called on every lookup.
        output_tokens: Typical answer length in tokens.
    """

    def __init__(self, records: Callable[[], Mapping[str, Any]], output_tokens: int = 128) -> None:
        self.records = records
        self.output_tokens = output_tokens

    def latency_s(self, model: str) -> float | None:
        record = self.records().get(model)
        if record is None:
            return None
        ttft_ms = float(record.stats.time_to_first_token.ewma_ms)
        per_token_ms = float(record.stats.per_token.ewma_ms)
        total_ms = ttft_ms + per_token_ms * self.output_tokens
        return total_ms / 1000.0 if total_ms > 0 else None
