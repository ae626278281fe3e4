"""An OpenAI ``chat.completions`` request body as a dispatch :class:`~services.dispatch.query.Query`.

Plain Python, no HTTP: :func:`parse_chat` checks the body, refuses what dispatch cannot honour with an
:class:`~constellation.errors.InvalidArgument` that names each parameter (its ``field`` is the OpenAI
parameter name), and maps the rest onto :func:`services.dispatch.query.validate`.

Messages become one prompt (:func:`prompt_of`): a single user message is sent as it is (so a recorded
pool's prompt, or a cached one, is matched exactly); otherwise the system text comes first and every
turn follows as ``User: ...`` / ``Assistant: ...`` paragraphs, the last one the user's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from constellation.errors import FieldViolation, InvalidArgument, NotFound
from services.dispatch.config import DispatchConfig
from services.dispatch.query import Query, validate
from services.dispatch.routing import PROFILES

PROFILE_PREFIX = "constellation/"
"""Virtual models: ``constellation/<profile>`` routes over the pool with that profile."""
PROFILE_MODELS = tuple(PROFILE_PREFIX + p for p in ("quality", "balanced", "cost", "speed"))

KNOWN = frozenset(
    {
        "model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "n",
        "stream", "stream_options", "user", "tools", "tool_choice", "parallel_tool_calls", "functions",
        "function_call", "logprobs", "top_logprobs", "response_format", "frequency_penalty", "presence_penalty",
        "logit_bias", "modalities", "audio", "prediction", "service_tier", "store", "metadata", "reasoning_effort",
        "web_search_options", "constellation",
    }
)  # fmt: skip
"""Every top-level parameter recognised; any other is refused as unknown."""

ROLES = {"system": "system", "developer": "system", "user": "User", "assistant": "Assistant"}
_FIELD_NAMES = {
    "prompt": "messages",
    "sampling.max_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.stop": "stop",
    "time_budget_ms": "constellation.time_budget_ms",
    "ceilings.max_cost_usd": "constellation.max_cost_usd",
    "ceilings.max_latency_ms": "constellation.max_latency_ms",
    "request_tag": "user",
}


@dataclass(frozen=True)
class ChatRequest:
    """One accepted chat request.

    Attributes:
        query: What dispatch runs.
        model: The model the caller named (echoed in the response).
        stream: Answer with server-sent events.
        include_usage: Streamed answers end with a usage chunk (``stream_options.include_usage``).
    """

    query: Query
    model: str
    stream: bool
    include_usage: bool


def unsupported(body: Mapping[str, Any]) -> list[FieldViolation]:
    """Parameters dispatch cannot honour, each named, with why; unknown parameters too."""
    found = [FieldViolation(name, "unknown parameter") for name in body if name not in KNOWN]
    refusals = {
        "n": body.get("n") not in (None, 1),
        "tools": bool(body.get("tools")),
        "tool_choice": body.get("tool_choice") not in (None, "none"),
        "parallel_tool_calls": bool(body.get("parallel_tool_calls")) and bool(body.get("tools")),
        "functions": bool(body.get("functions")),
        "function_call": body.get("function_call") not in (None, "none"),
        "logprobs": bool(body.get("logprobs")),
        "top_logprobs": body.get("top_logprobs") not in (None, 0),
        "response_format": _format_type(body.get("response_format")) not in (None, "text"),
        "frequency_penalty": body.get("frequency_penalty") not in (None, 0, 0.0),
        "presence_penalty": body.get("presence_penalty") not in (None, 0, 0.0),
        "logit_bias": bool(body.get("logit_bias")),
        "modalities": body.get("modalities") not in (None, ["text"]),
        "audio": body.get("audio") is not None,
        "prediction": body.get("prediction") is not None,
        "web_search_options": body.get("web_search_options") is not None,
    }
    found += [FieldViolation(name, "is not supported by this server") for name, refused in refusals.items() if refused]
    return found


def _format_type(value: Any) -> Any:
    return value.get("type") if isinstance(value, Mapping) else value


def prompt_of(messages: Any) -> str:
    """The prompt dispatch sends for a list of chat messages (see the module docstring).

    Raises:
        InvalidArgument: not a non-empty list of system/developer/user/assistant messages with text
            content ending with a user message.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages must be a non-empty list", [FieldViolation("messages", "must be non-empty")])
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            why = f"role {role!r} is not supported (system, developer, user, assistant)"
            raise InvalidArgument(why, [FieldViolation(f"messages[{index}].role", why)])
        text = _text_of(message.get("content"), index)
        if ROLES[role] == "system":
            system.append(text)
        else:
            turns.append((ROLES[role], text))
    if not turns or turns[-1][0] != "User":
        why = "the last message must be the user's"
        raise InvalidArgument(why, [FieldViolation("messages", why)])
    if not system and len(turns) == 1:
        return turns[0][1]
    parts = ["\n\n".join(system)] if system else []
    parts += [f"{speaker}: {text}" for speaker, text in turns]
    return "\n\n".join(parts)


def _text_of(content: Any, index: int) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    why = "content must be a string or a list of text parts (images, audio and files are not supported)"
    raise InvalidArgument(why, [FieldViolation(f"messages[{index}].content", why)])


def parse_chat(body: Any, config: DispatchConfig, models: frozenset[str]) -> ChatRequest:
    """Checks a ``POST /v1/chat/completions`` body and maps it to a query.

    Args:
        body: The decoded JSON body.
        config: Dispatch settings (limits, default profile).
        models: The pool's model names that may be asked by name.

    Raises:
        InvalidArgument: unknown or unsupported parameters (reason ``UNSUPPORTED_PARAMETER``), or values
            out of range; each violation's field is the OpenAI parameter name.
        NotFound: ``model`` names neither a pool model nor a ``constellation/<profile>`` model.
    """
    if not isinstance(body, Mapping):
        raise InvalidArgument("the body must be a JSON object", [FieldViolation("body", "must be a JSON object")])
    refused = unsupported(body)
    if refused:
        names = ", ".join(v.field for v in refused)
        raise InvalidArgument(f"unsupported parameters: {names}", refused, reason="UNSUPPORTED_PARAMETER")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model is required", [FieldViolation("model", "must be a non-empty string")])
    profile, asked = _route(model, config, models)
    extension = body.get("constellation") or {}
    if not isinstance(extension, Mapping):
        raise InvalidArgument("constellation must be an object", [FieldViolation("constellation", "must be an object")])
    options = body.get("stream_options") or {}
    try:
        query = validate(
            prompt=prompt_of(body.get("messages")),
            max_tokens=_integer(body, "max_completion_tokens") or _integer(body, "max_tokens") or 0,
            temperature=_number(body, "temperature"),
            top_p=_number(body, "top_p"),
            stop=_stop(body.get("stop")),
            seed=_integer(body, "seed"),
            model=asked,
            time_budget_ms=_number(extension, "time_budget_ms") or 0.0,
            request_tag=str(body.get("user") or ""),
            max_prompt_chars=config.max_prompt_chars,
            max_tokens_limit=config.max_tokens_limit,
            default_max_tokens=config.default_max_tokens,
            profile=profile,
            max_cost_usd=_number(extension, "max_cost_usd") or 0.0,
            max_latency_ms=_number(extension, "max_latency_ms") or 0.0,
            required_capabilities=[str(c) for c in extension.get("required_capabilities") or ()],
        )
    except InvalidArgument as error:
        violations = [FieldViolation(_FIELD_NAMES.get(v.field, v.field), v.description) for v in error.violations]
        raise InvalidArgument(
            "invalid request: " + ", ".join(v.field for v in violations), violations, reason=error.reason
        ) from None
    stream = bool(body.get("stream"))
    return ChatRequest(query, model, stream, stream and bool(options.get("include_usage")))


def _route(model: str, config: DispatchConfig, models: frozenset[str]) -> tuple[str, str]:
    """(profile, model to ask): a virtual profile model routes over the pool; a pool model is asked alone."""
    if model == PROFILE_PREFIX.rstrip("/"):
        return config.default_profile, ""
    if model.startswith(PROFILE_PREFIX) and model.removeprefix(PROFILE_PREFIX) in PROFILES:
        return model.removeprefix(PROFILE_PREFIX), ""
    if model in models:
        return config.default_profile, model
    raise NotFound(
        f"the model {model!r} does not exist; GET /v1/models lists the pool and the constellation/<profile> models",
        reason="MODEL_NOT_FOUND",
        metadata={"model": model},
    )


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a number", [FieldViolation(name, "must be a finite number")])
    return float(value)


def _integer(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (name != "seed" and value < 1):
        raise InvalidArgument(f"{name} must be a positive integer", [FieldViolation(name, "must be an integer >= 1")])
    return value


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise InvalidArgument("stop must be a string or a list of strings", [FieldViolation("stop", "must be strings")])
