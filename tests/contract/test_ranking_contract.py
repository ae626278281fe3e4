"""RankingService contract over real gRPC on loopback, with the real encoder.

Two in-process servers share one loaded encoder: one without a trained ranker (first stage only, as a
fresh install runs) and one with a tiny pair ranker fitted here on synthetic pairs (it ranks, badly,
which is all the contract needs). Nothing is timed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest

from constellation.config import load_config
from constellation.errors import InvalidArgument
from constellation.ml.encoder import Encoder
from constellation.v1 import common_pb2
from services.ranking.client import RankingClient
from services.ranking.config import RankingConfig
from services.ranking.main import build_ranker, running_ranking
from services.ranking.pairwise import SIDE_FEATURES, FitSettings, PairSet, fit_pair_ranker, save_ranker, shared_features
from tests.grpc_checks import SERVING, reflected, serving

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ANSWERS = ["12", "The answer is 12.", "I get 13", "so 12 in total", "7", "maybe 13", "no idea", "12 apples", "9"]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(threads=1)


def _tiny_artifact(root: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 40
    vectors = rng.normal(size=(n, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pairs = PairSet(
        query=vectors[:4],
        embeddings=vectors,
        side=rng.uniform(size=(n, len(SIDE_FEATURES))).astype(np.float32),
        shared=np.tile(shared_features("number", False), (4, 1)),
        group=np.repeat(np.arange(4), 10),
        a=np.arange(0, n, 2),
        b=np.arange(1, n, 2),
        label=np.ones(n // 2, np.float32),
        held_out=np.zeros(n // 2, bool),
    )
    ranker, _ = fit_pair_ranker(pairs, FitSettings(hidden=4, epochs=2))
    saved = save_ranker(ranker, {"note": "synthetic, for the contract test"}, root)
    assert saved.path is not None
    return saved.path


@pytest.fixture(scope="module")
async def servers(encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, str]]:
    """``{"first_stage": address, "pairwise": address}``."""
    root = tmp_path_factory.mktemp("artifacts")
    artifacts = {"first_stage": str(root / "none"), "pairwise": str(_tiny_artifact(root))}
    async with AsyncExitStack() as stack:
        addresses = {}
        for name, artifact in artifacts.items():
            config = load_config(RankingConfig, None, port=0, shutdown_grace_s=1.0, artifact=artifact)
            ranker = build_ranker(config, encoder=encoder)
            running = await stack.enter_async_context(running_ranking(config, ranker=ranker))
            addresses[name] = f"127.0.0.1:{running.port}"
        yield addresses


def _candidates(texts: list[str]) -> list[common_pb2.Candidate]:
    return [common_pb2.Candidate(model=f"model-{i}", text=t) for i, t in enumerate(texts)]


@pytest.mark.parametrize("stage", ["first_stage", "pairwise"])
async def test_rank_returns_every_candidate_once_best_first_pruned_last(servers: dict[str, str], stage: str) -> None:
    async with RankingClient(servers[stage]) as client:
        ranked = await client.rank(
            "Tom has 5 apples and buys 7 more. How many apples does he have?",
            _candidates(ANSWERS),
            common_pb2.ANSWER_KIND_NUMBER,
            timeout_s=60,
        )
    assert sorted(r.candidate.model for r in ranked) == sorted(f"model-{i}" for i in range(len(ANSWERS)))
    assert [r.rank for r in ranked] == list(range(len(ANSWERS)))
    flags = [r.pruned for r in ranked]
    assert flags == sorted(flags) and flags.count(False) == 4  # ceil(0.35 * 9) survivors, then the pruned
    survivors = [r for r in ranked if not r.pruned]
    assert all(r.candidate.text in ("12", "The answer is 12.", "so 12 in total", "12 apples") for r in survivors)
    scores = [r.score for r in survivors]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    by_model = {c.model: c for c in _candidates(ANSWERS)}
    assert all(r.candidate == by_model[r.candidate.model] for r in ranked)  # candidates come back unchanged


async def test_keep_overrides_the_default_and_never_goes_below_two(servers: dict[str, str]) -> None:
    async with RankingClient(servers["pairwise"]) as client:
        three = await client.rank("q?", _candidates(ANSWERS), common_pb2.ANSWER_KIND_NUMBER, keep=3, timeout_s=60)
        one = await client.rank("q?", _candidates(ANSWERS[:3]), common_pb2.ANSWER_KIND_NUMBER, keep=1, timeout_s=60)
        lone = await client.rank("q?", _candidates(["just one"]), timeout_s=60)
    assert [r.pruned for r in three].count(False) == 3
    assert [r.pruned for r in one] == [False, False, True]
    assert len(lone) == 1 and not lone[0].pruned


async def test_invalid_requests_name_the_field(servers: dict[str, str]) -> None:
    async with RankingClient(servers["first_stage"]) as client:
        with pytest.raises(InvalidArgument) as empty:
            await client.rank("  ", [], timeout_s=10)
        with pytest.raises(InvalidArgument) as too_many:
            await client.rank("q?", _candidates(["a"] * 65), timeout_s=10)
    assert empty.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in empty.value.violations] == ["prompt", "candidates"]
    assert [v.field for v in too_many.value.violations] == ["candidates"]
    assert "at most 64" in too_many.value.violations[0].description


async def test_without_a_trained_ranker_the_first_stage_decides_and_logs_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, encoder: Encoder
) -> None:
    config = load_config(RankingConfig, None, port=0, artifact=str(tmp_path / "none"))
    with caplog.at_level(logging.WARNING, logger="services.ranking.main"):
        ranker = build_ranker(config, encoder=encoder)
    assert "first stage alone" in caplog.text and "train ranker" in caplog.text
    assert ranker.stage == "first_stage"


async def test_health_and_reflection(servers: dict[str, str]) -> None:
    address = servers["pairwise"]
    assert await serving(address, ("", "constellation.v1.RankingService")) == [SERVING, SERVING]
    services, output = await reflected(address, "constellation.v1.RankingService", "Rank")
    assert {"constellation.v1.RankingService", "grpc.health.v1.Health"} <= services
    assert output == "constellation.v1.RankResponse"
