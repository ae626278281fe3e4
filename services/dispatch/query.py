"""A validated query: what dispatch accepts, and every reason it would refuse one.

Plain Python, no gRPC: the servicer copies the request's fields into :func:`validate` and turns
:class:`~constellation.errors.InvalidArgument` into a status with one field violation per problem.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from constellation.errors import FieldViolation, InvalidArgument
from constellation.triton import Sampling
from services.dispatch.routing import PROFILES

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@/\-]{0,127}$")
MAX_CAPABILITIES = 16
MAX_REQUEST_TAG_CHARS = 256


@dataclass(frozen=True)
class Query:
    """One accepted query, with every field in range."""

    prompt: str
    sampling: Sampling
    model: str
    time_budget_ms: float
    request_tag: str
    profile: str = "balanced"
    weights: tuple[float, float, float] | None = None
    """Per-request (quality, cost, latency) weights; None uses the profile's."""
    max_cost_usd: float = 0.0
    max_latency_ms: float = 0.0
    required_capabilities: tuple[str, ...] = ()
    alpha: float = 0.0
    """The error bound of a closed-answer query for every label; 0: none."""
    label_alpha: tuple[tuple[str, float], ...] = ()
    """Per-label error bounds that override ``alpha``."""
    decompose: bool = True
    """Whether a multi-part prompt may be split into sub-queries."""

    @property
    def bounded(self) -> bool:
        """Whether the caller asked for an error bound."""
        return self.alpha > 0 or bool(self.label_alpha)

    def alpha_for(self, labels: Sequence[str]) -> dict[str, float]:
        """The bound of each label: its own when given, else ``alpha``; a label with neither gets 0 (invalid)."""
        own = dict(self.label_alpha)
        return {label: own.get(label, self.alpha) for label in labels}


def validate(
    *,
    prompt: str,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    stop: Sequence[str],
    seed: int | None,
    model: str,
    time_budget_ms: float,
    request_tag: str,
    max_prompt_chars: int,
    max_tokens_limit: int,
    default_max_tokens: int,
    profile: str = "balanced",
    weights: tuple[float, float, float] | None = None,
    max_cost_usd: float = 0.0,
    max_latency_ms: float = 0.0,
    required_capabilities: Sequence[str] = (),
    alpha: float = 0.0,
    label_alpha: Mapping[str, float] | None = None,
    decompose: bool = True,
) -> Query:
    """Checks every field and returns the query, or raises with all violations at once.

    Raises:
        InvalidArgument: with one :class:`FieldViolation` per bad field, named by its path in
            ``AskRequest`` (``prompt``, ``sampling.temperature``...).
    """
    violations: list[FieldViolation] = []
    if not prompt.strip():
        violations.append(FieldViolation("prompt", "must not be empty or only whitespace"))
    elif len(prompt) > max_prompt_chars:
        violations.append(FieldViolation("prompt", f"is {len(prompt)} characters; the limit is {max_prompt_chars}"))
    violations += _sampling_violations(max_tokens, temperature, top_p, stop, max_tokens_limit)
    if model and not MODEL_NAME.match(model):
        violations.append(
            FieldViolation("model", "must be 1-128 characters of letters, digits and . _ @ / - (start alphanumeric)")
        )
    if not (time_budget_ms >= 0 and math.isfinite(time_budget_ms)):
        violations.append(FieldViolation("time_budget_ms", f"must be >= 0, got {time_budget_ms:g}"))
    if len(request_tag) > MAX_REQUEST_TAG_CHARS:
        violations.append(FieldViolation("request_tag", f"must be at most {MAX_REQUEST_TAG_CHARS} characters"))
    violations += _routing_violations(profile, weights, max_cost_usd, max_latency_ms, required_capabilities)
    violations += _bound_violations(alpha, label_alpha or {}, model)
    if violations:
        fields = ", ".join(v.field for v in violations)
        raise InvalidArgument(f"invalid AskRequest: {fields}", violations)
    sampling = Sampling(
        max_tokens=max_tokens or default_max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=tuple(stop),
        seed=seed,
    )
    return Query(
        prompt,
        sampling,
        model,
        time_budget_ms,
        request_tag,
        profile=profile,
        weights=weights,
        max_cost_usd=max_cost_usd,
        max_latency_ms=max_latency_ms,
        required_capabilities=tuple(required_capabilities),
        alpha=alpha,
        label_alpha=tuple(sorted((label_alpha or {}).items())),
        decompose=decompose,
    )


def _bound_violations(alpha: float, label_alpha: Mapping[str, float], model: str) -> list[FieldViolation]:
    """What is wrong with the request's error bounds (each in (0, 1); none together with a named model)."""
    violations: list[FieldViolation] = []
    if not (0.0 <= alpha < 1.0):
        violations.append(FieldViolation("alpha", f"must be in (0, 1), or 0 for no bound; got {alpha:g}"))
    for label, value in sorted(label_alpha.items()):
        if not label or len(label) > 16:
            violations.append(FieldViolation("label_alpha", "labels must be 1 to 16 characters long"))
        if not (0.0 < value < 1.0):
            violations.append(FieldViolation(f"label_alpha[{label}]", f"must be in (0, 1), got {value:g}"))
    if model and (alpha > 0 or label_alpha):
        violations.append(FieldViolation("alpha", "an error bound chooses the models itself; leave `model` empty"))
    return violations


def _sampling_violations(
    max_tokens: int, temperature: float | None, top_p: float | None, stop: Sequence[str], max_tokens_limit: int
) -> list[FieldViolation]:
    """What is wrong with the request's ``sampling`` fields."""
    violations: list[FieldViolation] = []
    if max_tokens > max_tokens_limit:
        violations.append(
            FieldViolation("sampling.max_tokens", f"must be at most {max_tokens_limit}, got {max_tokens}")
        )
    if temperature is not None and not (0.0 <= temperature <= 2.0 and math.isfinite(temperature)):
        violations.append(FieldViolation("sampling.temperature", f"must be in [0, 2], got {temperature:g}"))
    if top_p is not None and not (0.0 < top_p <= 1.0):
        violations.append(FieldViolation("sampling.top_p", f"must be in (0, 1], got {top_p:g}"))
    if len(stop) > MAX_STOP_STRINGS:
        violations.append(FieldViolation("sampling.stop", f"at most {MAX_STOP_STRINGS} strings, got {len(stop)}"))
    for i, item in enumerate(stop):
        if not item or len(item) > MAX_STOP_CHARS:
            violations.append(FieldViolation(f"sampling.stop[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters long"))
    return violations


def _routing_violations(
    profile: str,
    weights: tuple[float, float, float] | None,
    max_cost_usd: float,
    max_latency_ms: float,
    required_capabilities: Sequence[str],
) -> list[FieldViolation]:
    """What is wrong with the request's routing fields: profile, weights and ceilings."""
    violations: list[FieldViolation] = []
    if profile not in PROFILES:
        violations.append(FieldViolation("profile", f"must be one of {', '.join(PROFILES)}, got {profile!r}"))
    if weights is not None:
        for name, value in zip(("quality", "cost", "latency"), weights, strict=True):
            if not (0.0 <= value <= 1.0):
                violations.append(FieldViolation(f"weights.{name}", f"must be in [0, 1], got {value:g}"))
        if sum(weights) <= 0:
            violations.append(FieldViolation("weights", "at least one weight must be positive when weights are set"))
    if not (max_cost_usd >= 0 and math.isfinite(max_cost_usd)):
        violations.append(FieldViolation("ceilings.max_cost_usd", f"must be >= 0, got {max_cost_usd:g}"))
    if not (max_latency_ms >= 0 and math.isfinite(max_latency_ms)):
        violations.append(FieldViolation("ceilings.max_latency_ms", f"must be >= 0, got {max_latency_ms:g}"))
    if len(required_capabilities) > MAX_CAPABILITIES:
        violations.append(
            FieldViolation(
                "ceilings.required_capabilities", f"at most {MAX_CAPABILITIES}, got {len(required_capabilities)}"
            )
        )
    for i, capability in enumerate(required_capabilities):
        if not capability or len(capability) > 64:
            violations.append(FieldViolation(f"ceilings.required_capabilities[{i}]", "must be 1 to 64 characters long"))
    return violations
