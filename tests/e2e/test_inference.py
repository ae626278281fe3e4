"""End-to-end tests of the smollm2 Triton model over gRPC streaming (tritonclient.grpc.aio).

All generations are short (max_tokens <= 32, except the cancelled one) so the file runs in well under a
minute once the model is loaded. Wall-clock waits are generous upper bounds, never pass/fail timings.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import InferInput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from services.inference.launcher import TritonServer
from tests.e2e.triton_metrics import generations as _generations
from tests.e2e.triton_metrics import in_flight as _in_flight
from tests.e2e.triton_metrics import scrape as _metrics
from tests.e2e.triton_metrics import tokens as _tokens

MODEL = "smollm2"
FRANCE = "What is the capital of France?"


@dataclass
class Generation:
    """What one request produced."""

    deltas: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    error: InferenceServerException | None = None

    @property
    def text(self) -> str:
        return "".join(self.deltas)


def _inputs(prompt: str, stream: bool, sampling: dict[str, Any] | None) -> list[InferInput]:
    text = InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    stream_input = InferInput("stream", [1], "BOOL")
    stream_input.set_data_from_numpy(np.array([stream], dtype=bool))
    inputs = [text, stream_input]
    if sampling is not None:
        params = InferInput("sampling_parameters", [1], "BYTES")
        params.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=np.object_))
        inputs.append(params)
    return inputs


async def generate(
    client: InferenceServerClient,
    prompt: str,
    *,
    stream: bool = True,
    sampling: dict[str, Any] | None = None,
    cancel_after: int | None = None,
    model: str = MODEL,
) -> Generation:
    """Send one request on its own stream and read until the final response (or cancel the stream)."""

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": model, "inputs": _inputs(prompt, stream, sampling), "request_id": uuid.uuid4().hex}

    out = Generation()
    responses = client.stream_infer(requests())
    async with asyncio.timeout(120):
        async for result, error in responses:
            if error is not None:
                out.error = error
                break
            out.deltas.append(result.as_numpy("text_output")[0].decode())
            out.num_input_tokens = int(result.as_numpy("num_input_tokens")[0])
            out.num_output_tokens = int(result.as_numpy("num_output_tokens")[0])
            out.finish_reason = result.as_numpy("finish_reason")[0].decode()
            if cancel_after is not None and len(out.deltas) >= cancel_after:
                responses.cancel()
                return out
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        # Let Triton end the RPC itself. Abandoning the stream right after the final response (closing the
        # channel) makes Triton 2.51's gRPC frontend wait forever for a cancellation callback, which keeps
        # the model from unloading: shutdown then runs into --exit-timeout-secs and aborts.
        leftover = [item async for item in responses]
    assert leftover == [], f"responses after the final one: {leftover}"
    return out


@pytest.fixture
async def client(triton: TritonServer) -> AsyncIterator[InferenceServerClient]:
    c = InferenceServerClient(triton.grpc_url)
    try:
        yield c
    finally:
        await c.close()


async def test_streamed_deltas_answer_the_question(client: InferenceServerClient) -> None:
    streamed = await generate(client, FRANCE, sampling={"temperature": 0, "max_tokens": 32})
    assert streamed.error is None
    assert len(streamed.deltas) >= 3, streamed.deltas
    assert "Paris" in streamed.text
    assert streamed.finish_reason == "stop"
    assert streamed.num_input_tokens and streamed.num_input_tokens > 5
    assert streamed.num_output_tokens and 1 <= streamed.num_output_tokens <= 32

    whole = await generate(client, FRANCE, stream=False, sampling={"temperature": 0, "max_tokens": 32})
    assert len(whole.deltas) == 1
    assert whole.text == streamed.text
    assert whole.finish_reason == "stop"
    assert whole.num_output_tokens == streamed.num_output_tokens


async def test_same_seed_same_text(client: InferenceServerClient) -> None:
    sampling = {"temperature": 0.8, "seed": 1234, "max_tokens": 24}
    prompt = "Tell me something about cats."
    first = await generate(client, prompt, sampling=sampling)
    second = await generate(client, prompt, sampling=sampling)
    assert first.error is None and second.error is None
    assert first.text and first.text == second.text
    assert first.num_output_tokens == second.num_output_tokens


async def test_max_tokens_is_respected(client: InferenceServerClient) -> None:
    out = await generate(client, "Write a long story about a dragon.", sampling={"temperature": 0, "max_tokens": 5})
    assert out.error is None
    assert out.finish_reason == "length"
    assert out.num_output_tokens == 5
    assert out.text


async def test_stop_string_ends_generation(client: InferenceServerClient) -> None:
    prompt = "Describe the city of Paris in two sentences."
    greedy = {"temperature": 0, "max_tokens": 32}
    baseline = await generate(client, prompt, sampling=greedy)
    assert len(baseline.text) > 20, baseline.text
    middle = len(baseline.text) // 2
    stop = baseline.text[middle : middle + 4]
    expected = baseline.text[: baseline.text.find(stop)]
    assert expected, "the stop string must not be at the start"

    out = await generate(client, prompt, sampling={**greedy, "stop": ["\n\n\n\n", stop]})
    assert out.error is None
    assert out.finish_reason == "stop"
    assert out.text == expected
    assert stop not in out.text
    assert out.num_output_tokens is not None and baseline.num_output_tokens is not None
    assert out.num_output_tokens < baseline.num_output_tokens


@pytest.mark.parametrize(
    ("prompt", "sampling", "fragment"),
    [
        (FRANCE, {"temperature": 3.5}, "sampling_parameters.temperature must be in [0, 2], got 3.5"),
        (FRANCE, {"top_p": 0}, "sampling_parameters.top_p"),
        (FRANCE, {"max_tokens": 0}, "sampling_parameters.max_tokens"),
        (FRANCE, {"stop": [""]}, "sampling_parameters.stop"),
        (FRANCE, {"temprature": 0.5}, "temprature"),
        ("", None, "text_input"),
    ],
)
async def test_invalid_input_is_an_error(
    client: InferenceServerClient, prompt: str, sampling: dict[str, Any] | None, fragment: str
) -> None:
    out = await generate(client, prompt, sampling=sampling)
    assert out.error is not None
    assert fragment in str(out.error)
    assert out.deltas == []


async def test_cancel_stops_generation_inside_triton(client: InferenceServerClient, triton: TritonServer) -> None:
    before = _metrics(triton)
    assert _in_flight(before) == 0
    out = await generate(
        client, "Write a long story about a dragon.", sampling={"temperature": 0, "max_tokens": 400}, cancel_after=3
    )
    assert out.error is None and len(out.deltas) == 3

    deadline = time.monotonic() + 10
    while True:
        now = await asyncio.to_thread(_metrics, triton)
        if _in_flight(now) == 0:
            break
        assert time.monotonic() < deadline, "generation still in flight 10 s after the cancel"
        await asyncio.sleep(0.1)
    assert _generations(now, "cancelled") == _generations(before, "cancelled") + 1
    await asyncio.sleep(1.0)
    later = await asyncio.to_thread(_metrics, triton)
    assert _tokens(later) == _tokens(now), "tokens are still being generated after the cancel"
    assert _tokens(later) - _tokens(before) < 400
