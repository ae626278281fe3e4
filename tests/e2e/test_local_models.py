"""Gemma-3-270M through the session's Triton: loaded over model control beside SmolLM2, a few greedy
tokens of plain completion, then unloaded (the same generic model.py, configured for a base model).

The first run on a machine converts the GGUF (about 45 s idle, 2 minutes on a busy 2-core machine);
later runs load the cached checkpoint in about 10 s. Skipped when the Gemma packages are not installed
and no converted checkpoint is cached.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator

import pytest
from tritonclient.grpc.aio import InferenceServerClient

from services.inference import checkpoints
from services.inference.launcher import TritonServer
from tests.e2e.test_inference import generate

MODEL = "gemma3_270m"


@pytest.fixture
async def gemma(triton: TritonServer) -> AsyncIterator[InferenceServerClient]:
    """Loads ``gemma3_270m`` into the running Triton (converting its weights first, once); unloads it after."""
    spec = checkpoints.GEMMA3_270M
    if not checkpoints.is_converted(spec, triton.cache_dir) and importlib.util.find_spec(spec.package) is None:
        pytest.skip(f"package {spec.package} is not installed and no converted checkpoint is cached")
    checkpoints.ensure_checkpoint(spec, triton.cache_dir)
    client = InferenceServerClient(triton.grpc_url)
    try:
        await client.load_model(MODEL)
        yield client
    finally:
        await client.unload_model(MODEL)
        await client.close()


async def test_gemma_continues_text_through_triton(gemma: InferenceServerClient) -> None:
    assert await gemma.is_model_ready(MODEL)
    out = await generate(gemma, "The capital of France is", sampling={"max_tokens": 4, "temperature": 0}, model=MODEL)
    assert out.error is None, out.error
    assert out.finish_reason in ("length", "stop")
    assert 1 <= (out.num_output_tokens or 0) <= 4
    assert out.num_input_tokens and out.num_input_tokens < 10  # plain completion: no chat template around it
    assert len(out.deltas) >= 2 and out.text.strip()  # streamed token by token; a base model continues the text
