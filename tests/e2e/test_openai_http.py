"""The OpenAI-compatible HTTP API end to end, driven by the official ``openai`` client: a real Dispatcher
(built as dispatch's main builds it) over a real Triton serving SmolLM2, the HTTP app on loopback port 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from constellation.config import load_config
from services.dispatch.config import DispatchConfig, ModelEntry
from services.dispatch.http import SemanticCache, create_http_app, running_http
from services.dispatch.main import dispatcher_for
from services.inference.launcher import TritonServer
from tests.e2e.test_ask import wait_idle
from tests.e2e.triton_metrics import generations, scrape

PRICE = ModelEntry(price_in_per_mtok=1.0, price_out_per_mtok=2.0)
QUESTION = "What is the capital of France?"


@pytest.fixture
async def base_url(triton: TritonServer) -> AsyncIterator[str]:
    config = load_config(
        DispatchConfig, None, port=0, triton_url=triton.grpc_url, models={"smollm2": PRICE}, routing=False
    )
    async with dispatcher_for(config) as dispatcher:
        app = create_http_app(dispatcher, cache=SemanticCache(None))
        async with running_http(app) as http:
            yield f"http://127.0.0.1:{http.port}/v1"


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        yield client


def extension(completion: Any) -> dict[str, Any]:
    extra = completion.model_extra or {}
    assert "constellation" in extra, extra
    return dict(extra["constellation"])


async def test_chat_answers_with_usage_cost_and_the_constellations_facts(client: openai.AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="smollm2", messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0
    )
    completion = raw.parse()
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.model == "smollm2"
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    cost = (usage.model_extra or {})["cost_usd"]
    assert cost == pytest.approx((usage.prompt_tokens * 1.0 + usage.completion_tokens * 2.0) / 1e6)
    facts = extension(completion)
    assert facts["plan"]["policy"] == "requested"
    assert [m["model"] for m in facts["plan"]["members"]] == ["smollm2"]
    assert facts["models"] == ["smollm2"] and facts["uncertain"] is False
    assert len(facts["trace_id"]) == 32 and facts["cache"] == {"hit": False}
    assert raw.headers["x-constellation-trace-id"] == facts["trace_id"]
    assert raw.headers["x-constellation-members"] == "smollm2"
    assert raw.headers["x-constellation-cache"] == "miss"


async def test_streaming_sends_chunks_then_usage_and_the_same_text_as_a_plain_call(client: openai.AsyncOpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": QUESTION},
    ]
    plain = await client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    stream = await client.chat.completions.create(
        model="smollm2",
        messages=messages,
        max_tokens=24,
        temperature=0,
        seed=1,  # another cache key than the plain call: this one must reach the model
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, reasons, usage, facts = [], [], None, []
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.model_extra and "constellation" in chunk.model_extra:
            facts.append(chunk.model_extra["constellation"])
    assert len([p for p in pieces if p]) >= 3, pieces
    assert "".join(pieces) == plain.choices[0].message.content
    assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])
    assert usage is not None and usage.completion_tokens > 0
    assert facts[0]["plan"]["members"][0]["model"] == "smollm2"
    assert facts[-1]["models"] == ["smollm2"] and facts[-1]["cache"] == {"hit": False}


async def test_a_repeated_greedy_request_is_answered_from_the_cache(client: openai.AsyncOpenAI) -> None:
    def ask(text: str) -> Any:
        return client.chat.completions.with_raw_response.create(
            model="smollm2", messages=[{"role": "user", "content": text}], max_tokens=12, temperature=0
        )

    first = await ask("Name a primary colour.")
    again = await ask("  please, name a PRIMARY colour  ")
    assert first.headers["x-constellation-cache"] == "miss"
    assert again.headers["x-constellation-cache"] == "exact"
    hit = again.parse()
    assert hit.choices[0].message.content == first.parse().choices[0].message.content
    assert hit.usage is not None and hit.usage.completion_tokens == 0
    assert extension(hit)["cache"]["original_trace_id"] == extension(first.parse())["trace_id"]


async def test_models_lists_the_pool_and_the_profile_models(client: openai.AsyncOpenAI) -> None:
    ids = [model.id async for model in client.models.list()]
    assert "smollm2" in ids
    assert {"constellation/quality", "constellation/balanced", "constellation/cost", "constellation/speed"} <= set(ids)
    assert (await client.models.retrieve("constellation/cost")).id == "constellation/cost"


async def test_a_profile_model_routes_over_the_pool(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="constellation/cost", messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0
    )
    facts = extension(completion)
    assert facts["plan"]["profile"] == "cost" and facts["models"] == ["smollm2"]
    assert completion.model == "constellation/cost"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
async def test_unsupported_parameters_are_refused_with_400_naming_them(
    client: openai.AsyncOpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}], **extra)
    assert caught.value.status_code == 400
    assert caught.value.code == "unsupported_parameter"
    assert caught.value.param == param
    assert param in caught.value.message


async def test_an_unknown_model_is_404_in_the_openai_error_shape(base_url: str, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-nonexistent", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base_url}/chat/completions", json={"model": "smollm2", "messages": [], "temperature": 9}
        ) as response,
    ):
        body = await response.json()
    assert response.status == 400
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] in ("messages", "temperature")


async def test_a_client_leaving_mid_stream_cancels_the_generation_inside_triton(
    client: openai.AsyncOpenAI, triton: TritonServer
) -> None:
    before = generations(await asyncio.to_thread(scrape, triton), "cancelled")
    stream = await client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        max_tokens=400,
        temperature=0.7,  # not cacheable: the request must reach the model
        stream=True,
    )
    received = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
            if received == 3:
                break
    await stream.close()
    assert await wait_idle(triton) == 0
    assert generations(await asyncio.to_thread(scrape, triton), "cancelled") == before + 1
