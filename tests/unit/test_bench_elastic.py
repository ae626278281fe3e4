"""The arithmetic of bench.elastic: the bursty trace, replica-seconds, the verdict against the targets."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.elastic import arrivals, phases, replica_seconds, verdict


def test_the_trace_has_a_burst_of_ten_times_the_base_rate() -> None:
    trace_phases = phases(base_rate=2.0, scale=1.0)
    assert [(p.name, p.seconds) for p in trace_phases] == [("idle", 20), ("ramp", 30), ("burst", 30), ("idle2", 40)]
    counts = Counter(phase for _, phase in arrivals(trace_phases, seed=1))
    assert counts["idle"] / 20 == pytest.approx(2.0, rel=0.3)
    assert counts["burst"] / 30 == pytest.approx(20.0, rel=0.15)
    assert counts["ramp"] / 30 == pytest.approx(11.0, rel=0.2)  # the mean of a linear ramp from 2 to 20
    times = [t for t, _ in arrivals(trace_phases, seed=1)]
    assert times == sorted(times) and times == [t for t, _ in arrivals(trace_phases, seed=1)]


def test_replica_seconds_is_the_area_under_the_step_function() -> None:
    assert replica_seconds([(0.0, 1), (2.0, 3), (3.0, 2), (5.0, 0)]) == pytest.approx(1 * 2 + 3 * 1 + 2 * 2)
    assert replica_seconds([]) == 0.0


def _result(name: str, per_query: float, p99: float, burst_p99: float, lost: int = 0) -> dict[str, object]:
    phases_ = {"burst": {"ttft_p99_ms": burst_p99}}
    return {
        "scenario": name,
        "replica_seconds_per_query": per_query,
        "ttft_p99_ms": p99,
        "phases": phases_,
        "lost": lost,
    }


def test_the_verdict_checks_each_target() -> None:
    results = [
        _result("peak", 3.0, 1000.0, 900.0),
        _result("mean", 1.5, 5000.0, 6000.0),
        _result("autoscaler", 1.8, 1150.0, 1100.0),
    ]
    met = verdict(results)  # type: ignore[arg-type]
    assert met["replica_seconds_saving_vs_peak"] == pytest.approx(0.4)
    assert met["met_saving_33pct"] and met["met_p99_within_1_2x"] and met["met_nothing_lost"]
    assert met["met_burst_p99_better_than_mean"]
    results[2] = _result("autoscaler", 2.5, 1300.0, 7000.0, lost=1)
    missed = verdict(results)  # type: ignore[arg-type]
    assert not any(missed[k] for k in missed if k.startswith("met_"))
