"""The domain events of one Ask, in the order a caller sees them; the servicer maps each to an ``AskResponse``.

``Classified`` (when a classifier answered), ``PlanMade``, then ``CandidateProgress`` and ``Delta`` events
interleaved as the models work, then one ``Finished``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from constellation.errors import ConstellationError
from constellation.semconv import Phase
from constellation.v1.common_pb2 import Classification
from services.dispatch.routing import PlannedModel, waves_of

if TYPE_CHECKING:
    from services.dispatch.bounds import BoundedPlan


@dataclass(frozen=True)
class Classified:
    """The classifier's view of the query (a ``constellation.v1.Classification`` message)."""

    classification: Classification


@dataclass(frozen=True)
class PlanMade:
    """The plan: ``members`` are asked (by wave), ``candidates`` are every model considered.

    ``policy`` is a :class:`~constellation.semconv.Policy` value; it picks the strategy that runs the plan.
    """

    policy: str
    members: list[PlannedModel]
    summary: str
    candidates: list[PlannedModel] = field(default_factory=list)
    profile: str = ""
    quorum: int = 0
    time_budget_ms: float = 0.0
    bounded: BoundedPlan | None = None
    """The error-bounded plan (``planned`` policy): its calls, certified bounds and vote."""
    parts: tuple[str, ...] = ()
    """The sub-queries of a decomposed prompt (``decomposed`` policy), in order."""

    def waves(self) -> list[list[PlannedModel]]:
        return waves_of(self.members)

    def reserves(self) -> list[PlannedModel]:
        """The eligible models not chosen, best score first: fallbacks and hedges come from here."""
        return sorted((c for c in self.candidates if not c.chosen and c.eligible), key=lambda c: -c.score)


@dataclass(frozen=True)
class CandidateProgress:
    """A model of the plan moved to ``phase``; ``elapsed_ms`` counts from the request's arrival."""

    model: str
    phase: Phase
    elapsed_ms: float
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    error: ConstellationError | None = None
    text: str = ""


@dataclass(frozen=True)
class Delta:
    """New answer text; ``source`` is the model (or ``fusion``) that wrote it."""

    text: str
    source: str


@dataclass(frozen=True)
class Stage:
    """One entry of the latency breakdown; ``simulated`` marks times a replayed model made up."""

    name: str
    ms: float
    simulated: bool = False


@dataclass(frozen=True)
class PartResult:
    """The answer to one sub-query of a decomposed prompt; ``error`` is set when the part failed."""

    index: int
    prompt: str
    text: str
    policy: str
    models: list[str]
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    error: ConstellationError | None = None


@dataclass(frozen=True)
class Finished:
    """The end of the answer: usage, cost and the latency breakdown; ``problems`` are failures it survived."""

    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    stages: list[Stage]
    trace_id: str
    finish_reason: str
    models: list[str] = field(default_factory=list)
    confidence: float = 0.0
    uncertain: bool = False
    problems: list[ConstellationError] = field(default_factory=list)
    decision: str = ""
    """The decided label of an error-bounded query."""
    error_bounds: dict[str, float] = field(default_factory=dict)
    """The certified error bound per true label of the plan that answered (``planned``)."""
    parts: list[PartResult] = field(default_factory=list)
    """Per sub-query answers, in order, when the prompt was decomposed."""


Event = Classified | PlanMade | CandidateProgress | Delta | Finished
