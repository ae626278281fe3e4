"""OpenAI chat bodies mapped to dispatch queries: messages to one prompt, parameters, refusals."""

from __future__ import annotations

from typing import Any

import pytest

from constellation.config import load_config
from constellation.errors import InvalidArgument, NotFound
from services.dispatch.config import DispatchConfig
from services.dispatch.http._request import parse_chat, prompt_of

CONFIG = load_config(DispatchConfig, None, default_profile="balanced", max_tokens_limit=512)
POOL = frozenset({"smollm2", "gpt-4o"})


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "smollm2", "messages": [{"role": "user", "content": "Hi there"}], **extra}


def test_one_user_message_is_the_prompt_as_it_is() -> None:
    assert prompt_of([{"role": "user", "content": "  What is 2+2?\n"}]) == "  What is 2+2?\n"


def test_system_and_turns_become_paragraphs_ending_with_the_user() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": [{"type": "text", "text": "Capital "}, {"type": "text", "text": "of Peru?"}]},
    ]
    assert prompt_of(messages) == (
        "Be brief.\n\nAnswer in English.\n\nUser: Hello\n\nAssistant: Hi! How can I help?\n\nUser: Capital of Peru?"
    )


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "messages"),
    ],
)
def test_bad_messages_are_refused_naming_the_message(messages: list[Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        prompt_of(messages)
    assert caught.value.violations[0].field == field


def test_sampling_parameters_map_onto_the_query() -> None:
    chat = parse_chat(
        body(temperature=0, top_p=0.9, max_tokens=40, stop="\n", seed=7, user="team-a", stream=True),
        CONFIG,
        POOL,
    )
    sampling = chat.query.sampling
    assert (sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.stop, sampling.seed) == (
        0.0,
        0.9,
        40,
        ("\n",),
        7,
    )
    assert chat.query.model == "smollm2" and chat.query.request_tag == "team-a"
    assert chat.stream and not chat.include_usage


def test_max_completion_tokens_wins_and_the_default_applies_when_none_is_given() -> None:
    assert parse_chat(body(max_tokens=10, max_completion_tokens=20), CONFIG, POOL).query.sampling.max_tokens == 20
    assert parse_chat(body(), CONFIG, POOL).query.sampling.max_tokens == CONFIG.default_max_tokens


def test_profile_models_route_over_the_pool() -> None:
    chat = parse_chat(body(model="constellation/speed"), CONFIG, POOL)
    assert chat.query.model == "" and chat.query.profile == "speed" and chat.model == "constellation/speed"
    assert parse_chat(body(model="constellation"), CONFIG, POOL).query.profile == "balanced"


def test_the_constellation_extension_sets_ceilings() -> None:
    extension = {"max_cost_usd": 0.01, "max_latency_ms": 900, "time_budget_ms": 5000, "required_capabilities": ["code"]}
    query = parse_chat(body(constellation=extension), CONFIG, POOL).query
    assert (query.max_cost_usd, query.max_latency_ms, query.time_budget_ms) == (0.01, 900.0, 5000.0)
    assert query.required_capabilities == ("code",)


def test_an_unknown_model_is_not_found() -> None:
    with pytest.raises(NotFound) as caught:
        parse_chat(body(model="constellation/fastest"), CONFIG, POOL)
    assert caught.value.reason == "MODEL_NOT_FOUND"


def test_every_unsupported_or_unknown_parameter_is_named_at_once() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_chat(
            body(
                n=3, tools=[{"type": "function"}], response_format={"type": "json_schema"}, frequency_penalty=0.5, foo=1
            ),
            CONFIG,
            POOL,
        )
    fields = {v.field for v in caught.value.violations}
    assert fields == {"n", "tools", "response_format", "frequency_penalty", "foo"}
    assert caught.value.reason == "UNSUPPORTED_PARAMETER"


def test_defaults_of_unsupported_parameters_are_accepted() -> None:
    chat = parse_chat(
        body(n=1, tools=[], logprobs=False, response_format={"type": "text"}, presence_penalty=0, tool_choice="none"),
        CONFIG,
        POOL,
    )
    assert chat.query.prompt == "Hi there"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"temperature": 3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [1]}, "stop"),
    ],
)
def test_values_out_of_range_name_the_openai_parameter(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_chat(body(**extra), CONFIG, POOL)
    assert caught.value.violations[0].field == field
