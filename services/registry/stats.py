"""Live statistics of one model, learned from the outcomes dispatch reports.

Per model, :class:`ModelStats` keeps:

* time to first token and per-token latency ((total - ttft) / (output_tokens - 1)), each as an
  exponentially weighted mean and as p50/p95/p99 over the last ``window`` observations, in
  milliseconds;
* the error rate over the last ``error_window`` calls, and the run of consecutive failures;
* a running-mean quality estimate with its observation count per (task, complexity), when the
  outcome carries a quality.

The means and quality estimates round-trip through ``ModelRecord`` (so they survive a restart); the
windows and the failure run start empty after one.

Only finite samples enter a mean or a window: a NaN or infinite latency, a negative one, or a quality
outside [0, 1] is skipped (the registry rejects such outcomes before they get here; this is the last
line, and it also covers values restored from a record written by an older version). Every value
:meth:`ModelStats.write_to` produces is therefore finite. Plain Python, no locking: the registry calls it
from its event loop thread only.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from constellation.v1 import common_pb2, registry_pb2

TIMEOUT_CODE = "DEADLINE_EXCEEDED"
QualityKey = tuple[common_pb2.TaskType.ValueType, common_pb2.Complexity.ValueType]


@dataclass(frozen=True)
class StatsSettings:
    """How the statistics forget.

    Attributes:
        ewma_alpha: Weight of the newest observation in the exponentially weighted means, in (0, 1].
        window: Latency observations kept for the percentiles.
        error_window: Recent calls the error rate is computed over.
    """

    ewma_alpha: float = 0.1
    window: int = 512
    error_window: int = 20


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of an ascending list; 0 for an empty one."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def finite_sample(value: float) -> bool:
    """True for a finite, non-negative number: the only kind of sample a statistic takes."""
    return math.isfinite(value) and value >= 0.0


def quality_sample(value: float) -> bool:
    """True for a finite quality in [0, 1]."""
    return math.isfinite(value) and 0.0 <= value <= 1.0


class LatencySeries:
    """An exponentially weighted mean plus a bounded window of one latency, in milliseconds."""

    def __init__(self, alpha: float, window: int, ewma_ms: float = 0.0):
        self.alpha = alpha
        self.ewma_ms = ewma_ms if finite_sample(ewma_ms) else 0.0
        self.values: deque[float] = deque(maxlen=window)

    def add(self, value_ms: float) -> None:
        """Folds one latency in; a non-finite or negative one is skipped."""
        if not finite_sample(value_ms):
            return
        self.ewma_ms = value_ms if self.ewma_ms <= 0.0 else self.ewma_ms + self.alpha * (value_ms - self.ewma_ms)
        self.values.append(value_ms)

    def to_proto(self) -> registry_pb2.LatencyStats:
        ordered = sorted(self.values)
        return registry_pb2.LatencyStats(
            ewma_ms=self.ewma_ms,
            p50_ms=percentile(ordered, 50),
            p95_ms=percentile(ordered, 95),
            p99_ms=percentile(ordered, 99),
        )


class ModelStats:
    """The live statistics of one model (see the module doc).

    Args:
        settings: Window sizes and the EWMA weight.
        restored: The record this model had at start; its EWMAs and quality estimates are resumed.
    """

    def __init__(self, settings: StatsSettings, restored: registry_pb2.ModelRecord | None = None):
        self.settings = settings
        stats = restored.stats if restored is not None else registry_pb2.LiveStats()
        self.ttft = LatencySeries(settings.ewma_alpha, settings.window, stats.time_to_first_token.ewma_ms)
        self.per_token = LatencySeries(settings.ewma_alpha, settings.window, stats.per_token.ewma_ms)
        self.recent_failures: deque[bool] = deque(maxlen=settings.error_window)
        self.consecutive_failures = 0
        self.consecutive_timeouts = 0
        self.calls = 0
        self.quality: dict[QualityKey, tuple[float, int]] = {}
        if restored is not None:
            self.seed_quality(list(restored.quality), replace=True)

    def observe(self, outcome: registry_pb2.Outcome) -> None:
        """Folds one call outcome in. Latencies count only from successful calls."""
        self.calls += 1
        failed = not outcome.success
        self.recent_failures.append(failed)
        if failed:
            self.consecutive_failures += 1
            timed_out = outcome.error_code == TIMEOUT_CODE
            self.consecutive_timeouts = self.consecutive_timeouts + 1 if timed_out else 0
        else:
            self.consecutive_failures = 0
            self.consecutive_timeouts = 0
            ttft = outcome.time_to_first_token_ms
            if ttft > 0:
                self.ttft.add(ttft)
            tokens = outcome.usage.output_tokens
            if tokens >= 2 and outcome.total_ms > ttft >= 0:
                self.per_token.add((outcome.total_ms - ttft) / (tokens - 1))
        if outcome.HasField("quality") and quality_sample(outcome.quality):
            key = (outcome.task, outcome.complexity)
            mean, count = self.quality.get(key, (0.0, 0))
            count += 1
            self.quality[key] = (mean + (outcome.quality - mean) / count, count)

    @property
    def error_rate(self) -> float:
        """Share of the recent window that failed; 0 before any call."""
        if not self.recent_failures:
            return 0.0
        return sum(self.recent_failures) / len(self.recent_failures)

    @property
    def recent_calls(self) -> int:
        return len(self.recent_failures)

    def reset_errors(self) -> None:
        """Forgets the failure window and run (after a probe found the model ready again)."""
        self.recent_failures.clear()
        self.consecutive_failures = 0
        self.consecutive_timeouts = 0

    def seed_quality(self, estimates: list[registry_pb2.QualityEstimate], *, replace: bool = False) -> None:
        """Takes quality estimates for slices nothing has been learned about yet (all of them with
        ``replace``, when restoring). Estimates with a quality outside [0, 1] are skipped."""
        for estimate in estimates:
            if not quality_sample(estimate.quality):
                continue
            key = (estimate.task, estimate.complexity)
            learned = self.quality.get(key)
            if replace or learned is None or learned[1] == 0:
                self.quality[key] = (estimate.quality, int(estimate.observations))

    def write_to(self, record: registry_pb2.ModelRecord, *, now: float) -> None:
        """Replaces ``record.stats`` and ``record.quality`` with the current values.

        Args:
            record: The record to update in place.
            now: Wall-clock time of the update, in seconds since the epoch.
        """
        keep = (record.stats.in_flight, record.stats.queue_depth)
        updated_at = timestamp_pb2.Timestamp()
        updated_at.FromNanoseconds(int(now * 1e9))
        record.stats.CopyFrom(
            registry_pb2.LiveStats(
                time_to_first_token=self.ttft.to_proto(),
                per_token=self.per_token.to_proto(),
                error_rate=self.error_rate,
                in_flight=keep[0],
                queue_depth=keep[1],
                updated_at=updated_at,
            )
        )
        del record.quality[:]
        record.quality.extend(
            registry_pb2.QualityEstimate(task=task, complexity=complexity, quality=mean, observations=count)
            for (task, complexity), (mean, count) in sorted(self.quality.items())
        )
