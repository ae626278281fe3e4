"""A ranked fan-out end to end: real Triton (replay), real ranking service (first stage, real encoder), dispatch.

The pool written here has one code prompt and three models. The router artifact written here believes
`chatty` (a refusal cut mid-sentence) more than `coder` (a function that parses), and its `balanced`
profile asks the two cheap ones at once. With the ranking service, dispatch keeps the answer the ranker
puts first (`coder`), not the member the router trusts most (`chatty`); a dispatch without a ranking
service plans no ranked fan-out at all.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

from constellation.client import DispatchClient, ask_request
from constellation.config import load_config
from constellation.ml.encoder import Encoder
from constellation.net import free_port
from constellation.v1 import common_pb2, dispatch_pb2
from services.dispatch.routing import ProfileSettings, Weights
from services.inference.launcher import TritonServer
from services.ranking.config import RankingConfig
from services.ranking.main import build_ranker, running_ranking
from tests.e2e import router_artifacts

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT = "Write a python function that returns the square of a number."
CODE = "```python\ndef square(x):\n    return x * x\n```"
MODELS = {  # name: (train record the router believes, price per Mtok, recorded text)
    "strong": (0.95, 10.0, CODE),
    "chatty": (0.90, 0.1, "Sorry, I am not sure how to"),
    "coder": (0.60, 0.2, CODE + "\nThis squares its argument."),
}


def write_pool(directory: Path) -> Path:
    responses = {
        name: {"text": text, "answer": None, "correct": None, "score": None, "input_tokens": 14,
               "output_tokens": 20, "cost_usd": None}
        for name, (_, _, text) in MODELS.items()
    }  # fmt: skip
    record = {"id": "code/0", "task": "code", "split": "test", "prompt": PROMPT, "reference": None,
              "answer_kind": "code", "responses": responses}  # fmt: skip
    path = directory / "code.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(record) + "\n").encode()))
    return path


def write_router(root: Path) -> Path:
    quality = {name: believed for name, (believed, _, _) in MODELS.items()}
    profiles = {"balanced": ProfileSettings(Weights(0.9, 0.1, 0.0), rank_size=2)}
    return router_artifacts.write_router(root, quality, profiles, output_tokens=20.0, pool_kinds=["code"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ranked")
    pool = write_pool(tmp)
    catalog = {
        name: {"triton_model": "replay", "parameters": {"recorded_model": name},
               "price_in_per_mtok": price, "price_out_per_mtok": price}
        for name, (_, price, _) in MODELS.items()
    }  # fmt: skip
    (tmp / "catalog.json").write_text(json.dumps(catalog))
    server = TritonServer(
        ["replay"],
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        run_dir=tmp,
        model_parameters={"replay": {"pool_paths": str(pool), "time_scale": "0", "tokens_per_chunk": "8"}},
    )
    server.start()
    try:
        server.wait_ready(timeout=180)
        yield {
            "triton_url": server.grpc_url,
            "models_file": str(tmp / "catalog.json"),
            "router_artifact": str(write_router(tmp / "artifacts")),
            "no_ranker": str(tmp / "no-ranker"),
        }
    finally:
        server.stop()


async def ask(address: str) -> list[dispatch_pb2.AskResponse]:
    async with DispatchClient(address) as client:
        request = ask_request(PROMPT, profile=common_pb2.PROFILE_BALANCED)
        async with aclosing(client.ask(request, timeout_s=60)) as stream:
            return [event async for event in stream]


async def test_a_ranked_fan_out_keeps_the_answer_the_ranking_service_puts_first(
    setup: dict[str, Any], dispatch_factory: Any
) -> None:
    config = load_config(RankingConfig, None, port=0, shutdown_grace_s=1.0, artifact=setup["no_ranker"])
    ranker = build_ranker(config, encoder=Encoder(threads=1))
    common = {
        "triton_url": setup["triton_url"],
        "models_file": setup["models_file"],
        "router_artifact": setup["router_artifact"],
        "metrics_port": -1,
        "hedging": False,
    }
    async with running_ranking(config, ranker=ranker) as running:
        ranked = await dispatch_factory(**common, ranking_url=f"127.0.0.1:{running.port}")
        plain = await dispatch_factory(**common)
        with_ranker = await ask(ranked)
        without = await ask(plain)
    plan = next(e.plan.plan for e in with_ranker if e.WhichOneof("event") == "plan")
    assert plan.policy == "rank"
    assert [c.model for c in plan.candidates if c.chosen] == ["chatty", "coder"]  # the cheap two, best record first
    final = with_ranker[-1].final
    assert final.models[0] == "coder" and final.text == MODELS["coder"][2]
    assert "rank" in [s.stage for s in final.stages]
    plain_final = without[-1].final
    assert final.usage.cost_usd > 0
    plain_plan = next(e.plan.plan for e in without if e.WhichOneof("event") == "plan")
    assert plain_plan.policy == "single" and len(plain_final.models) == 1  # no ranker: one model, one bill
    assert "rank" not in [s.stage for s in plain_final.stages]
