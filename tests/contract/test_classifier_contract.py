"""ClassifierService contract over real gRPC on loopback, with the real encoder.

Two in-process servers share one loaded encoder: one without a trained artifact (keyword path only, as
a fresh install runs) and one with small heads fitted here on synthetic features (so the hybrid policy
has an encoder answer to fall back on). Nothing is timed.
"""

from __future__ import annotations

import asyncio
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
from services.classifier.classify import Classifier, Policy
from services.classifier.client import ClassifierClient
from services.classifier.config import ClassifierConfig
from services.classifier.heads import TrainingSettings, fit_heads, load_artifact, save_artifact
from services.classifier.labels import ANSWER_KINDS, COMPLEXITIES, TASKS
from services.classifier.main import build_classifier, running_classifier
from services.classifier.rules import KeywordRules
from tests.grpc_checks import SERVING, reflected, serving

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(threads=1)


def _synthetic_artifact(root: Path) -> Path:
    """Heads fitted on random features: they answer (badly), which is all the contract needs."""
    rng = np.random.default_rng(0)
    rows = 70
    x = rng.normal(size=(rows, 387)).astype(np.float32)
    targets = {
        "task": [TASKS[i % len(TASKS)] for i in range(rows)],
        "complexity": [COMPLEXITIES[i % 3] for i in range(rows)],
        "answer_kind": [ANSWER_KINDS[i % 4] for i in range(rows)],
        "log_output_tokens": list(np.log1p(rng.integers(1, 400, size=rows)).astype(float)),
    }
    heads, _ = fit_heads(x, targets, [f"row/{i}" for i in range(rows)], TrainingSettings(hidden=8, epochs=3))
    manifest = {"encoder": {"max_tokens": 128, "head_tokens": 96, "quantized": False}, "note": "synthetic"}
    artifact = save_artifact(heads, manifest, root)
    assert artifact.path is not None
    return artifact.path


@pytest.fixture(scope="module")
async def servers(encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, str]]:
    """``{"keyword": address, "hybrid": address}``."""
    root = tmp_path_factory.mktemp("artifacts")
    artifact = load_artifact(_synthetic_artifact(root))
    config = load_config(ClassifierConfig, None, port=0, shutdown_grace_s=1.0)
    rules = KeywordRules()
    async with AsyncExitStack() as stack:
        addresses = {}
        for name, heads in (("keyword", None), ("hybrid", artifact)):
            classifier = await stack.enter_async_context(
                Classifier(rules, encoder=encoder, artifact=heads, policy=Policy())
            )
            running = await stack.enter_async_context(running_classifier(config, classifier=classifier))
            addresses[name] = f"127.0.0.1:{running.port}"
        yield addresses


async def test_classify_returns_every_field(servers: dict[str, str]) -> None:
    async with ClassifierClient(servers["keyword"]) as client:
        result = await client.classify("Write a Python function that reverses a string.", timeout_s=30)
    assert result.task == common_pb2.TASK_TYPE_CODE
    assert result.answer_kind == common_pb2.ANSWER_KIND_CODE
    assert result.complexity != common_pb2.COMPLEXITY_UNSPECIFIED
    assert 0 < result.task_confidence <= 1 and 0 < result.complexity_confidence <= 1
    assert result.expected_output_tokens >= 1
    assert result.decided_by == "keyword"
    assert len(result.embedding) == 384
    assert abs(float(np.linalg.norm(np.asarray(result.embedding))) - 1.0) < 1e-3
    assert result.truncated is False
    assert result.domain == "programming"


async def test_embedding_can_be_omitted_and_matches_the_encoder(servers: dict[str, str], encoder: Encoder) -> None:
    prompt = "What is the boiling point of water?"
    async with ClassifierClient(servers["keyword"]) as client:
        without = await client.classify(prompt, timeout_s=30, omit_embedding=True)
        with_embedding = await client.classify(prompt, timeout_s=30)
    assert len(without.embedding) == 0
    expected = await asyncio.to_thread(lambda: encoder.encode([prompt]).embeddings[0])
    assert np.allclose(np.asarray(with_embedding.embedding), expected, atol=1e-5)


async def test_batch_keeps_request_order(servers: dict[str, str]) -> None:
    prompts = [
        "What is 12*12?",
        "Write a haiku about the sea.",
        "Which is a mammal?\nA) Shark\nB) Whale\nC) Trout",
        "Implement quicksort in Python.",
    ] * 3
    expected = [common_pb2.TASK_TYPE_MATH, common_pb2.TASK_TYPE_WRITING, common_pb2.TASK_TYPE_MULTIPLE_CHOICE,
                common_pb2.TASK_TYPE_CODE] * 3  # fmt: skip
    async with ClassifierClient(servers["keyword"]) as client:
        results = await client.classify_batch(prompts, timeout_s=60)
        singles = await asyncio.gather(*(client.classify(p, timeout_s=60) for p in prompts))
    assert [r.task for r in results] == expected
    assert [r.task for r in singles] == expected
    for batched, single in zip(results, singles, strict=True):
        assert np.allclose(batched.embedding, single.embedding, atol=1e-5)


async def test_empty_prompt_is_invalid_argument_naming_the_field(servers: dict[str, str]) -> None:
    async with ClassifierClient(servers["keyword"]) as client:
        for prompt in ("", "   \n"):
            with pytest.raises(InvalidArgument) as caught:
                await client.classify(prompt, timeout_s=10)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert [v.field for v in caught.value.violations] == ["prompt"]
        with pytest.raises(InvalidArgument) as batch_error:
            await client.classify_batch(["fine", "", "also fine", " "], timeout_s=10)
    assert [v.field for v in batch_error.value.violations] == ["requests[1].prompt", "requests[3].prompt"]


async def test_over_long_prompt_is_truncated_and_says_so(servers: dict[str, str]) -> None:
    long_prompt = "Summarize the following notes. " + "The committee met and discussed the budget. " * 400
    async with ClassifierClient(servers["keyword"]) as client:
        long_result = await client.classify(long_prompt, timeout_s=30)
        short_result = await client.classify("Summarize the following notes.", timeout_s=30)
    assert long_result.truncated is True
    assert short_result.truncated is False
    assert len(long_result.embedding) == 384


async def test_hybrid_asks_the_heads_only_when_the_rules_are_unsure(servers: dict[str, str]) -> None:
    async with ClassifierClient(servers["hybrid"]) as client:
        sure = await client.classify("Write a python function to add two numbers.", timeout_s=30)
        unsure = await client.classify("zebra quantum lemonade", timeout_s=30, omit_embedding=True)
    assert sure.decided_by == "keyword" and sure.task == common_pb2.TASK_TYPE_CODE
    assert unsure.decided_by == "encoder"
    assert len(unsure.embedding) == 0


async def test_without_artifact_the_keyword_path_decides_and_logs_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, encoder: Encoder
) -> None:
    config = load_config(ClassifierConfig, None, port=0, shutdown_grace_s=1.0, artifact=str(tmp_path / "none"))
    with caplog.at_level(logging.WARNING, logger="services.classifier.main"):
        classifier = build_classifier(config, encoder=encoder)
    assert "keyword path only" in caplog.text and "train classifier" in caplog.text
    async with classifier, running_classifier(config, classifier=classifier) as running:
        async with ClassifierClient(f"127.0.0.1:{running.port}") as client:
            unmatched = await client.classify("zebra quantum lemonade", timeout_s=10)
            decided = await client.classify("What is 3+4?", timeout_s=10, omit_embedding=True)
    assert unmatched.decided_by == "default" and len(unmatched.embedding) == 384
    assert decided.decided_by == "keyword" and decided.task == common_pb2.TASK_TYPE_MATH


async def test_encoder_can_be_switched_off() -> None:
    config = load_config(ClassifierConfig, None, port=0, shutdown_grace_s=1.0, encoder=False)
    classifier = build_classifier(config)
    async with classifier, running_classifier(config, classifier=classifier) as running:
        async with ClassifierClient(f"127.0.0.1:{running.port}") as client:
            result = await client.classify("Write a limerick about a cat.", timeout_s=10)
    assert result.task == common_pb2.TASK_TYPE_WRITING and len(result.embedding) == 0
    assert result.truncated is False


async def test_a_big_batch_is_bounded_and_does_not_hold_up_single_calls(encoder: Encoder) -> None:
    """A concurrent Classify finishes long before a maximum-size batch (measured; printed with -s)."""
    config = load_config(
        ClassifierConfig, None, port=0, shutdown_grace_s=1.0, batch_max_size=16, max_batch_requests=512
    )
    classifier = Classifier(KeywordRules(), encoder=encoder, max_batch=config.batch_max_size)
    prompts = [f"Tell me one fact about the number {i}." for i in range(config.max_batch_requests)]
    async with classifier, running_classifier(config, classifier=classifier) as running:
        async with ClassifierClient(f"127.0.0.1:{running.port}") as client:
            with pytest.raises(InvalidArgument) as too_big:
                await client.classify_batch([*prompts, "one too many"], timeout_s=10)
            assert [v.field for v in too_big.value.violations] == ["requests"]
            assert "512" in too_big.value.violations[0].description
            await client.classify("warm up", timeout_s=30)
            loop = asyncio.get_running_loop()
            started = loop.time()
            batch = asyncio.ensure_future(client.classify_batch(prompts, timeout_s=300))
            await asyncio.sleep(0.2)  # the batch is queued and the encoder is busy with it
            single_started = loop.time()
            single = await client.classify("Write a Python function that reverses a string.", timeout_s=300)
            single_s = loop.time() - single_started
            single_done = not batch.done()
            results = await batch
            batch_s = loop.time() - started
    print(f"\n{len(prompts)}-prompt batch: {batch_s:.2f} s; concurrent single Classify: {single_s:.3f} s")
    assert single.task == common_pb2.TASK_TYPE_CODE and len(results) == len(prompts)
    assert single_done, "the single call waited for the whole batch"
    assert single_s < batch_s / 3


async def test_health_and_reflection(servers: dict[str, str]) -> None:
    address = servers["keyword"]
    assert await serving(address, ("", "constellation.v1.ClassifierService")) == [SERVING, SERVING]
    services, output = await reflected(address, "constellation.v1.ClassifierService", "ClassifyBatch")
    assert {"constellation.v1.ClassifierService", "grpc.health.v1.Health"} <= services
    assert output == "constellation.v1.ClassifyBatchResponse"


def test_main_help_teaches_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from services.classifier.main import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--policy" in text and "constellation train classifier" in text
