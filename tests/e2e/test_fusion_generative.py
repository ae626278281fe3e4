"""Generative fusion against a real Triton serving the real SmolLM2-135M-Instruct (``smollm2``).

A fusion server runs in-process on port 0, pointed at the session's Triton. Generations are short
(max_tokens 48, greedy) so each test takes a few seconds once the model is loaded. Nothing is timed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from constellation.config import load_config
from constellation.v1 import common_pb2, fusion_pb2
from services.fusion.client import FusionClient
from services.fusion.config import FusionConfig
from services.fusion.main import running_fusion
from services.inference.launcher import TritonServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

QUESTION = "What is the capital of France?"
CANDIDATES = [
    common_pb2.ScoredCandidate(
        candidate=common_pb2.Candidate(model="a", text="The capital of France is Paris.", reliability=0.9), rank=0
    ),
    common_pb2.ScoredCandidate(
        candidate=common_pb2.Candidate(model="b", text="Paris is France's capital, on the Seine.", reliability=0.8),
        rank=1,
    ),
]
SAMPLING = common_pb2.SamplingParams(max_tokens=48, temperature=0.0)


@pytest.fixture
async def fusion(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    config = load_config(
        FusionConfig,
        None,
        port=0,
        shutdown_grace_s=1.0,
        triton_url=triton.grpc_url,
        fuser_models=["not_loaded_in_triton"],
        artifact=str(tmp_path_factory.mktemp("no-artifact")),
    )
    async with running_fusion(config) as running:
        yield f"127.0.0.1:{running.port}"


async def _fuse(address: str, fuser_model: str) -> tuple[list[str], fusion_pb2.FuseSummary]:
    deltas: list[str] = []
    summaries: list[fusion_pb2.FuseSummary] = []
    async with FusionClient(address) as client:
        async for response in client.fuse(
            QUESTION, CANDIDATES, common_pb2.ANSWER_KIND_OPEN, fuser_model, SAMPLING, timeout_s=120
        ):
            if response.WhichOneof("event") == "delta":
                assert not summaries
                deltas.append(response.delta.text)
            else:
                summaries.append(response.summary)
    assert len(summaries) == 1
    return deltas, summaries[0]


async def test_fuses_two_open_candidates_into_a_streamed_answer(fusion: str) -> None:
    deltas, summary = await _fuse(fusion, "smollm2")
    assert summary.method == "generative"
    assert len(deltas) >= 3, deltas
    assert "".join(deltas).rstrip() == summary.text
    assert summary.text.strip()
    assert "Paris" in summary.text
    assert summary.usage.input_tokens > 50  # the instructions and both candidates reached the model
    assert 1 <= summary.usage.output_tokens <= 48


async def test_an_offered_fuser_missing_from_triton_falls_back_to_the_top_candidate(fusion: str) -> None:
    deltas, summary = await _fuse(fusion, "not_loaded_in_triton")
    assert summary.method == "top_candidate"
    assert "".join(deltas) == summary.text == "The capital of France is Paris."
    assert summary.usage.output_tokens == 0
