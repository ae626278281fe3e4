"""The records strategies work on: one model call's result, and one request's run (query, plan, clock)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from constellation.errors import ConstellationError
from constellation.semconv import CancelReason, Outcome, Role
from services.dispatch.events import PlanMade, Stage
from services.dispatch.query import Query


@dataclass
class CallResult:
    """What one model call produced; filled in while the call runs.

    Attributes:
        model: The model asked.
        quality: The plan's predicted quality of the model for this query; it weighs the model's vote
            and goes to ranking and fusion as the candidate's ``reliability``.
        answer: The normalised answer extracted from ``text`` (closed answer kinds), once finished.
        simulated: (time to first token, total) in ms that a replayed model made up, if any.
        cancel_reason: Why dispatch cancelled the call, if it did.
    """

    model: str
    quality: float = 0.0
    text: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    finish_reason: str = ""
    started_at: float = 0.0
    first_at: float | None = None
    ended_at: float = 0.0
    simulated: tuple[float, float] | None = None
    error: ConstellationError | None = None
    outcome: Outcome = Outcome.ERROR
    answer: str | None = None
    role: Role = Role.MEMBER
    cancel_reason: CancelReason = CancelReason.NONE

    @property
    def simulated_total_ms(self) -> float:
        return self.simulated[1] if self.simulated is not None else 0.0

    @property
    def streamed(self) -> bool:
        """True once the model has sent text (after that, a failure cannot be hidden by a fallback)."""
        return self.first_at is not None


@dataclass
class Run:
    """One request as strategies and aggregation see it: the query, its plan and its clock.

    Attributes:
        answer_kind: The classifier's answer kind by name (``number``, ``open``...), empty when unknown.
        received_at: ``time.perf_counter()`` when the request arrived.
        ends_at: ``time.perf_counter()`` by which the answer must be complete.
        stages: The latency breakdown so far; strategies append theirs.
    """

    query: Query
    plan: PlanMade
    answer_kind: str
    received_at: float
    ends_at: float
    stages: list[Stage] = field(default_factory=list)

    def elapsed_ms(self) -> float:
        """Milliseconds since the request arrived."""
        return (time.perf_counter() - self.received_at) * 1000

    def remaining_s(self) -> float:
        """Seconds left before ``ends_at`` (negative once it has passed)."""
        return self.ends_at - time.perf_counter()
