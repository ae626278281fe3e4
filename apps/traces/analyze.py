"""Tail-latency analysis of collected traces: ``constellation traces analyze``.

A request is the dispatch server span of ``Ask``. Its time is split along the *critical path*: the
stages the answer had to wait for, in order: classification, the model call the answer waited for
(in a fan-out, the last member that finished before the answer, never one the quorum cancelled;
within it, queueing in Triton when Triton's own spans are collected, time to first token and
decoding), ranking and fusion; what is left is dispatch's own time (validation, planning, relaying).

Percentiles come from HDR histograms (microsecond resolution, 3 significant digits). For the requests
above a chosen percentile of end-to-end time, the report says which member and which phase set the
time, so a P99 can be explained rather than just measured.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hdrh.histogram import HdrHistogram

from apps.traces.store import SpanRow
from constellation import semconv

ASK = "/constellation.v1.DispatchService/Ask"
SERVER_KIND = 2  # OTLP SpanKind.SPAN_KIND_SERVER
MODEL_CALL = semconv.SPAN_MODEL_CALL
STAGE_RPCS = {
    "/constellation.v1.ClassifierService/Classify": "classify",
    "/constellation.v1.RankingService/Rank": "rank",
    "/constellation.v1.FusionService/Fuse": "fuse",
}
NAN = float("nan")
PHASES = ("classify", "queue", "first_token", "decode", "rank", "fuse", "dispatch")


@dataclass
class RequestBreakdown:
    """One request's end-to-end time and its critical path, in milliseconds."""

    trace_id: str
    total_ms: float
    critical_model: str
    phases: dict[str, float]
    cost_usd: float
    members: int
    flags: list[str] = field(default_factory=list)
    path: list[str] = field(default_factory=list)
    """The members waited for, wave by wave (one model for a single call; two or more for a cascade)."""


class Histogram:
    """An HDR histogram of milliseconds (stored as microseconds, 1 us to 1 h, 3 significant digits)."""

    def __init__(self) -> None:
        self._h = HdrHistogram(1, 3_600_000_000, 3)
        self.count = 0

    def record(self, ms: float) -> None:
        self._h.record_value(max(1, round(ms * 1000)))
        self.count += 1

    def percentile(self, p: float) -> float:
        return float(self._h.get_value_at_percentile(p)) / 1000 if self.count else float("nan")

    def summary(self) -> dict[str, float]:
        return {"count": self.count, **{f"p{p:g}": self.percentile(p) for p in (50, 95, 99)}}


def _traces(spans: Iterable[SpanRow]) -> dict[str, list[SpanRow]]:
    grouped: dict[str, list[SpanRow]] = defaultdict(list)
    for span in spans:
        grouped[span.trace_id].append(span)
    return grouped


def _descendants(root: SpanRow, spans: Sequence[SpanRow]) -> list[SpanRow]:
    children: dict[str, list[SpanRow]] = defaultdict(list)
    for span in spans:
        children[span.parent_span_id].append(span)
    found: list[SpanRow] = []
    seen = {root.span_id}
    stack = [root.span_id]
    while stack:
        for child in children.get(stack.pop(), []):
            if child.span_id in seen:  # malformed input (a span its own ancestor): never loop
                continue
            seen.add(child.span_id)
            found.append(child)
            stack.append(child.span_id)
    return found


def triton_queue_ms(member: SpanRow, spans: Sequence[SpanRow]) -> float | None:
    """Time the request waited in Triton's scheduler, from Triton's own spans below a model call.

    Triton (with ``--trace-config mode=opentelemetry``) continues our ``traceparent``: its model span
    carries a ``QUEUE_START`` event and its compute span a ``COMPUTE_START`` event. None when Triton's
    spans are not there (tracing off in Triton, or not delivered).
    """
    below = _descendants(member, spans)
    queued = min((t for s in below if (t := s.event_ns("QUEUE_START")) is not None), default=None)
    computing = min((t for s in below if (t := s.event_ns("COMPUTE_START")) is not None), default=None)
    if queued is None or computing is None or computing < queued:
        return None
    return (computing - queued) / 1e6


def breakdown(root: SpanRow, spans: Sequence[SpanRow]) -> RequestBreakdown:
    """Splits one request's time along its critical path."""
    below = _descendants(root, spans)
    phases = dict.fromkeys(PHASES, 0.0)
    covered = 0.0
    for span in below:
        stage = STAGE_RPCS.get(span.name)
        if stage and span.kind != SERVER_KIND:
            phases[stage] += span.duration_ms
            covered += span.duration_ms
    members = [s for s in below if s.name == MODEL_CALL]
    critical = ""
    path: list[str] = []
    flags: list[str] = []
    if members:
        finished = [m for m in members if not m.attributes.get(semconv.CANCELLED)] or members
        answered = [m for m in finished if m.end_ns <= root.end_ns] or finished
        # The chain of waves: the member the answer waited for, then, before it started, the member its
        # wave waited for, and so on (a cascade's cheap wave, then its strong wave).
        chain = [max(answered, key=lambda m: m.end_ns)]
        while earlier := [m for m in answered if m.end_ns <= chain[-1].start_ns]:
            chain.append(max(earlier, key=lambda m: m.end_ns))
        critical = str(chain[0].attributes.get(semconv.MODEL, "?"))
        path = [str(m.attributes.get(semconv.MODEL, "?")) for m in reversed(chain)]
        for waited_for in chain:
            first = waited_for.event_ns("first_token")
            queue_ms = triton_queue_ms(waited_for, spans)
            if queue_ms is None:
                queue_ms = float(waited_for.attributes.get(semconv.QUEUE_MS, 0.0) or 0.0)
            ttft_ms = (first - waited_for.start_ns) / 1e6 if first else waited_for.duration_ms
            phases["queue"] += queue_ms
            phases["first_token"] += max(0.0, ttft_ms - queue_ms)
            phases["decode"] += (waited_for.end_ns - first) / 1e6 if first else 0.0
            covered += waited_for.duration_ms
        for attribute, flag in (
            (semconv.CANCELLED_BY_QUORUM, "quorum-cancelled"),
            (semconv.HEDGED, "hedged"),
            (semconv.FALLBACK, "fallback"),
        ):
            if any(m.attributes.get(attribute) for m in members):
                flags.append(flag)
    phases["dispatch"] = max(0.0, root.duration_ms - covered)
    cost = sum(float(m.attributes.get(semconv.COST_USD, 0.0) or 0.0) for m in members)
    return RequestBreakdown(root.trace_id, root.duration_ms, critical, phases, cost, len(members), flags, path)


@dataclass
class Analysis:
    """Percentiles per stage and per model, and the critical paths of the slow requests."""

    requests: int
    stages: dict[str, dict[str, float]]
    models: dict[str, dict[str, dict[str, float]]]
    cost_per_request: dict[str, float]
    threshold_percentile: float
    threshold_ms: float
    slow: list[RequestBreakdown]
    slow_by_model: dict[str, int]
    slow_by_phase: dict[str, int]
    all_requests: list[RequestBreakdown] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("all_requests")
        return data


def analyze(spans: Iterable[SpanRow], *, percentile: float = 99.0) -> Analysis:
    """Analyses every Ask request found in ``spans``."""
    stage_hist: dict[str, Histogram] = defaultdict(Histogram)
    model_hist: dict[str, dict[str, Histogram]] = defaultdict(lambda: defaultdict(Histogram))
    requests: list[RequestBreakdown] = []
    cost = Histogram()
    for trace_spans in _traces(spans).values():
        for root in (s for s in trace_spans if s.name == ASK and s.kind == SERVER_KIND):
            request = breakdown(root, trace_spans)
            requests.append(request)
            stage_hist["total"].record(request.total_ms)
            for phase, ms in request.phases.items():
                if ms > 0:
                    stage_hist[phase].record(ms)
            cost.record(request.cost_usd * 1e6)  # micro-dollars, for HDR's integer buckets
            for member in (s for s in _descendants(root, trace_spans) if s.name == MODEL_CALL):
                model = str(member.attributes.get(semconv.MODEL, "?"))
                model_hist[model]["total"].record(member.duration_ms)
                first = member.event_ns("first_token")
                if first:
                    model_hist[model]["first_token"].record((first - member.start_ns) / 1e6)
                    model_hist[model]["decode"].record((member.end_ns - first) / 1e6)
    # The slow set is chosen on exact values (nearest rank), not HDR buckets, so that a request exactly at
    # the percentile is included.
    totals = sorted(r.total_ms for r in requests)
    threshold = totals[max(0, math.ceil(percentile / 100 * len(totals)) - 1)] if totals else float("nan")
    slow = sorted((r for r in requests if r.total_ms >= threshold), key=lambda r: -r.total_ms)
    by_phase = Counter(max(r.phases, key=lambda p: r.phases[p]) for r in slow)
    cost_summary = {k: v / 1e6 for k, v in cost.summary().items() if k != "count"}
    return Analysis(
        requests=len(requests),
        stages={name: h.summary() for name, h in stage_hist.items()},
        models={m: {k: h.summary() for k, h in hs.items()} for m, hs in model_hist.items()},
        cost_per_request=cost_summary,
        threshold_percentile=percentile,
        threshold_ms=threshold,
        slow=slow,
        slow_by_model=dict(Counter(r.critical_model for r in slow)),
        slow_by_phase=dict(by_phase),
        all_requests=requests,
    )


def _ms(value: float) -> str:
    return f"{value:.1f}" if value == value else "-"


def markdown(analysis: Analysis, *, plots: dict[str, str] | None = None) -> str:
    """The report: stage and model percentiles, then who set the tail and how."""
    lines = [
        f"Requests analysed: {analysis.requests}.",
        "",
        "| stage | count | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name in ("total", *PHASES):
        if name in analysis.stages:
            s = analysis.stages[name]
            lines.append(f"| {name} | {s['count']:.0f} | {_ms(s['p50'])} | {_ms(s['p95'])} | {_ms(s['p99'])} |")
    lines += [
        "",
        "| model | calls | ttft p50 / p99 ms | decode p50 / p99 ms | total p50 / p99 ms |",
        "|---|---|---|---|---|",
    ]
    for model, hs in sorted(analysis.models.items()):
        t, f, d = hs.get("total", {}), hs.get("first_token", {}), hs.get("decode", {})
        lines.append(
            f"| {model} | {t.get('count', 0):.0f} | {_ms(f.get('p50', NAN))} / {_ms(f.get('p99', NAN))} "
            f"| {_ms(d.get('p50', NAN))} / {_ms(d.get('p99', NAN))} "
            f"| {_ms(t.get('p50', NAN))} / {_ms(t.get('p99', NAN))} |"
        )
    c = analysis.cost_per_request
    lines += [
        "",
        f"Cost per request (USD): p50 {c.get('p50', 0):.6f}, p95 {c.get('p95', 0):.6f}, p99 {c.get('p99', 0):.6f}.",
        "",
    ]
    lines.append(
        f"**Requests at or above p{analysis.threshold_percentile:g} ({_ms(analysis.threshold_ms)} ms): "
        f"{len(analysis.slow)}.** Largest phase: "
        + ", ".join(f"{phase} in {n}" for phase, n in sorted(analysis.slow_by_phase.items(), key=lambda kv: -kv[1]))
        + "; model waited for: "
        + ", ".join(f"{m or 'none'} in {n}" for m, n in sorted(analysis.slow_by_model.items(), key=lambda kv: -kv[1]))
        + "."
    )
    lines += [
        "",
        "| trace id | total ms | waited for | " + " | ".join(PHASES) + " | flags |",
        "|---" * (len(PHASES) + 4) + "|",
    ]
    for r in analysis.slow[:15]:
        lines.append(
            f"| `{r.trace_id[:16]}` | {r.total_ms:.1f} | {' → '.join(r.path) or '-'} | "
            + " | ".join(_ms(r.phases[p]) for p in PHASES)
            + f" | {', '.join(r.flags) or '-'} |"
        )
    for title, path in (plots or {}).items():
        lines += ["", f"![{title}]({path})"]
    return "\n".join(lines) + "\n"


def plot(analysis: Analysis, out_dir: Path, prefix: str = "traces") -> dict[str, Path]:
    """Latency CDF per stage and a stacked critical-path breakdown of the slowest requests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"cdf": out_dir / f"{prefix}_stage_cdf.png", "critical": out_dir / f"{prefix}_critical_path.png"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    series: dict[str, list[float]] = defaultdict(list)
    for r in analysis.all_requests:
        series["total"].append(r.total_ms)
        for phase, ms in r.phases.items():
            if ms > 0:
                series[phase].append(ms)
    for name, values in series.items():
        ordered = np.sort(values)
        ax.step(ordered, np.arange(1, len(ordered) + 1) / len(ordered), where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds (log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency per stage (critical path)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["cdf"], dpi=120)
    plt.close(fig)

    slowest = sorted(analysis.all_requests, key=lambda r: -r.total_ms)[:20]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bottom = np.zeros(len(slowest))
    for phase in PHASES:
        heights = np.array([r.phases[phase] for r in slowest])
        if heights.any():
            ax.bar(range(len(slowest)), heights, bottom=bottom, label=phase)
            bottom += heights
    ax.set_xticks(range(len(slowest)))
    ax.set_xticklabels([r.critical_model[:14] or "-" for r in slowest], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("milliseconds")
    ax.set_title("Critical path of the 20 slowest requests (label: model waited for)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["critical"], dpi=120)
    plt.close(fig)
    return paths


def write_json(analysis: Analysis, path: Path) -> None:
    path.write_text(json.dumps(analysis.to_json(), indent=2, default=str))
