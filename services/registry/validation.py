"""What the registry accepts: range and size limits of model records and outcomes, and the repair of
records stored before those limits existed.

Every number that routing reads (prices, size, quality, the live statistics) must be finite and in
range, and every list a caller can grow must be bounded: one record with 400,000 capabilities once
slowed every routed plan from 15 ms to 261 ms, and one infinite latency turned a moving average, and
with it every routing score, into NaN. The limits:

======================================  =========================================================
field                                   accepted
======================================  =========================================================
``name``                                1-128 characters from ``A-Z a-z 0-9 . _ @ : / -``
``family``                              at most 128 characters
``version``                             at most 64 characters
``params_b``                            finite, 0 to 100,000 (billions; 0: unknown)
``price_in_per_mtok``, ``..._out_...``  finite, 0 to 100,000 USD per million tokens
``traffic_weight``                      finite, 0 to 1
``tasks``, ``answer_kinds``             at most 16 entries, each a defined enum value
``capabilities``                        at most 64 entries, each 1-64 characters
``quality``                             at most 64 estimates; quality finite in [0, 1], defined enums
``state``                               a defined ``ModelState``
``backend``                             endpoint and model name at most 256 characters, model version
                                        and tensor convention at most 64, at most 32 parameters
                                        (keys at most 64 characters, values at most 1,024)
outcome times                           finite, 0 to 3,600,000 ms (one hour)
outcome ``usage.cost_usd``              finite, 0 to 1,000,000 USD
outcome ``quality`` (when set)          finite, in [0, 1]
outcome ``task``, ``complexity``        defined enum values
outcome ``error_code``                  at most 32 characters
======================================  =========================================================

A caller that breaks a limit gets INVALID_ARGUMENT with one ``BadRequest`` field violation per bad
field (for a batch of outcomes, at most :data:`MAX_REPORTED_VIOLATIONS` of them). Plain Python, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from constellation.errors import FieldViolation, InvalidArgument
from constellation.v1 import common_pb2, registry_pb2

NAME_PATTERN = re.compile(r"[A-Za-z0-9._@:/-]{1,128}")
NAME_RULE = "1-128 characters from A-Z a-z 0-9 . _ @ : / -"
MAX_FAMILY_CHARS = 128
MAX_VERSION_CHARS = 64
MAX_PARAMS_B = 100_000.0
MAX_PRICE_PER_MTOK = 100_000.0
MAX_ENUM_ENTRIES = 16
MAX_CAPABILITIES = 64
MAX_CAPABILITY_CHARS = 64
MAX_QUALITY_ESTIMATES = 64
MAX_ENDPOINT_CHARS = 256
MAX_BACKEND_SHORT_CHARS = 64
MAX_BACKEND_PARAMETERS = 32
MAX_PARAMETER_KEY_CHARS = 64
MAX_PARAMETER_VALUE_CHARS = 1024
MAX_LATENCY_MS = 3_600_000.0
MAX_COST_USD = 1_000_000.0
MAX_ERROR_CODE_CHARS = 32
MAX_REPORTED_VIOLATIONS = 64
"""Most field violations one rejected ReportOutcome names (a batch holds up to thousands of outcomes)."""

TASKS = frozenset(common_pb2.TaskType.values())
COMPLEXITIES = frozenset(common_pb2.Complexity.values())
ANSWER_KINDS = frozenset(common_pb2.AnswerKind.values())
STATES = frozenset(common_pb2.ModelState.values())


def in_range(value: float, low: float, high: float) -> bool:
    """True when ``value`` is finite and in ``[low, high]`` (NaN and infinities never are)."""
    return math.isfinite(value) and low <= value <= high


def _number(problems: list[FieldViolation], field: str, value: float, high: float) -> None:
    if not in_range(value, 0.0, high):
        problems.append(FieldViolation(field, f"must be a finite number in [0, {high:g}], got {value}"))


def _text(problems: list[FieldViolation], field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        problems.append(FieldViolation(field, f"is {len(value)} characters; the limit is {limit}"))


def _enums(problems: list[FieldViolation], field: str, values: Sequence[int], known: frozenset[int]) -> None:
    if len(values) > MAX_ENUM_ENTRIES:
        problems.append(FieldViolation(field, f"holds {len(values)} entries; the limit is {MAX_ENUM_ENTRIES}"))
        return
    bad = [v for v in values if v not in known]
    if bad:
        problems.append(FieldViolation(field, f"holds undefined enum values {bad[:8]}"))


def _capabilities(problems: list[FieldViolation], field: str, capabilities: Sequence[str]) -> None:
    if len(capabilities) > MAX_CAPABILITIES:
        problems.append(FieldViolation(field, f"holds {len(capabilities)} entries; the limit is {MAX_CAPABILITIES}"))
        return
    for i, capability in enumerate(capabilities):
        if not 1 <= len(capability) <= MAX_CAPABILITY_CHARS:
            problems.append(FieldViolation(f"{field}[{i}]", f"must be 1-{MAX_CAPABILITY_CHARS} characters"))


def _quality(problems: list[FieldViolation], field: str, estimates: Sequence[registry_pb2.QualityEstimate]) -> None:
    if len(estimates) > MAX_QUALITY_ESTIMATES:
        problems.append(
            FieldViolation(field, f"holds {len(estimates)} estimates; the limit is {MAX_QUALITY_ESTIMATES}")
        )
        return
    for i, estimate in enumerate(estimates):
        if not in_range(estimate.quality, 0.0, 1.0):
            problems.append(FieldViolation(f"{field}[{i}].quality", f"must be in [0, 1], got {estimate.quality}"))
        if estimate.task not in TASKS:
            problems.append(FieldViolation(f"{field}[{i}].task", f"undefined task type {estimate.task}"))
        if estimate.complexity not in COMPLEXITIES:
            problems.append(FieldViolation(f"{field}[{i}].complexity", f"undefined complexity {estimate.complexity}"))


def _backend(problems: list[FieldViolation], field: str, backend: common_pb2.Backend) -> None:
    _text(problems, f"{field}.endpoint", backend.endpoint, MAX_ENDPOINT_CHARS)
    _text(problems, f"{field}.model_name", backend.model_name, MAX_ENDPOINT_CHARS)
    _text(problems, f"{field}.model_version", backend.model_version, MAX_BACKEND_SHORT_CHARS)
    _text(problems, f"{field}.tensor_convention", backend.tensor_convention, MAX_BACKEND_SHORT_CHARS)
    parameters = backend.parameters
    if len(parameters) > MAX_BACKEND_PARAMETERS:
        problems.append(
            FieldViolation(
                f"{field}.parameters", f"holds {len(parameters)} entries; the limit is {MAX_BACKEND_PARAMETERS}"
            )
        )
        return
    for key, value in sorted(parameters.items()):
        if len(key) > MAX_PARAMETER_KEY_CHARS or len(value) > MAX_PARAMETER_VALUE_CHARS:
            problems.append(
                FieldViolation(
                    f"{field}.parameters[{key[:MAX_PARAMETER_KEY_CHARS]!r}]",
                    f"keys may hold {MAX_PARAMETER_KEY_CHARS} characters and values {MAX_PARAMETER_VALUE_CHARS}",
                )
            )


def record_violations(record: registry_pb2.ModelRecord, prefix: str = "model") -> list[FieldViolation]:
    """Every limit of the module doc that ``record``'s declared fields break, named ``<prefix>.<field>``.

    ``stats`` is not checked: the registry computes it and ignores what a caller sends.
    """
    problems: list[FieldViolation] = []
    if not NAME_PATTERN.fullmatch(record.name):
        problems.append(FieldViolation(f"{prefix}.name", f"{record.name[:160]!r} is not a model name: {NAME_RULE}"))
    _text(problems, f"{prefix}.family", record.family, MAX_FAMILY_CHARS)
    _text(problems, f"{prefix}.version", record.version, MAX_VERSION_CHARS)
    _number(problems, f"{prefix}.params_b", record.params_b, MAX_PARAMS_B)
    for name in ("price_in_per_mtok", "price_out_per_mtok"):
        _number(problems, f"{prefix}.{name}", getattr(record, name), MAX_PRICE_PER_MTOK)
    _number(problems, f"{prefix}.traffic_weight", record.traffic_weight, 1.0)
    _enums(problems, f"{prefix}.tasks", record.tasks, TASKS)
    _enums(problems, f"{prefix}.answer_kinds", record.answer_kinds, ANSWER_KINDS)
    _capabilities(problems, f"{prefix}.capabilities", record.capabilities)
    _quality(problems, f"{prefix}.quality", record.quality)
    if record.state not in STATES:
        problems.append(FieldViolation(f"{prefix}.state", f"undefined model state {record.state}"))
    _backend(problems, f"{prefix}.backend", record.backend)
    return problems


def validate_record(record: registry_pb2.ModelRecord, prefix: str = "model") -> None:
    """Checks the fields a caller declares against the limits of the module doc.

    Raises:
        InvalidArgument: one field violation per bad field, named ``<prefix>.<field>``.
    """
    problems = record_violations(record, prefix)
    if problems:
        raise InvalidArgument(f"invalid model record {record.name[:160]!r}", problems, reason="INVALID_MODEL_RECORD")


def outcome_violations(outcome: registry_pb2.Outcome, prefix: str) -> list[FieldViolation]:
    """Every limit of the module doc that one outcome breaks, named ``<prefix>.<field>``."""
    problems: list[FieldViolation] = []
    _number(problems, f"{prefix}.time_to_first_token_ms", outcome.time_to_first_token_ms, MAX_LATENCY_MS)
    _number(problems, f"{prefix}.total_ms", outcome.total_ms, MAX_LATENCY_MS)
    _number(problems, f"{prefix}.usage.cost_usd", outcome.usage.cost_usd, MAX_COST_USD)
    if outcome.HasField("quality") and not in_range(outcome.quality, 0.0, 1.0):
        problems.append(FieldViolation(f"{prefix}.quality", f"must be in [0, 1], got {outcome.quality}"))
    if outcome.task not in TASKS:
        problems.append(FieldViolation(f"{prefix}.task", f"undefined task type {outcome.task}"))
    if outcome.complexity not in COMPLEXITIES:
        problems.append(FieldViolation(f"{prefix}.complexity", f"undefined complexity {outcome.complexity}"))
    _text(problems, f"{prefix}.error_code", outcome.error_code, MAX_ERROR_CODE_CHARS)
    return problems


def validate_outcomes(outcomes: Sequence[registry_pb2.Outcome]) -> None:
    """Checks a batch of outcomes; the batch is taken whole or not at all.

    Raises:
        InvalidArgument: at least one outcome breaks a limit; names up to
            :data:`MAX_REPORTED_VIOLATIONS` violations as ``outcomes[i].<field>``.
    """
    problems: list[FieldViolation] = []
    bad_outcomes = 0
    for i, outcome in enumerate(outcomes):
        found = outcome_violations(outcome, f"outcomes[{i}]")
        if found:
            bad_outcomes += 1
            problems.extend(found)
    if problems:
        shown = problems[:MAX_REPORTED_VIOLATIONS]
        more = ""
        if len(problems) > len(shown):
            more = f" (the first {len(shown)} of {len(problems)} violations are named)"
        raise InvalidArgument(
            f"{bad_outcomes} of {len(outcomes)} outcomes are out of range; none was recorded{more}",
            shown,
            reason="INVALID_OUTCOME",
        )


def _clamp(value: float, high: float, fallback: float = 0.0) -> float:
    if not math.isfinite(value):
        return fallback
    return min(max(value, 0.0), high)


def _keep(values: Sequence[int], known: frozenset[int]) -> list[int]:
    return [v for v in values if v in known][:MAX_ENUM_ENTRIES]


def _copy_estimate(estimate: registry_pb2.QualityEstimate) -> registry_pb2.QualityEstimate:
    copy = registry_pb2.QualityEstimate()
    copy.CopyFrom(estimate)
    return copy


def _repair_declared(record: registry_pb2.ModelRecord) -> None:
    record.params_b = _clamp(record.params_b, MAX_PARAMS_B)
    record.price_in_per_mtok = _clamp(record.price_in_per_mtok, MAX_PRICE_PER_MTOK)
    record.price_out_per_mtok = _clamp(record.price_out_per_mtok, MAX_PRICE_PER_MTOK)
    record.traffic_weight = _clamp(record.traffic_weight, 1.0)
    record.family = record.family[:MAX_FAMILY_CHARS]
    record.version = record.version[:MAX_VERSION_CHARS]
    tasks, kinds = _keep(record.tasks, TASKS), _keep(record.answer_kinds, ANSWER_KINDS)
    del record.tasks[:], record.answer_kinds[:]
    record.tasks.extend(tasks)  # type: ignore[arg-type]
    record.answer_kinds.extend(kinds)  # type: ignore[arg-type]
    capabilities = [c for c in record.capabilities if 1 <= len(c) <= MAX_CAPABILITY_CHARS][:MAX_CAPABILITIES]
    del record.capabilities[:]
    record.capabilities.extend(capabilities)
    estimates = [
        q for q in record.quality if in_range(q.quality, 0.0, 1.0) and q.task in TASKS and q.complexity in COMPLEXITIES
    ][:MAX_QUALITY_ESTIMATES]
    kept = [_copy_estimate(q) for q in estimates]
    del record.quality[:]
    record.quality.extend(kept)
    if record.state not in STATES:
        # Unknown: keep it out of routing until a readiness probe says it serves.
        record.state = common_pb2.MODEL_STATE_UNHEALTHY


def _repair_stats(stats: registry_pb2.LiveStats) -> None:
    for series in (getattr(stats, f) for f in ("time_to_first_token", "per_token") if stats.HasField(f)):
        for name in ("ewma_ms", "p50_ms", "p95_ms", "p99_ms"):
            setattr(series, name, _clamp(getattr(series, name), MAX_LATENCY_MS))
    stats.error_rate = _clamp(stats.error_rate, 1.0)


def sanitize_record(record: registry_pb2.ModelRecord) -> tuple[registry_pb2.ModelRecord, bool]:
    """A copy of a stored ``record`` brought within the limits, for files written by older versions.

    Non-finite or negative numbers become 0 (unknown) and big ones are clamped; undefined enum values,
    out-of-range quality estimates and over-long capabilities are dropped and lists cut to their
    limits; an undefined state becomes UNHEALTHY (a probe brings the model back); the persisted
    statistics get the same treatment. The name and backend are kept as they are (they identify the
    model and where it is served).

    Returns:
        The repaired copy, and whether anything changed.
    """
    repaired = registry_pb2.ModelRecord()
    repaired.CopyFrom(record)
    _repair_declared(repaired)
    if repaired.HasField("stats"):
        _repair_stats(repaired.stats)
    changed = repaired.SerializeToString(deterministic=True) != record.SerializeToString(deterministic=True)
    return repaired, changed
