"""Declarative pool files, and records built from the recorded pools' model cards.

A pool file (TOML, or JSON of the same shape) lists models under ``models``::

    [[models]]
    name = "gpt-4o-mini-2024-07-18"
    family = "gpt-4o"
    params_b = 0                       # unknown
    tasks = ["math", "multiple_choice"]
    answer_kinds = ["number", "choice"]
    capabilities = ["math"]
    context_length = 128000
    price_in_per_mtok = 0.15
    price_out_per_mtok = 0.6
    version = "2024-07-18"
    traffic_weight = 1.0
    simulated = true
    backend = { endpoint = "127.0.0.1:8001", model_name = "replay", parameters = { recorded_model = "..." } }
    quality = [{ task = "math", complexity = "low", quality = 0.95 }]

Enum fields take the lower-case names without their prefix (``math``, ``number``, ``ready``).
Loading a file upserts through :meth:`Registry.register`, so it never deletes records added at run
time and never overwrites learned quality estimates or statistics.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from constellation.errors import FieldViolation, InvalidArgument
from constellation.pools import read_model_cards
from constellation.v1 import common_pb2, registry_pb2
from services.registry.validation import record_violations

REPLAY_MODEL = "replay"


def _enum_value(enum: Any, prefix: str, name: str) -> int:
    value: int = enum.Value(prefix + name.upper())
    return value


def enum_label(enum: Any, prefix: str, value: int) -> str:
    """``TASK_TYPE_MATH`` -> ``math``: the short lower-case name the pool files and the CLI use."""
    return str(enum.Name(value)).removeprefix(prefix).lower()


class _Quality(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = "unspecified"
    complexity: str = "unspecified"
    quality: float = Field(ge=0.0, le=1.0)
    observations: int = Field(default=0, ge=0)


class _Backend(BaseModel):
    model_config = ConfigDict(extra="forbid")
    endpoint: str = ""
    model_name: str = ""
    model_version: str = ""
    tensor_convention: str = "vllm"
    parameters: dict[str, str] = Field(default_factory=dict)


class _SeedModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    family: str = ""
    params_b: float = Field(default=0.0, ge=0.0)
    backend: _Backend = Field(default_factory=_Backend)
    tasks: list[str] = Field(default_factory=list)
    answer_kinds: list[str] = Field(default_factory=list)
    capabilities: list[str] = Field(default_factory=list)
    context_length: int = Field(default=0, ge=0)
    price_in_per_mtok: float = Field(default=0.0, ge=0.0)
    price_out_per_mtok: float = Field(default=0.0, ge=0.0)
    quality: list[_Quality] = Field(default_factory=list)
    state: str = "unspecified"
    version: str = ""
    traffic_weight: float = Field(default=1.0, ge=0.0, le=1.0)
    simulated: bool = False


class _SeedFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[_SeedModel] = Field(default_factory=list)


def _to_record(model: _SeedModel, where: str) -> registry_pb2.ModelRecord:
    problems: list[FieldViolation] = []

    def enum(enum_type: Any, prefix: str, name: str, field: str) -> Any:
        try:
            return _enum_value(enum_type, prefix, name)
        except ValueError:
            known = ", ".join(enum_label(enum_type, prefix, v) for v in enum_type.values() if v)
            problems.append(FieldViolation(f"{where}.{field}", f"{name!r} is not one of {known}"))
            return 0

    record = registry_pb2.ModelRecord(
        name=model.name,
        family=model.family,
        params_b=model.params_b,
        backend=common_pb2.Backend(**model.backend.model_dump()),
        tasks=[enum(common_pb2.TaskType, "TASK_TYPE_", t, f"tasks[{i}]") for i, t in enumerate(model.tasks)],
        answer_kinds=[
            enum(common_pb2.AnswerKind, "ANSWER_KIND_", k, f"answer_kinds[{i}]")
            for i, k in enumerate(model.answer_kinds)
        ],
        capabilities=model.capabilities,
        context_length=model.context_length,
        price_in_per_mtok=model.price_in_per_mtok,
        price_out_per_mtok=model.price_out_per_mtok,
        quality=[
            registry_pb2.QualityEstimate(
                task=enum(common_pb2.TaskType, "TASK_TYPE_", q.task, f"quality[{i}].task"),
                complexity=enum(common_pb2.Complexity, "COMPLEXITY_", q.complexity, f"quality[{i}].complexity"),
                quality=q.quality,
                observations=q.observations,
            )
            for i, q in enumerate(model.quality)
        ],
        state=enum(common_pb2.ModelState, "MODEL_STATE_", model.state, "state"),
        version=model.version,
        traffic_weight=model.traffic_weight,
        simulated=model.simulated,
    )
    problems += record_violations(record, where)
    if problems:
        raise InvalidArgument(f"invalid model {model.name!r} in the pool file", problems, reason="INVALID_POOL_FILE")
    return record


def parse_pool(document: Any, source: str = "pool file") -> list[registry_pb2.ModelRecord]:
    """Records from a decoded pool document (``{"models": [...]}``).

    Raises:
        InvalidArgument: a field is missing, unknown or out of range; each violation names
            ``models[i].field``.
    """
    try:
        parsed = _SeedFile.model_validate(document)
    except ValidationError as exc:
        violations = [
            FieldViolation(
                ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in e["loc"]).replace(".[", "["), e["msg"]
            )
            for e in exc.errors()
        ]
        raise InvalidArgument(f"{source} is not a valid pool", violations, reason="INVALID_POOL_FILE") from None
    return [_to_record(model, f"models[{i}]") for i, model in enumerate(parsed.models)]


def load_pool_file(path: Path | str) -> list[registry_pb2.ModelRecord]:
    """Reads a pool file: ``.json`` as JSON, anything else as TOML.

    Raises:
        InvalidArgument: the file is missing, does not parse, or holds an invalid model.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read pool file {path}: {exc.strerror}", reason="INVALID_POOL_FILE") from None
    try:
        document = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"pool file {path} does not parse: {exc}", reason="INVALID_POOL_FILE") from None
    return parse_pool(document, str(path))


def records_from_model_cards(
    models_json_path: Path | str,
    pool_models: Iterable[str],
    backend: common_pb2.Backend,
    *,
    tasks: Iterable[common_pb2.TaskType.ValueType] = (),
    answer_kinds: Iterable[common_pb2.AnswerKind.ValueType] = (),
) -> list[registry_pb2.ModelRecord]:
    """Records for recorded-pool models, served by Triton's replay model.

    Each record takes family, size and prices from ``models.json`` (a model without a card gets
    zeros) and a copy of ``backend`` whose ``parameters`` name the recorded model
    (``recorded_model``), as dispatch sends them to the replay model. Latency is marked simulated.

    Args:
        models_json_path: The ``models.json`` beside the pool files.
        pool_models: Model names as the pool files spell them.
        backend: Endpoint of the Triton serving ``replay``; an empty ``model_name`` means ``replay``.
        tasks: Task types every record declares.
        answer_kinds: Answer kinds every record declares.
    """
    cards = read_model_cards(models_json_path)
    records = []
    for name in pool_models:
        card = cards.get(name)
        served = common_pb2.Backend()
        served.CopyFrom(backend)
        served.model_name = served.model_name or REPLAY_MODEL
        served.parameters["recorded_model"] = name
        records.append(
            registry_pb2.ModelRecord(
                name=name,
                family=(card.family or "") if card else "",
                params_b=(card.params_b or 0.0) if card else 0.0,
                backend=served,
                tasks=list(tasks),
                answer_kinds=list(answer_kinds),
                price_in_per_mtok=(card.price_in_per_mtok or 0.0) if card else 0.0,
                price_out_per_mtok=(card.price_out_per_mtok or 0.0) if card else 0.0,
                traffic_weight=1.0,
                simulated=True,
            )
        )
    return records
