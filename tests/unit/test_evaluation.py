"""The baseline policies' metrics on the tiny pool, checked against numbers worked out by hand."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from apps.evaluation import Call, Judge, dominated_by, normalize_answer, pareto_verdict, verdict, vote
from constellation.pools import read_pool
from tests.pool_fixtures import write_pool


@pytest.fixture
def judge(tmp_path: Path) -> Judge:
    path = write_pool(tmp_path / "tiny.jsonl.gz")
    return Judge(list(read_pool(path, split="test")), list(read_pool(path, split="train")), seed=0)


def perfect_calls(judge: Judge, *, sim: float = 100.0) -> dict[tuple[str, str], Call]:
    """Calls that returned exactly the recorded text; simulated latency grows with cost."""
    calls = {}
    for record in judge.test:
        for model, response in record.responses.items():
            latency = {"cheap": sim, "mid": 2 * sim, "strong": 3 * sim}[model]
            calls[(record.id, model)] = Call(
                record.id, model, response.text, response.cost_usd or 0.0, latency, latency / 2, 1.0
            )
    return calls


def test_single_static_oracle_majority_by_hand(judge: Judge) -> None:
    calls = perfect_calls(judge)
    results = {p: judge.evaluate(p, calls) for p in judge.policies()}
    assert results["single:cheap"].quality == pytest.approx(1 / 4)
    assert results["single:mid"].quality == pytest.approx(2 / 4)
    assert results["single:strong"].quality == pytest.approx(3 / 4)
    # static = best on train = strong (2/2)
    assert judge.static == "strong"
    assert results["static"].quality == pytest.approx(3 / 4)
    assert results["static"].mean_cost_usd == pytest.approx(0.1)
    # oracle: t2 cheap (0.001), t3 cheap... no: t3 cheap wrong, mid right -> mid (0.01);
    # t4 strong (0.1); t5 nobody right -> cheapest (cheap, 0.001). Quality 3/4.
    oracle = results["oracle"]
    assert [o.models for o in oracle.outcomes] == [("cheap",), ("mid",), ("strong",), ("cheap",)]
    assert oracle.quality == pytest.approx(3 / 4)
    assert oracle.mean_cost_usd == pytest.approx((0.001 + 0.01 + 0.1 + 0.001) / 4)
    # majority: t2 {4,4,4} -> 4 ok; t3 {7,6,6.0} -> 6 ok; t4 {1,2,9} three-way tie -> strong (best on
    # train) -> 9 ok; t5 {5,5,8} -> 5, reference 3 -> wrong. Quality 3/4 at the cost of all three.
    majority = results["majority"]
    assert majority.quality == pytest.approx(3 / 4)
    assert majority.mean_cost_usd == pytest.approx(0.111)
    assert majority.simulated_ms["p50"] == pytest.approx(300.0)  # the slowest member sets the latency
    assert majority.mean_models == 3
    assert "ties with the best single model (strong): +0.00 points, 1.11x" in verdict(
        majority, results["single:strong"]
    )
    assert "does not beat" in verdict(results["single:mid"], results["single:strong"])
    assert "matches, more cheaply, the best single model" in verdict(oracle, results["single:strong"])


def test_random_policy_is_repeatable(judge: Judge) -> None:
    first = [judge.members("random", r) for r in judge.test]
    assert first == [judge.members("random", r) for r in judge.test]
    assert all(m[0] in judge.models for m in first)


def test_failed_or_altered_calls_count_as_wrong(judge: Judge) -> None:
    calls = perfect_calls(judge)
    key = ("tiny/4", "strong")
    calls[key] = Call("tiny/4", "strong", "something else", 0.1, 300.0, 150.0, 1.0)
    result = judge.evaluate("single:strong", calls)
    assert result.quality == pytest.approx(2 / 4)
    assert result.failures == 1


def test_percentiles_and_vote_helpers() -> None:
    assert normalize_answer("number", "6.0") == "6"
    assert normalize_answer("number", "1,000") == "1000"
    assert normalize_answer("choice", " b ") == "B"
    winner, share, voters = vote("choice", {"a": "B", "b": "b", "c": "C", "d": None}, {})
    assert (winner, share, sorted(voters)) == ("B", 0.5, ["a", "b"])


def test_cascade_baseline_asks_the_second_wave_only_when_the_first_disagrees(judge: Judge) -> None:
    from bench.cascade_search import CascadeChoice

    judge.cascade = CascadeChoice(("cheap", "mid"), ("strong",), None, {}, {"strong": 1.0}, 1.0, 0.05)
    assert judge.members("cascade", judge.test[0]) == ["cheap", "mid", "strong"]
    calls = perfect_calls(judge)
    cascade = judge.evaluate("cascade", calls)
    # t2 {4,4} agree (right); t3 {7,6} and t4 {1,2} escalate to strong (right); t5 {5,5} agree (wrong)
    assert [o.models for o in cascade.outcomes] == [
        ("cheap", "mid"),
        ("cheap", "mid", "strong"),
        ("cheap", "mid", "strong"),
        ("cheap", "mid"),
    ]
    assert cascade.quality == pytest.approx(3 / 4)
    assert cascade.mean_cost_usd == pytest.approx((0.011 + 0.111 + 0.111 + 0.011) / 4)
    assert cascade.outcomes[1].simulated_ms == pytest.approx(200.0 + 300.0)  # waves run one after the other
    strong = judge.evaluate("single:strong", calls)
    assert dominated_by(strong, [strong, cascade]) == [cascade]
    assert "single:strong is dominated by cascade (+0.00 points at 0.61x its mean cost)" in pareto_verdict(
        strong, [strong, cascade]
    )


def test_top_k_votes_the_best_train_records(judge: Judge) -> None:
    assert judge.by_record == ["strong", "cheap", "mid"]  # train 2/2, then the 1/2 ones, cheaper first
    top2 = judge.evaluate("top2", perfect_calls(judge))
    # strong and cheap vote; their ties go to strong (the better train record): t2 4, t3 6, t4 9, t5 8
    assert top2.quality == pytest.approx(3 / 4) and top2.mean_cost_usd == pytest.approx(0.101)
    assert "top3" not in judge.policies()  # three models: a top-3 vote is the majority baseline


def test_a_policy_with_no_recorded_price_dominates_nothing(judge: Judge) -> None:
    calls = perfect_calls(judge)
    mid, strong = judge.evaluate("single:mid", calls), judge.evaluate("single:strong", calls)
    free = judge.evaluate("single:strong", {k: replace(c, cost_usd=0.0) for k, c in calls.items()})
    assert dominated_by(strong, [free]) == []
    assert pareto_verdict(mid, [mid, strong]).endswith("on the Pareto front of single models and baselines")
    profile = replace(strong, policy="profile:quality", mean_cost_usd=0.2)
    assert dominated_by(profile, [profile, mid, strong]) == [strong]
