"""Models that follow the TensorRT-LLM ensemble's convention (``trtllm_echo``) and the vLLM backend's
(``vllm_echo``) stream through the Triton client and through dispatch like smollm2 does: real Triton, real
dispatch server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from constellation.client import DispatchClient, ask_request
from constellation.triton import Sampling, TritonClient
from services.dispatch.config import ModelEntry
from services.inference.launcher import TritonServer

PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture
async def trtllm_echo(triton: TritonServer) -> AsyncIterator[TritonClient]:
    """The session's Triton with ``trtllm_echo`` loaded for the test, unloaded after it."""
    async with TritonClient(triton.grpc_url, control_timeout_s=60) as client:  # unloads are slow on a busy machine
        await client.load("trtllm_echo", timeout_s=120)
        try:
            yield client
        finally:
            await client.unload("trtllm_echo")


async def test_client_streams_a_tensorrtllm_model_token_by_token(trtllm_echo: TritonClient) -> None:
    stream = trtllm_echo.stream(
        "trtllm_echo", PROMPT, Sampling(max_tokens=5, temperature=0.0), timeout_s=30, convention="tensorrtllm"
    )
    async with stream as chunks:
        received = [chunk async for chunk in chunks]
    texts = [c.text for c in received if c.text]
    assert texts == ["the", " quick", " brown", " fox", " jumps"]
    assert received[-1].final and received[-1].finish_reason == "length"
    assert received[-1].output_tokens == 5


async def test_client_reports_stop_when_the_model_ends_before_max_tokens(trtllm_echo: TritonClient) -> None:
    stream = trtllm_echo.stream(
        "trtllm_echo", "two words", Sampling(max_tokens=50), timeout_s=30, convention="tensorrtllm"
    )
    async with stream as chunks:
        received = [chunk async for chunk in chunks]
    assert "".join(c.text for c in received) == "two words"
    assert received[-1].finish_reason == "stop"


@pytest.fixture
async def vllm_echo(triton: TritonServer) -> AsyncIterator[TritonClient]:
    """The session's Triton with ``vllm_echo`` loaded for the test, unloaded after it."""
    async with TritonClient(triton.grpc_url, control_timeout_s=60) as client:  # unloads are slow on a busy machine
        await client.load("vllm_echo", timeout_s=120)
        try:
            yield client
        finally:
            await client.unload("vllm_echo")


async def test_client_streams_a_vllm_model_token_by_token(vllm_echo: TritonClient) -> None:
    stream = vllm_echo.stream("vllm_echo", PROMPT, Sampling(max_tokens=3, top_p=0.9), timeout_s=30, convention="vllm")
    async with stream as chunks:
        received = [chunk async for chunk in chunks]
    assert [c.text for c in received if c.text] == ["the", " quick", " brown"]
    assert received[-1].final and received[-1].finish_reason == "length"


async def test_the_default_convention_is_refused_by_a_tensorrtllm_model(trtllm_echo: TritonClient) -> None:
    from constellation.errors import ConstellationError

    # Which error class Triton's message maps to is the error mapping's business; the message names the input.
    with pytest.raises(ConstellationError, match="unexpected inference input 'sampling_parameters'"):
        async with trtllm_echo.stream("trtllm_echo", PROMPT, Sampling(max_tokens=3), timeout_s=30) as chunks:
            [chunk async for chunk in chunks]


async def test_dispatch_streams_from_a_tensorrtllm_model(dispatch_factory, trtllm_echo: TritonClient) -> None:  # type: ignore[no-untyped-def]
    entry = ModelEntry(convention="tensorrtllm", price_out_per_mtok=2.0)
    address = await dispatch_factory(
        triton_url=trtllm_echo.url, models={"trtllm_echo": entry}, default_model="trtllm_echo", routing=False
    )
    deltas: list[str] = []
    final = None
    async with DispatchClient(address) as client:
        async for event in client.ask(ask_request(PROMPT, model="trtllm_echo", max_tokens=4), timeout_s=60):
            kind = event.WhichOneof("event")
            if kind == "delta":
                deltas.append(event.delta.text)
            elif kind == "final":
                final = event.final
    assert deltas == ["the", " quick", " brown", " fox"]
    assert final is not None
    assert final.text == "the quick brown fox"
    assert final.models == ["trtllm_echo"]
    assert final.usage.output_tokens == 4
    assert final.usage.cost_usd == pytest.approx(4 * 2.0 / 1e6)
