"""FusionService contract over real gRPC on loopback: a real in-process aio server on port 0.

No Triton runs here: the server's ``triton_url`` points at a loopback port nobody listens on, so open
answers exercise the fallback path for real (the fuser call fails with UNAVAILABLE and the top
candidate is returned). Generative fusion against a real Triton is in tests/e2e/test_fusion_generative.py.
Nothing is timed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from constellation.config import load_config
from constellation.errors import InvalidArgument
from constellation.net import free_port
from constellation.v1 import common_pb2, fusion_pb2
from services.fusion.client import FusionClient
from services.fusion.config import FusionConfig
from services.fusion.main import running_fusion
from services.fusion.servicer import SERVICE_NAME
from tests.grpc_checks import SERVING, reflected, serving

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
async def address(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    # An empty artifact directory: the service runs uncalibrated, as a fresh install does.
    config = load_config(
        FusionConfig,
        None,
        port=0,
        shutdown_grace_s=1.0,
        triton_url=f"127.0.0.1:{free_port()}",
        artifact=str(tmp_path_factory.mktemp("no-artifact")),
    )
    async with running_fusion(config) as running:
        yield f"127.0.0.1:{running.port}"


def _scored(model: str, text: str, reliability: float, rank: int, answer: str = "") -> common_pb2.ScoredCandidate:
    return common_pb2.ScoredCandidate(
        candidate=common_pb2.Candidate(model=model, text=text, normalized_answer=answer, reliability=reliability),
        score=1.0 - rank / 10,
        rank=rank,
    )


async def _collect(address: str, **kwargs: object) -> tuple[list[str], list[fusion_pb2.FuseSummary]]:
    deltas: list[str] = []
    summaries: list[fusion_pb2.FuseSummary] = []
    async with FusionClient(address) as client:
        async for response in client.fuse(timeout_s=30, **kwargs):  # type: ignore[arg-type]
            kind = response.WhichOneof("event")
            assert not summaries, f"a {kind} came after the summary"
            if kind == "delta":
                deltas.append(response.delta.text)
            else:
                summaries.append(response.summary)
    return deltas, summaries


async def test_closed_answer_streams_the_vote_then_one_summary(address: str) -> None:
    candidates = [
        _scored("big", '{"reasoning": "6 * 7", "answer": "42"}', 0.95, 0),
        _scored("mid", "It is 41.", 0.6, 1),
        _scored("small", "so the answer is 41", 0.6, 2),
        _scored("other", "", 0.9, 3, answer="42.0"),
    ]
    deltas, (summary,) = await _collect(
        address, prompt="What is 6 times 7?", candidates=candidates, answer_kind=common_pb2.ANSWER_KIND_NUMBER
    )
    assert "".join(deltas) == summary.text == candidates[0].candidate.text
    assert summary.method == "vote"
    assert summary.agreement.answer == "42"
    assert (summary.agreement.votes_for, summary.agreement.votes_total) == (2, 4)
    assert summary.agreement.weighted_share > 0.5
    # Uncalibrated (no artifact): confidence is the weighted share.
    assert summary.confidence == pytest.approx(summary.agreement.weighted_share)
    assert summary.uncertain is False
    assert summary.usage.input_tokens == 0


async def test_choice_vote_with_disagreement_is_flagged(address: str) -> None:
    candidates = [_scored(f"m{i}", letter, 0.7, i) for i, letter in enumerate("ABCD")]
    _, (summary,) = await _collect(address, prompt="", candidates=candidates, answer_kind=common_pb2.ANSWER_KIND_CHOICE)
    assert summary.agreement.answer == "A"
    assert summary.uncertain is True


async def test_open_answer_falls_back_to_the_top_candidate_when_the_fuser_is_unreachable(address: str) -> None:
    candidates = [
        _scored("second", "Paris, on the Seine.", 0.7, 1),
        _scored("first", "The capital of France is Paris.", 0.9, 0),
    ]
    deltas, (summary,) = await _collect(
        address,
        prompt="What is the capital of France?",
        candidates=candidates,
        answer_kind=common_pb2.ANSWER_KIND_OPEN,
        sampling=common_pb2.SamplingParams(max_tokens=16),
    )
    assert summary.method == "top_candidate"
    assert "".join(deltas) == summary.text == "The capital of France is Paris."
    assert summary.confidence == pytest.approx(0.9)
    assert not summary.HasField("agreement")


async def test_code_answer_is_the_top_candidate(address: str) -> None:
    candidates = [_scored("a", "def f():\n    return 1", 0.8, 0), _scored("b", "def f(): return 2", 0.9, 1)]
    deltas, (summary,) = await _collect(
        address, prompt="f", candidates=candidates, answer_kind=common_pb2.ANSWER_KIND_CODE
    )
    assert summary.method == "top_candidate"
    assert "".join(deltas) == summary.text == "def f():\n    return 1"


async def test_bad_requests_are_invalid_argument_with_field_violations(address: str) -> None:
    with pytest.raises(InvalidArgument) as no_candidates:
        await _collect(address, prompt="q", candidates=[], answer_kind=common_pb2.ANSWER_KIND_UNSPECIFIED)
    assert no_candidates.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in no_candidates.value.violations} == {"answer_kind", "candidates"}

    with pytest.raises(InvalidArgument) as bad_fields:
        await _collect(
            address,
            prompt="",
            candidates=[_scored("a", "x", 1.5, 0), _scored("b", "", 0.5, 1)],
            answer_kind=common_pb2.ANSWER_KIND_OPEN,
            sampling=common_pb2.SamplingParams(max_tokens=5000, temperature=3.0),
        )
    assert {v.field for v in bad_fields.value.violations} == {
        "candidates[0].candidate.reliability",
        "candidates[1].candidate.text",
        "prompt",
        "sampling.max_tokens",
        "sampling.temperature",
    }


async def test_an_unknown_fuser_model_is_invalid_argument_naming_the_field(address: str) -> None:
    candidates = [_scored("a", "The capital of France is Paris.", 0.9, 0)]
    with pytest.raises(InvalidArgument) as caught:
        await _collect(
            address,
            prompt="What is the capital of France?",
            candidates=candidates,
            answer_kind=common_pb2.ANSWER_KIND_OPEN,
            fuser_model="no_such_model",
        )
    assert [v.field for v in caught.value.violations] == ["fuser_model"]
    assert "smollm2" in caught.value.violations[0].description  # what the caller may name instead
    # The default named explicitly is allowed (and falls back here, where no Triton listens).
    _, (summary,) = await _collect(
        address,
        prompt="What is the capital of France?",
        candidates=candidates,
        answer_kind=common_pb2.ANSWER_KIND_OPEN,
        fuser_model="smollm2",
    )
    assert summary.method == "top_candidate"


async def test_health_and_reflection(address: str) -> None:
    assert await serving(address, ("", SERVICE_NAME)) == [SERVING, SERVING]
    services, output = await reflected(address, SERVICE_NAME, "Fuse")
    assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
    assert output == "constellation.v1.FuseResponse"
