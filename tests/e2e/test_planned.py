"""Error-bounded plans through the real mesh: Triton's replay model, a dispatch process, real Asks and Plans.

The pool is written here: a two-way task (options A/B) with three models whose train answers give them
known accuracies, and a few test prompts. The confusion artifact is fitted on its train split with
``constellation train confusion``; dispatch loads it and plans ``AskRequest.alpha`` queries over it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apps.eval_run import REPLAY_MODEL, catalog_for, run_eval
from apps.mesh import Mesh, MeshPorts
from constellation.client import DispatchClient, ask_request
from constellation.errors import FailedPrecondition
from constellation.net import free_port
from constellation.planning import LikelihoodVote
from services.dispatch import bounds

# Train mistakes: a model errs on the train records whose index is a multiple of its period.
PERIODS = {"cheap": 10, "mid": 8, "strong": 20}
COSTS = {"cheap": 0.001, "mid": 0.002, "strong": 0.05}
TRAIN = 80
# Test answers per model, and the truth.
TESTS = [
    ("A", {"cheap": "A", "mid": "A", "strong": "A"}),
    ("B", {"cheap": "A", "mid": "B", "strong": "B"}),
    ("A", {"cheap": "B", "mid": "A", "strong": "A"}),
    ("B", {"cheap": "B", "mid": "B", "strong": "A"}),
]
ALPHA = 0.2


def _prompt(i: int) -> str:
    return f"Question {i}: which one is number {i}?\nA) the first\nB) the second\nAnswer:"


def _record(i: int, split: str, truth: str, answers: dict[str, str]) -> dict[str, Any]:
    responses = {
        m: {
            "text": answer,
            "answer": answer,
            "correct": int(answer == truth),
            "score": float(answer == truth),
            "input_tokens": 20,
            "output_tokens": 1,
            "cost_usd": COSTS[m],
        }
        for m, answer in answers.items()
    }
    return {
        "id": f"two/{i}",
        "split": split,
        "task": "two",
        "answer_kind": "choice",
        "reference": truth,
        "prompt": _prompt(i),
        "responses": responses,
    }


def write_pool(directory: Path) -> Path:
    """The two-way pool and its models.json (prices proportional to the recorded costs)."""
    other = {"A": "B", "B": "A"}
    rows = []
    for i in range(TRAIN):
        truth = "AB"[i % 2]
        rows.append(_record(i, "train", truth, {m: other[truth] if i % p == 0 else truth for m, p in PERIODS.items()}))
    rows += [_record(TRAIN + n, "test", truth, answers) for n, (truth, answers) in enumerate(TESTS)]
    pool = directory / "two.jsonl.gz"
    pool.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in rows) + "\n").encode()))
    cards = {
        m: {"family": "toy", "price_in_per_mtok": c * 1000, "price_out_per_mtok": c * 1000} for m, c in COSTS.items()
    }
    (directory / "models.json").write_text(json.dumps(cards))
    return pool


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A mesh (replay model + dispatch) that loads the pool's fitted confusion matrices."""
    directory = tmp_path_factory.mktemp("planned")
    pool = write_pool(directory)
    assert bounds.main(["--pool", str(pool), "--out", str(directory / "artifacts")]) == 0
    models_file = directory / "models.json.catalog"
    models_file.write_text(json.dumps(catalog_for(pool, list(PERIODS))))
    running = Mesh(
        MeshPorts(*(free_port() for _ in range(9))),
        models=[REPLAY_MODEL],
        run_dir=directory,
        say=lambda _: None,
        model_parameters={REPLAY_MODEL: {"pool_paths": str(pool), "time_scale": "0"}},
        dispatch_args=[
            "--models-file",
            str(models_file),
            "--confusion-artifact",
            str(directory / "artifacts"),
            "--no-routing",
            "--no-hedging",
        ],
    )
    running.start()
    try:
        yield running.dispatch_address, directory / "artifacts"
    finally:
        running.stop()


async def _plan_and_ask(address: str, prompt: str) -> tuple[Any, list[Any]]:
    async with DispatchClient(address, traced=False) as client:
        planned = await client.plan(ask_request(prompt, alpha=ALPHA))
        events = [e async for e in client.ask(ask_request(prompt, alpha=ALPHA), timeout_s=60)]
    return planned, events


def test_an_error_bounded_ask_is_planned_voted_and_certified(mesh: tuple[str, Path]) -> None:
    address, artifacts = mesh
    kind = bounds.load(artifacts)["two"]
    for n, (_truth, answers) in enumerate(TESTS):
        planned, events = asyncio.run(_plan_and_ask(address, _prompt(TRAIN + n)))
        plan = planned.plan
        assert plan.policy == "planned"
        assert set(plan.error_bounds) == {"A", "B"} and max(plan.error_bounds.values()) <= ALPHA
        assert plan.alpha == {"A": ALPHA, "B": ALPHA}
        members = [c.model for c in plan.candidates if c.chosen]
        final = events[-1].final
        vote = LikelihoodVote({m: kind.matrices[m] for m in members})
        asked = [m for m in members if m in final.models]
        assert final.decision == vote.decide([(m, answers[m]) for m in asked])
        assert final.text == final.decision  # the recorded text of a model that answered the decision
        assert dict(final.error_bounds) == pytest.approx(dict(plan.error_bounds))
        # every call answered or was cancelled once the decision was certified (a cancelled call costs 0)
        assert COSTS[final.models[0]] <= final.usage.cost_usd <= sum(COSTS[m] for m in final.models) + 1e-9


def test_an_error_bound_on_an_open_prompt_is_refused(mesh: tuple[str, Path]) -> None:
    async def ask() -> None:
        async with DispatchClient(mesh[0], traced=False) as client:
            async for _ in client.ask(ask_request("What is the capital of France?", alpha=0.1), timeout_s=30):
                pass

    with pytest.raises(FailedPrecondition, match="closed-answer prompt"):
        asyncio.run(ask())


def test_eval_reports_the_realised_error_per_true_label(tmp_path: Path) -> None:
    pool = write_pool(tmp_path)
    report = run_eval(pool, policies=[f"planned:{ALPHA}"], concurrency=2, progress=False, say=lambda _: None)
    assert report.failed_calls == 0
    rows = report.bounded[f"planned:{ALPHA}"]
    assert {label: row["n"] for label, row in rows.items()} == {"A": 2, "B": 2}
    assert all(0.0 <= row["low"] <= row["error"] <= row["high"] <= 1.0 for row in rows.values())


def test_cli_plan_prints_the_certified_bound_per_label_and_the_cost(mesh: tuple[str, Path]) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "apps.cli", "plan", _prompt(TRAIN), "--alpha", str(ALPHA), "--address", mesh[0]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "policy: planned" in shown.stdout
    assert "error-bounded plan: 3 calls, predicted cost $0.053000" in shown.stdout
    rows = [line.split() for line in shown.stdout.splitlines() if line.strip().startswith(("A ", "B "))]
    assert [(r[0], float(r[1])) for r in rows] == [("A", ALPHA), ("B", ALPHA)]
    assert all(float(r[2]) <= ALPHA for r in rows)
