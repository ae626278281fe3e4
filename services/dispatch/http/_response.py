"""OpenAI-shaped bodies and chunks built from dispatch's events, with the constellation's own facts.

The facts (plan, members, models, confidence, uncertain flag, trace id, cache) go in an extension
field named ``constellation`` of the completion (and of the first and last streamed chunks), and in
``x-constellation-*`` response headers. ``usage`` carries ``cost_usd`` beside the token counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from services.dispatch.events import Finished, PlanMade
from services.dispatch.http.cache import Hit

FINISH_REASONS = {"stop": "stop", "length": "length"}
"""Dispatch's finish reasons as OpenAI's; any other (``cancelled``) reads ``stop``."""


@dataclass(frozen=True)
class CachedCompletion:
    """What the cache keeps of an answer: enough to answer again without asking any model."""

    text: str
    finish_reason: str
    facts: dict[str, Any]
    input_tokens: int
    output_tokens: int
    cost_usd: float


@dataclass
class Facts:
    """What one request learnt from its events, for the extension field and the headers.

    Attributes:
        completion_id: ``chatcmpl-...``, the same in every chunk of a stream.
        model: The model the caller named.
        trace_id: The request's W3C trace id.
        created: Unix seconds when the request arrived.
    """

    completion_id: str
    model: str
    trace_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    plan: PlanMade | None = None
    finished: Finished | None = None
    hit: Hit[CachedCompletion] | None = None

    def extension(self) -> dict[str, Any]:
        """The ``constellation`` extension field: what is known so far."""
        if self.hit is not None:
            cached = self.hit.value
            return cached.facts | {
                "trace_id": self.trace_id,
                "cache": {
                    "hit": True,
                    "kind": self.hit.kind,
                    "similarity": round(self.hit.similarity, 6),
                    "age_s": round(self.hit.age_s, 3),
                    "original_trace_id": cached.facts.get("trace_id", ""),
                    "original_usage": _usage(cached.input_tokens, cached.output_tokens, cached.cost_usd),
                },
            }
        out: dict[str, Any] = {"trace_id": self.trace_id, "cache": {"hit": False}}
        if self.plan is not None:
            out["plan"] = {
                "policy": self.plan.policy,
                "profile": self.plan.profile,
                "summary": self.plan.summary,
                "quorum": self.plan.quorum,
                "members": [{"model": m.model, "wave": m.wave, "reason": m.reason} for m in self.plan.members],
            }
        if self.finished is not None:
            out["models"] = list(self.finished.models)
            out["confidence"] = self.finished.confidence
            out["uncertain"] = self.finished.uncertain
            out["problems"] = [{"code": p.code.name, "message": p.message} for p in self.finished.problems]
            out["stages_ms"] = {
                s.name + ("_simulated" if s.simulated else ""): round(s.ms, 3) for s in self.finished.stages
            }
        return out

    def headers(self) -> dict[str, str]:
        """``x-constellation-*`` headers for what is known so far."""
        facts = self.extension()
        out = {"x-constellation-trace-id": self.trace_id, "x-constellation-cache": _cache_header(facts["cache"])}
        plan = facts.get("plan")
        if plan is not None:
            out["x-constellation-plan"] = plan["policy"]
            out["x-constellation-members"] = ",".join(m["model"] for m in plan["members"])
        if "models" in facts:
            out["x-constellation-models"] = ",".join(facts["models"])
            out["x-constellation-confidence"] = f"{facts['confidence']:.4f}"
            out["x-constellation-uncertain"] = "true" if facts["uncertain"] else "false"
        return out

    def usage(self) -> dict[str, Any]:
        """Tokens and cost this request spent (a cache hit spends none)."""
        if self.finished is None:
            return _usage(0, 0, 0.0)
        done = self.finished
        return _usage(done.input_tokens, done.output_tokens, done.cost_usd)

    def cached(self) -> CachedCompletion | None:
        """What the cache may keep of this answer: None unless it finished cleanly."""
        done = self.finished
        if done is None or done.problems or done.finish_reason not in FINISH_REASONS:
            return None
        facts = {k: v for k, v in self.extension().items() if k != "cache"}
        return CachedCompletion(
            done.text, done.finish_reason, facts, done.input_tokens, done.output_tokens, done.cost_usd
        )

    def completion(self) -> dict[str, Any]:
        """The ``chat.completion`` body (after the whole answer)."""
        if self.hit is not None:
            text, reason = self.hit.value.text, self.hit.value.finish_reason
        else:
            assert self.finished is not None
            text, reason = self.finished.text, self.finished.finish_reason
        return {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": FINISH_REASONS.get(reason, "stop"),
                    "logprobs": None,
                }
            ],
            "usage": self.usage(),
            "constellation": self.extension(),
        }

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
        """One ``chat.completion.chunk`` with a single choice."""
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            **extra,
        }

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk of a stream asked with ``stream_options.include_usage``: no choices, the usage."""
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(),
        }


def _usage(input_tokens: int, output_tokens: int, cost_usd: float) -> dict[str, Any]:
    return {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "cost_usd": cost_usd,
    }


def _cache_header(cache: dict[str, Any]) -> str:
    return str(cache["kind"]) if cache.get("hit") else "miss"
