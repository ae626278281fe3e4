"""The analyzer on a hand-made span set whose percentiles and critical paths are known."""

from __future__ import annotations

import pytest

from apps.traces.analyze import ASK, MODEL_CALL, analyze, markdown
from apps.traces.store import SpanRow

MS = 1_000_000  # nanoseconds per millisecond


def request(n: int, total_ms: float, members: list[tuple[str, float, float, float]], classify_ms: float = 2.0):
    """A dispatch Ask span with a classify call and model calls (model, start, first token, end) in ms."""
    trace = f"{n:032x}"
    root = SpanRow(trace, f"{n:08x}00000000", "", ASK, 2, "dispatch", 0, int(total_ms * MS), 0)
    spans = [
        root,
        SpanRow(trace, f"{n:08x}000000c1", root.span_id, "/constellation.v1.ClassifierService/Classify", 3,
                "dispatch", 0, int(classify_ms * MS), 0),
    ]  # fmt: skip
    for i, (model, start, first, end) in enumerate(members):
        span_id = f"{n:08x}{i + 1:08x}"
        spans.append(
            SpanRow(trace, span_id, root.span_id, MODEL_CALL, 3, "dispatch", int(start * MS), int(end * MS), 0,
                    attributes={"constellation.model": model, "constellation.cost_usd": 0.001},
                    events=[{"name": "first_token", "time_ns": int(first * MS)}])
        )  # fmt: skip
    return spans


def test_percentiles_and_critical_path() -> None:
    spans = []
    # 98 fast requests: 100 ms total, one model "a" (first token at 30 ms, done at 90 ms).
    for n in range(98):
        spans += request(n, 100.0, [("a", 5.0, 30.0, 90.0)])
    # Two slow fan-outs: the answer waited for "b", slow to its first token.
    spans += request(98, 1000.0, [("a", 5.0, 30.0, 90.0), ("b", 5.0, 900.0, 990.0)])
    spans += request(99, 1200.0, [("a", 5.0, 30.0, 90.0), ("b", 5.0, 1100.0, 1190.0)])
    result = analyze(spans, percentile=98.5)
    assert result.requests == 100
    assert result.stages["total"]["p50"] == pytest.approx(100.0, rel=1e-3)
    assert result.stages["total"]["p99"] == pytest.approx(1000.0, rel=1e-3)
    assert [r.trace_id for r in result.slow] == [f"{99:032x}", f"{98:032x}"]
    slowest = result.slow[0]
    assert slowest.critical_model == "b"
    assert slowest.members == 2
    assert slowest.phases["classify"] == pytest.approx(2.0)
    assert slowest.phases["first_token"] == pytest.approx(1095.0)
    assert slowest.phases["decode"] == pytest.approx(90.0)
    # dispatch's own time = total - classify - the member waited for (5..1190 ms)
    assert slowest.phases["dispatch"] == pytest.approx(1200.0 - 2.0 - 1185.0)
    assert result.slow_by_model == {"b": 2}
    assert result.slow_by_phase == {"first_token": 2}
    assert result.models["a"]["first_token"]["p50"] == pytest.approx(25.0, rel=1e-3)
    assert result.cost_per_request["p50"] == pytest.approx(0.001, rel=1e-2)
    report = markdown(result)
    assert "model waited for: b in 2" in report and "first_token in 2" in report


def test_a_straggler_cancelled_by_the_quorum_is_not_the_critical_member() -> None:
    spans = request(1, 300.0, [("a", 5.0, 30.0, 200.0), ("b", 5.0, 40.0, 210.0), ("slow", 5.0, 250.0, 260.0)])
    straggler = spans[-1]
    straggler.attributes.update({"constellation.cancelled": True, "constellation.cancelled_by_quorum": True})
    result = analyze(spans, percentile=50.0)
    (only,) = result.slow
    assert only.critical_model == "b"  # the last member the vote waited for, not the cancelled one
    assert only.members == 3 and only.flags == ["quorum-cancelled"]


def test_queueing_in_triton_comes_from_tritons_own_spans() -> None:
    spans = request(1, 300.0, [("a", 5.0, 150.0, 250.0)])
    member = spans[-1]
    trace = member.trace_id
    triton_model = SpanRow(
        trace,
        "t0000000000000a1",
        member.span_id,
        "replay",
        1,
        "triton",
        int(6 * MS),
        int(249 * MS),
        0,
        events=[{"name": "QUEUE_START", "time_ns": int(7 * MS)}],
    )
    compute = SpanRow(trace, "t0000000000000a2", triton_model.span_id, "compute", 1, "triton", int(47 * MS),
                      int(248 * MS), 0, events=[{"name": "COMPUTE_START", "time_ns": int(47 * MS)}])  # fmt: skip
    (only,) = analyze([*spans, triton_model, compute], percentile=50.0).slow
    assert only.phases["queue"] == pytest.approx(40.0)
    assert only.phases["first_token"] == pytest.approx(145.0 - 40.0)


def test_a_cascade_is_explained_wave_by_wave() -> None:
    # cheap wave: c1 (5..100 ms), c2 (5..120 ms) disagree; strong wave: s (125..400 ms)
    spans = request(1, 420.0, [("c1", 5.0, 40.0, 100.0), ("c2", 5.0, 50.0, 120.0), ("s", 125.0, 300.0, 400.0)])
    (only,) = analyze(spans, percentile=50.0).slow
    assert only.path == ["c2", "s"] and only.critical_model == "s"
    assert only.phases["first_token"] == pytest.approx(45.0 + 175.0)
    assert only.phases["decode"] == pytest.approx(70.0 + 100.0)
    assert only.phases["dispatch"] == pytest.approx(420.0 - 2.0 - 115.0 - 275.0)
