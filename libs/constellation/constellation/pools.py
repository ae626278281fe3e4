"""Recorded pools: real outputs of many LLMs on the same prompts, with correctness and cost.

A pool is a JSON-lines file (optionally gzip-compressed, detected by its magic bytes) with one prompt
per line::

    {"id": "gsm8k/0", "task": "gsm8k", "split": "train"|"test", "prompt": "...",
     "reference": "18" | null, "answer_kind": "number"|"choice"|"code"|"open",
     "responses": {"<model>": {"text": "...", "answer": "18" | null, "correct": 0|1|null,
                               "score": 0.0-1.0|null, "input_tokens": int|null,
                               "output_tokens": int|null, "cost_usd": float|null}, ...}, ...}

Files are read as a stream (pools are tens of MB). Malformed input raises :class:`PoolFormatError`
naming the file and line. A ``models.json`` beside the pool (family, size, prices) is read with
:func:`read_model_cards`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from constellation.errors import InvalidArgument

ANSWER_KINDS = ("number", "choice", "code", "open")
SPLITS = ("train", "test")


class PoolFormatError(InvalidArgument):
    """A pool or model-card file is malformed. ``path`` and ``line`` (1-based, 0 = whole file) say where."""

    def __init__(self, path: Path | str, line: int, problem: str):
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {problem}", reason="POOL_FORMAT")
        self.path = str(path)
        self.line = line
        self.problem = problem


@dataclass(frozen=True)
class Response:
    """One model's recorded answer to one prompt."""

    text: str
    answer: str | None
    correct: int | None
    score: float | None
    input_tokens: int | None
    output_tokens: int | None
    cost_usd: float | None

    @property
    def quality(self) -> float:
        """The quality signal in [0, 1]: ``score`` when recorded, else ``correct``, else 0."""
        if self.score is not None:
            return self.score
        return float(self.correct or 0)


@dataclass(frozen=True)
class PoolRecord:
    """One prompt of a pool with every model's recorded response."""

    id: str
    task: str
    split: str
    prompt: str
    reference: str | None
    answer_kind: str
    responses: dict[str, Response]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelCard:
    """What ``models.json`` says of a model. Unknown fields are None."""

    name: str
    family: str | None = None
    params_b: float | None = None
    open_weights: bool | None = None
    price_in_per_mtok: float | None = None
    price_out_per_mtok: float | None = None


def split_of(record_id: str) -> str:
    """The deterministic split rule of the recorded pools: ``train`` iff sha1(id)[0] < 179."""
    return "train" if hashlib.sha1(record_id.encode()).digest()[0] < 179 else "test"


def _open_text(path: Path) -> IO[str]:
    raw = path.open("rb")
    magic = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8")
    return io.TextIOWrapper(raw, encoding="utf-8")


def _optional(value: Any, kind: type | tuple[type, ...], path: Path, line: int, name: str) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise PoolFormatError(path, line, f"{name} must be {_kind_name(kind)} or null, got a boolean")
    if not isinstance(value, kind):
        raise PoolFormatError(path, line, f"{name} must be {_kind_name(kind)} or null, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        return "a number"
    return " or ".join(
        {"int": "an integer", "float": "a number", "str": "a string"}.get(k.__name__, k.__name__) for k in kinds
    )


def _parse_response(model: str, raw: Any, path: Path, line: int) -> Response:
    where = f"responses[{model!r}]"
    if not isinstance(raw, dict):
        raise PoolFormatError(path, line, f"{where} must be an object")
    text = raw.get("text")
    if not isinstance(text, str):
        raise PoolFormatError(path, line, f"{where}.text must be a string")
    correct = _optional(raw.get("correct"), int, path, line, f"{where}.correct")
    if correct not in (None, 0, 1):
        raise PoolFormatError(path, line, f"{where}.correct must be 0, 1 or null, got {correct}")
    score = _optional(raw.get("score"), (int, float), path, line, f"{where}.score")
    if score is not None and not 0.0 <= score <= 1.0:
        raise PoolFormatError(path, line, f"{where}.score must be in [0, 1], got {score}")
    cost = _optional(raw.get("cost_usd"), (int, float), path, line, f"{where}.cost_usd")
    if cost is not None and cost < 0:
        raise PoolFormatError(path, line, f"{where}.cost_usd must be >= 0, got {cost}")
    return Response(
        text=text,
        answer=_optional(raw.get("answer"), str, path, line, f"{where}.answer"),
        correct=correct,
        score=None if score is None else float(score),
        input_tokens=_optional(raw.get("input_tokens"), int, path, line, f"{where}.input_tokens"),
        output_tokens=_optional(raw.get("output_tokens"), int, path, line, f"{where}.output_tokens"),
        cost_usd=None if cost is None else float(cost),
    )


_KNOWN = {"id", "task", "split", "prompt", "reference", "answer_kind", "responses"}


def _parse_record(raw: Any, path: Path, line: int) -> PoolRecord:
    if not isinstance(raw, dict):
        raise PoolFormatError(path, line, "each line must be a JSON object")
    for name in ("id", "task", "prompt", "answer_kind", "split"):
        if not isinstance(raw.get(name), str):
            raise PoolFormatError(path, line, f"field {name!r} is missing or not a string")
    if raw["split"] not in SPLITS:
        raise PoolFormatError(path, line, f"split must be one of {SPLITS}, got {raw['split']!r}")
    if raw["answer_kind"] not in ANSWER_KINDS:
        raise PoolFormatError(path, line, f"answer_kind must be one of {ANSWER_KINDS}, got {raw['answer_kind']!r}")
    reference = raw.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise PoolFormatError(path, line, "reference must be a string or null")
    responses = raw.get("responses")
    if not isinstance(responses, dict) or not responses:
        raise PoolFormatError(path, line, "responses must be a non-empty object of model -> response")
    return PoolRecord(
        id=raw["id"],
        task=raw["task"],
        split=raw["split"],
        prompt=raw["prompt"],
        reference=reference,
        answer_kind=raw["answer_kind"],
        responses={str(m): _parse_response(str(m), r, path, line) for m, r in responses.items()},
        extra={k: v for k, v in raw.items() if k not in _KNOWN},
    )


def read_pool(path: Path | str, *, split: str | None = None) -> Iterator[PoolRecord]:
    """Yields the records of a pool file in file order, optionally only one split.

    Raises:
        PoolFormatError: a line is not JSON or breaks the format (file and line in the message), or
            two lines share an id.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if split is not None and split not in SPLITS:
        raise InvalidArgument(f"split must be one of {SPLITS}, got {split!r}")
    seen: set[str] = set()
    with _open_text(path) as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PoolFormatError(path, number, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
                record = _parse_record(raw, path, number)
                if record.id in seen:
                    raise PoolFormatError(path, number, f"duplicate id {record.id!r}")
                seen.add(record.id)
                if split is None or record.split == split:
                    yield record
        except (gzip.BadGzipFile, EOFError, UnicodeDecodeError) as exc:
            raise PoolFormatError(path, 0, f"cannot be read: {exc}") from None


def pool_models(path: Path | str) -> list[str]:
    """The model names of a pool, in the order of its first record."""
    for record in read_pool(path):
        return list(record.responses)
    raise PoolFormatError(path, 0, "the pool has no records")


def read_model_cards(path: Path | str) -> dict[str, ModelCard]:
    """Reads ``models.json`` (an object of model name -> card).

    Raises:
        PoolFormatError: the file is not a JSON object of objects, or a field has the wrong type.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PoolFormatError(path, exc.lineno, f"not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise PoolFormatError(path, 0, "must be a JSON object of model name -> card")
    cards: dict[str, ModelCard] = {}
    for name, card in raw.items():
        if not isinstance(card, dict):
            raise PoolFormatError(path, 0, f"card of {name!r} must be an object")
        values: dict[str, Any] = {}
        for key in ("price_in_per_mtok", "price_out_per_mtok", "params_b"):
            value = card.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise PoolFormatError(path, 0, f"{name}.{key} must be a number or null")
            values[key] = None if value is None else float(value)
        cards[name] = ModelCard(name=name, family=card.get("family"), open_weights=card.get("open_weights"), **values)
    return cards


def model_cards_for(pool_path: Path | str) -> dict[str, ModelCard]:
    """The ``models.json`` beside a pool file, or an empty mapping when there is none."""
    beside = Path(pool_path).with_name("models.json")
    return read_model_cards(beside) if beside.is_file() else {}
