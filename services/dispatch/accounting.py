"""What every model call costs and how it went: metrics, span attributes, the registry outcome, hedge delays.

Dispatch's Prometheus metrics are declared here, once, on the library's registry. Labels stay bounded:
fixed enums, and model names only of models dispatch knows (its catalog, the registry's records, the
default model); any other name a caller sends is counted as :data:`OTHER_MODEL` (a caller's
``request_tag`` is a span attribute, never a label).
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from constellation import semconv
from constellation.metrics import REGISTRY
from constellation.semconv import CancelReason, Outcome, Role
from constellation.v1 import common_pb2, registry_pb2
from services.dispatch.calls import CallResult
from services.dispatch.config import DispatchConfig, ModelEntry
from services.registry.client import OutcomeReporter, RegistryView

TTFT = Histogram(
    "constellation_model_time_to_first_token_seconds",
    "Time from sending a request to a model to its first streamed text.",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
PER_TOKEN = Histogram(
    "constellation_model_time_per_output_token_seconds",
    "Decoding time per output token after the first.",
    ["model"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    registry=REGISTRY,
)
MODEL_CALLS = Counter(
    "constellation_model_calls_total", "Model calls by outcome.", ["model", "outcome"], registry=REGISTRY
)
COST = Counter("constellation_cost_usd_total", "Cost of model calls in USD.", ["model"], registry=REGISTRY)
CLASSIFY_FAILURES = Counter(
    "constellation_classify_failures_total",
    "Classifier calls that failed or timed out (the request went on unclassified).",
    ["code"],
    registry=REGISTRY,
)
FANOUT = Histogram(
    "constellation_fanout_size",
    "Models planned per request.",
    buckets=(1, 2, 3, 4, 5, 7, 9, 12, 16),
    registry=REGISTRY,
)
EARLY_STOPS = Counter(
    "constellation_early_terminations_total",
    "Fan-out waves ended before every member finished (quorum or agreement settled); stragglers cancelled.",
    ["policy"],
    registry=REGISTRY,
)
ESCALATIONS = Counter(
    "constellation_cascade_escalations_total", "Cascades that went on to their next wave.", registry=REGISTRY
)
FALLBACKS = Counter(
    "constellation_fallbacks_total",
    "Model calls that failed and were replaced by the next-best model.",
    ["model"],
    registry=REGISTRY,
)
HEDGES = Counter(
    "constellation_hedges_total",
    "Backup requests sent because a model had no first token by its p95 time to first token.",
    ["model"],
    registry=REGISTRY,
)
DEGRADED_PLANS = Counter(
    "constellation_degraded_plans_total",
    "Requests planned without something the plan needed (cause: classification_lost).",
    ["cause"],
    registry=REGISTRY,
)
TOKENS = Counter("constellation_tokens_total", "Tokens processed by models.", ["model", "direction"], registry=REGISTRY)


OTHER_MODEL = "other"
"""The ``model`` label of every model that dispatch does not know (a name a caller made up, say)."""


def cost_of(entry: ModelEntry, input_tokens: int, output_tokens: int) -> float:
    """Cost in USD of one call at the entry's price (USD per million tokens)."""
    return (input_tokens * entry.price_in_per_mtok + output_tokens * entry.price_out_per_mtok) / 1e6


class Accounting:
    """Accounts for finished model calls and remembers their times to first token (for hedge delays).

    Args:
        config: Dispatch settings (hedging).
        registry: A live view of the registry; its measured p95 wins over our own samples.
        reporter: Sends each call's outcome to the registry; None reports nothing.
    """

    def __init__(
        self, config: DispatchConfig, registry: RegistryView | None = None, reporter: OutcomeReporter | None = None
    ):
        self.config = config
        self.registry = registry
        self.reporter = reporter
        self._ttft: dict[str, deque[float]] = {}
        self._known = frozenset([*config.catalog(), config.default_model])

    def label(self, model: str) -> str:
        """``model`` as a metric label: its name when dispatch knows it, else :data:`OTHER_MODEL`."""
        if model in self._known or (self.registry is not None and model in self.registry.models):
            return model
        return OTHER_MODEL

    def record(self, result: CallResult, entry: ModelEntry, reported_cost: float | None, span: trace.Span) -> None:
        """Metrics, span attributes and the registry outcome of one finished (or failed) call."""
        model = self.label(result.model)
        result.ended_at = time.perf_counter()
        MODEL_CALLS.labels(model, result.outcome).inc()
        cost = reported_cost if reported_cost is not None else cost_of(entry, result.input_tokens, result.output_tokens)
        result.cost_usd = cost
        _describe(span, result)
        ttft_ms = self._observe_times(result, span, model)
        TOKENS.labels(model, "input").inc(result.input_tokens)
        TOKENS.labels(model, "output").inc(result.output_tokens)
        COST.labels(model).inc(cost)
        if self.reporter is not None and result.outcome != Outcome.CANCELLED:
            self.reporter.report(_outcome_message(result, ttft_ms))

    def _observe_times(self, result: CallResult, span: trace.Span, label: str) -> float:
        """Records the call's time to first token (span, histograms labelled ``label``, samples); returns it
        in ms (0: none). Samples are kept for known models only (hedging asks for no others)."""
        if result.first_at is None:
            return 0.0
        ttft = result.first_at - result.started_at
        ttft_ms = ttft * 1000
        span.set_attribute(semconv.TIME_TO_FIRST_TOKEN_MS, ttft_ms)
        if label != OTHER_MODEL:
            samples = self._ttft.get(result.model)
            if samples is None:
                samples = self._ttft[result.model] = deque(maxlen=256)
            samples.append(ttft_ms)
        TTFT.labels(label).observe(ttft)
        if result.output_tokens > 1:
            PER_TOKEN.labels(label).observe((result.ended_at - result.first_at) / (result.output_tokens - 1))
        return ttft_ms

    def hedge_delay_s(self, model: str) -> float:
        """How long to wait for ``model``'s first token before sending a backup request (0: never).

        The model's p95 time to first token: from the registry when it has measured the model for real,
        else from this dispatch's own recent calls, else ``hedge_after_ms``; times ``hedge_factor``.
        """
        if not self.config.hedging:
            return 0.0
        record = self.registry.models.get(model) if self.registry is not None else None
        if record is not None and not record.simulated and record.stats.time_to_first_token.p95_ms > 0:
            p95 = record.stats.time_to_first_token.p95_ms
        else:
            samples = self._ttft.get(model)
            if samples is not None and len(samples) >= self.config.hedge_min_samples:
                p95 = float(np.percentile(np.fromiter(samples, dtype=float), 95))
            else:
                p95 = self.config.hedge_after_ms
        return p95 * self.config.hedge_factor / 1000


def _describe(span: trace.Span, result: CallResult) -> None:
    """The call's usage and fate as attributes of its span."""
    span.set_attribute(semconv.INPUT_TOKENS, result.input_tokens)
    span.set_attribute(semconv.OUTPUT_TOKENS, result.output_tokens)
    span.set_attribute(semconv.COST_USD, result.cost_usd)
    span.set_attribute(semconv.FINISH_REASON, result.finish_reason or str(result.outcome))
    span.set_attribute(semconv.CANCELLED, result.outcome == Outcome.CANCELLED)
    span.set_attribute(semconv.CANCELLED_BY_QUORUM, result.cancel_reason == CancelReason.QUORUM)
    span.set_attribute(semconv.HEDGED, result.role == Role.HEDGE or result.cancel_reason == CancelReason.HEDGE)
    span.set_attribute(semconv.FALLBACK, result.role == Role.FALLBACK)
    if result.simulated is not None:
        span.set_attribute(semconv.SIMULATED_TIME_TO_FIRST_TOKEN_MS, result.simulated[0])
        span.set_attribute(semconv.SIMULATED_TOTAL_MS, result.simulated[1])


def _outcome_message(result: CallResult, ttft_ms: float) -> registry_pb2.Outcome:
    """The registry's record of one call; replayed models report their simulated latency."""
    if result.simulated is not None:
        ttft_ms, total_ms = result.simulated
    else:
        total_ms = (result.ended_at - result.started_at) * 1000
    return registry_pb2.Outcome(
        model=result.model,
        success=result.outcome == Outcome.OK,
        time_to_first_token_ms=ttft_ms,
        total_ms=total_ms,
        usage=common_pb2.Usage(
            input_tokens=result.input_tokens, output_tokens=result.output_tokens, cost_usd=result.cost_usd
        ),
        error_code=result.error.code.name if result.error is not None else "",
    )
