"""Span names, span attribute names and the typed values the mesh writes into traces, defined once.

Dispatch produces these attributes and the trace tools read them back; both import the names from here
so that a rename is one edit and a typo is an import error rather than a silently empty column.

The enums are ``StrEnum``: a member is its string value, so it can go straight into a span attribute, a
metric label or a protobuf lookup table.
"""

from __future__ import annotations

from enum import StrEnum

# Span names.
SPAN_MODEL_CALL = "model.generate"
"""One model call of a fan-out (a CLIENT span around the Triton stream)."""

# Attributes of the Ask span (one per request).
TASK = "constellation.task"
COMPLEXITY = "constellation.complexity"
CLASSIFIED_BY = "constellation.classified_by"
ROUTE = "constellation.route"
"""The plan's policy (a :class:`Policy` value)."""
DEGRADED = "constellation.degraded"
"""What a request was planned without (``classification_lost``), when it lost something."""
REQUEST_TAG = "constellation.request_tag"
"""The caller's opaque ``AskRequest.request_tag``; a span attribute only, never a metric label."""
FANOUT_MEMBERS = "constellation.fanout.members"
FANOUT_EARLY_STOP = "constellation.fanout.early_stop"
FUSED_CONFIDENCE = "constellation.fused.confidence"
FUSED_METHOD = "constellation.fused.method"

# Attributes of a model call span.
MODEL = "constellation.model"
MEMBER_ROLE = "constellation.member.role"
"""The call's :class:`Role`."""
TRITON_ENDPOINT = "constellation.triton.endpoint"
TRITON_MODEL = "constellation.triton.model"
INPUT_TOKENS = "constellation.input_tokens"
OUTPUT_TOKENS = "constellation.output_tokens"
COST_USD = "constellation.cost_usd"
FINISH_REASON = "constellation.finish_reason"
CANCELLED = "constellation.cancelled"
CANCELLED_BY_QUORUM = "constellation.cancelled_by_quorum"
HEDGED = "constellation.hedged"
FALLBACK = "constellation.fallback"
TIME_TO_FIRST_TOKEN_MS = "constellation.time_to_first_token_ms"
SIMULATED_TIME_TO_FIRST_TOKEN_MS = "constellation.simulated_time_to_first_token_ms"
SIMULATED_TOTAL_MS = "constellation.simulated_total_ms"
QUEUE_MS = "constellation.queue_ms"
"""Time a call waited in a model's queue, when the model reports it (read by the trace tools)."""


class Policy(StrEnum):
    """How a plan is executed; strategies are registered under these values."""

    REQUESTED = "requested"
    """The caller named the model."""
    SINGLE = "single"
    """One model (routed, static or the default), with fallback and hedging."""
    VOTE = "vote"
    """Several models at once, answers voted."""
    CASCADE = "cascade"
    """A cheap first wave that must agree, then stronger models."""
    RANK = "rank"
    """Several models at once, the ranking service picks the answer."""
    PLANNED = "planned"
    """An error-bounded plan: its calls at once, the likelihood-ratio vote decides, certified early stop."""
    DECOMPOSED = "decomposed"
    """A multi-part prompt split into sub-queries, each planned on its own, answered in order."""


class Role(StrEnum):
    """Why a model call was made."""

    MEMBER = "member"
    """A chosen member of the plan."""
    FALLBACK = "fallback"
    """Replaces a member that failed."""
    HEDGE = "hedge"
    """A backup request sent because the member was slow to its first token."""


class Phase(StrEnum):
    """Where a candidate is, as the Ask stream reports it."""

    STARTED = "started"
    FIRST_TOKEN = "first_token"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


class Outcome(StrEnum):
    """How one model call ended (a metric label and the registry's success flag)."""

    OK = "ok"
    ERROR = "error"
    NOT_FOUND = "not_found"
    CANCELLED = "cancelled"


class CancelReason(StrEnum):
    """Why dispatch cancelled a call it had started."""

    NONE = ""
    QUORUM = "quorum"
    """Its wave was settled without it."""
    HEDGE = "hedge"
    """The other call of a hedged pair produced text first."""
