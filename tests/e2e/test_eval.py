"""`constellation eval` end to end on a tiny pool: real Triton replay model, real dispatch, real Asks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from apps.eval_run import run_eval, write_report
from tests.pool_fixtures import write_pool


def test_routing_profiles_on_a_pool_the_code_has_never_seen(tmp_path: Path) -> None:
    """`train router` then `eval` on the tiny pool: the same commands, a new pool, routed through the mesh."""
    from services.dispatch.router_train import main as train_router

    pool = write_pool(tmp_path / "tiny.jsonl.gz")
    assert train_router([str(pool), "--out", str(tmp_path / "artifacts"), "--quiet"]) == 0
    artifact = tmp_path / "artifacts" / "router"
    assert (artifact / "CURRENT").is_file()
    report = run_eval(
        pool,
        policies=["profile:quality", "profile:cost"],
        concurrency=2,
        progress=False,
        say=lambda _: None,
        router_artifact=str(artifact),
    )
    results = {r.policy: r for r in report.results}
    assert report.failed_calls == 0
    # On train the strong model is right 2/2 and the others 1/2: the quality profile asks it alone.
    quality = results["profile:quality"]
    assert quality.quality == pytest.approx(3 / 4)
    assert all(o.models[0] == "strong" for o in quality.outcomes)
    # The cost profile asks the cheapest model within its quality margin of the best prediction: here the
    # cheaper models are right half as often on train, so it gives up nothing and pays no more.
    cost = results["profile:cost"]
    assert cost.mean_cost_usd <= quality.mean_cost_usd and cost.quality == pytest.approx(quality.quality)


def test_baselines_through_the_mesh_match_the_hand_computed_metrics(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "tiny.jsonl.gz")
    report = run_eval(pool, concurrency=4, progress=False, say=lambda _: None, profiles=False)
    results = {r.policy: r for r in report.results}
    assert report.calls == 12 and report.failed_calls == 0  # 4 test prompts x 3 models, shared by all policies
    assert results["single:cheap"].quality == pytest.approx(1 / 4)
    assert results["single:strong"].quality == pytest.approx(3 / 4)
    assert results["static"].quality == pytest.approx(3 / 4)
    assert results["oracle"].quality == pytest.approx(3 / 4)
    assert results["oracle"].mean_cost_usd == pytest.approx((0.001 + 0.01 + 0.1 + 0.001) / 4)
    assert results["majority"].quality == pytest.approx(3 / 4)
    assert results["majority"].mean_cost_usd == pytest.approx(0.111)
    assert report.best_single.policy == "single:strong"
    # Recorded costs came back through dispatch; latency is simulated (positive) and reported apart.
    assert results["single:mid"].mean_cost_usd == pytest.approx(0.01)
    assert results["single:strong"].simulated_ms["p50"] > 0
    assert results["majority"].simulated_ms["p50"] >= results["single:cheap"].simulated_ms["p50"]
    assert all(o.mesh_ms > 0 for o in results["static"].outcomes)
    paths = write_report(report, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["best_single"] == "single:strong"
    assert "oracle matches, more cheaply, the best single model (strong)" in paths["markdown"].read_text()
    assert paths["plot"].stat().st_size > 10_000


def test_cli_rejects_a_missing_pool_and_runs_one_policy(tmp_path: Path) -> None:
    missing = subprocess.run(
        [sys.executable, "-m", "apps.cli", "eval", "--pool", str(tmp_path / "nope.jsonl")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "no pool file" in missing.stderr
    pool = write_pool(tmp_path / "tiny.jsonl.gz")
    ran = subprocess.run(
        [sys.executable, "-m", "apps.cli", "eval", "--pool", str(pool), "--policy", "static",
         "--out", str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "| **static** | 75.00 |" in ran.stdout
    assert "4 calls through the mesh" in ran.stdout
    assert "strong (recorded, not run)" in ran.stdout
