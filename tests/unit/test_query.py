from __future__ import annotations

from typing import Any

import pytest

from constellation.errors import InvalidArgument
from services.dispatch.query import validate

LIMITS = {"max_prompt_chars": 100, "max_tokens_limit": 512, "default_max_tokens": 64}


def make(**overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "prompt": "What is 2+2?",
        "max_tokens": 0,
        "temperature": None,
        "top_p": None,
        "stop": [],
        "seed": None,
        "model": "",
        "time_budget_ms": 0.0,
        "request_tag": "",
        **LIMITS,
    }
    fields.update(overrides)
    return validate(**fields)


def violations(**overrides: Any) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        make(**overrides)
    return {v.field: v.description for v in caught.value.violations}


def test_defaults_fill_max_tokens() -> None:
    query = make()
    assert query.sampling.max_tokens == 64
    assert query.sampling.temperature is None


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompt(prompt: str) -> None:
    assert "prompt" in violations(prompt=prompt)


def test_oversized_prompt_names_the_limit() -> None:
    assert "limit is 100" in violations(prompt="x" * 101)["prompt"]


def test_all_bad_fields_reported_at_once() -> None:
    found = violations(temperature=3.5, top_p=0.0, max_tokens=10_000, stop=["", "ok"], model="bad name!")
    assert set(found) == {"sampling.temperature", "sampling.top_p", "sampling.max_tokens", "sampling.stop[0]", "model"}
    assert "got 3.5" in found["sampling.temperature"]


def test_boundaries_are_accepted() -> None:
    query = make(temperature=2.0, top_p=1.0, max_tokens=512, stop=["x" * 64] * 8, model="org/model-1.5@v2")
    assert query.sampling.stop == tuple(["x" * 64] * 8)
