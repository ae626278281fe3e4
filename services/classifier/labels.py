"""Training and scoring labels for the classifier, derived from recorded pools.

Three labels per prompt, each documented where it is computed:

* **task**: the pool's task type, or a per-prompt override, from ``data/task_labels.toml`` (the rubric
  is at the top of that file).
* **complexity**: LOW / MEDIUM / HIGH from the prompt's *mean quality*, the mean over the pool's models
  of each model's quality (``score`` when recorded, else ``correct``): the fraction of models that
  answered correctly on graded pools, the mean judge score on judged ones. HIGH complexity means few
  models do well. See :class:`ComplexityBands` for the thresholds.
* **expected output tokens**: the mean over models of the recorded ``output_tokens``; where a pool
  records none (RouterBench), ``len(text) / 4`` (about four characters per token in English), at least
  one token. Heads regress ``log1p`` of it.

Nothing here imports torch or gRPC.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from constellation.errors import InvalidArgument
from constellation.pools import PoolRecord

TASKS = ("math", "code", "multiple_choice", "extraction", "writing", "reasoning", "dialogue")
"""Task types, in the order of the ``TaskType`` enum (``TASK_TYPE_MATH`` = 1, ...)."""

COMPLEXITIES = ("low", "medium", "high")
"""Complexity bands, in the order of the ``Complexity`` enum."""

ANSWER_KINDS = ("number", "choice", "code", "open")
"""Answer kinds, in the order of the ``AnswerKind`` enum."""

ANSWER_KIND_OF_TASK = {
    "math": "number",
    "code": "code",
    "multiple_choice": "choice",
    "extraction": "open",
    "writing": "open",
    "reasoning": "open",
    "dialogue": "open",
}
"""The answer kind a task implies when nothing better is known (the keyword path uses it)."""

TASK_OF_ANSWER_KIND = {"number": "math", "choice": "multiple_choice", "code": "code", "open": "writing"}
"""Fallback task of a pool that ``task_labels.toml`` does not name."""

CHARS_PER_TOKEN = 4.0
"""Characters per token used to estimate output tokens where a pool records none."""

DEFAULT_TASK_LABELS = Path(__file__).resolve().parent / "data" / "task_labels.toml"

GRADED_BANDS = (0.5, 0.8)
"""Default (high_below, low_from) on the fraction of models correct, for graded pools: HIGH when fewer
than half of the models are right, LOW when at least 80% are."""


@dataclass(frozen=True)
class ComplexityBands:
    """Thresholds that cut a pool's mean quality into three bands.

    Attributes:
        high_below: Mean quality below this is HIGH complexity (most models fail).
        low_from: Mean quality at or above this is LOW complexity (most models succeed).
        signal: ``"correct"`` (fraction of models correct) or ``"score"`` (mean judge score).
        method: How the thresholds were chosen, in words (kept in the artifact's manifest).
    """

    high_below: float
    low_from: float
    signal: str
    method: str

    def band(self, quality: float) -> str:
        """The complexity band of one prompt's mean quality."""
        if quality < self.high_below:
            return "high"
        if quality >= self.low_from:
            return "low"
        return "medium"

    def to_json(self) -> dict[str, Any]:
        return {"high_below": self.high_below, "low_from": self.low_from, "signal": self.signal, "method": self.method}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ComplexityBands:
        return cls(float(raw["high_below"]), float(raw["low_from"]), str(raw["signal"]), str(raw["method"]))


@dataclass(frozen=True)
class TaskLabels:
    """Pool -> task, and per-prompt overrides (record id -> task)."""

    pools: dict[str, str]
    overrides: dict[str, str]
    source: str

    def task_of(self, record: PoolRecord) -> str:
        """The task label of one record: its override, else its pool's task, else its answer kind's."""
        if record.id in self.overrides:
            return self.overrides[record.id]
        if record.task in self.pools:
            return self.pools[record.task]
        return TASK_OF_ANSWER_KIND[record.answer_kind]


def load_task_labels(path: Path | str = DEFAULT_TASK_LABELS) -> TaskLabels:
    """Reads a task-label file (see ``data/task_labels.toml`` for the format and the rubric).

    Raises:
        InvalidArgument: the file names an unknown task, or is not valid TOML.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path}: not valid TOML ({exc})") from exc
    pools = {str(k): str(v) for k, v in raw.get("pools", {}).items()}
    overrides: dict[str, str] = {}
    for pool, by_task in raw.get("overrides", {}).items():
        for task, numbers in by_task.items():
            for number in numbers:
                overrides[f"{pool}/{int(number)}"] = str(task)
    for task in [*pools.values(), *overrides.values()]:
        if task not in TASKS:
            raise InvalidArgument(f"{path}: unknown task {task!r}; expected one of {TASKS}")
    return TaskLabels(pools, overrides, path.name)


def mean_quality(record: PoolRecord) -> float:
    """Mean over the record's models of each model's quality (score, else correct), in [0, 1]."""
    values = [response.quality for response in record.responses.values()]
    return float(sum(values) / len(values))


def quality_signal(record: PoolRecord) -> str:
    """``"correct"`` when any model's answer is graded right/wrong, else ``"score"`` (judged)."""
    return "correct" if any(r.correct is not None for r in record.responses.values()) else "score"


def output_tokens(record: PoolRecord) -> float:
    """Expected output length in tokens: mean recorded ``output_tokens``, else mean ``len(text) / 4``."""
    recorded = [r.output_tokens for r in record.responses.values() if r.output_tokens is not None]
    if recorded:
        return float(sum(recorded) / len(recorded))
    estimates = [max(1.0, len(r.text) / CHARS_PER_TOKEN) for r in record.responses.values()]
    return float(sum(estimates) / len(estimates))


def fit_bands(
    records: Iterable[PoolRecord], *, graded: tuple[float, float] = GRADED_BANDS
) -> dict[str, ComplexityBands]:
    """Chooses the complexity thresholds of each pool (``record.task``) from its records.

    Graded pools (right/wrong answers) use the fixed ``graded`` thresholds, so LOW means "at least 80%
    of the models got it right" on every such pool. Judged pools (AlpacaEval: a judge's preference
    against a strong baseline, whose scale says little in absolute terms) are cut at the tertiles of
    the given records' mean quality, so a third of that pool falls in each band. Pass train records
    only: the thresholds are then part of what was learned, and are applied unchanged to test.
    """
    qualities: dict[str, list[float]] = {}
    signals: dict[str, str] = {}
    for record in records:
        qualities.setdefault(record.task, []).append(mean_quality(record))
        if signals.get(record.task) != "correct":
            signals[record.task] = quality_signal(record)
    bands: dict[str, ComplexityBands] = {}
    for pool, values in sorted(qualities.items()):
        if signals[pool] == "correct":
            bands[pool] = ComplexityBands(
                graded[0], graded[1], "correct", f"fixed: HIGH below {graded[0]:g}, LOW from {graded[1]:g} correct"
            )
        else:
            low, high = np.percentile(np.asarray(values), [100 / 3, 200 / 3])
            bands[pool] = ComplexityBands(
                round(float(low), 6), round(float(high), 6), "score", "tertiles of the train split's mean score"
            )
    return bands


@dataclass(frozen=True)
class LabelledPrompt:
    """One prompt with its labels.

    Attributes:
        id: The record id (``<pool>/<n>``).
        pool: The pool (``record.task``).
        split: ``train`` or ``test``.
        prompt: The exact prompt text.
        task: Task label (one of :data:`TASKS`).
        answer_kind: The pool's recorded answer kind.
        complexity: Complexity label (one of :data:`COMPLEXITIES`).
        quality: The prompt's mean quality in [0, 1].
        output_tokens: Expected output length in tokens.
    """

    id: str
    pool: str
    split: str
    prompt: str
    task: str
    answer_kind: str
    complexity: str
    quality: float
    output_tokens: float

    @property
    def log_output_tokens(self) -> float:
        return math.log1p(self.output_tokens)


def label_records(
    records: Sequence[PoolRecord], task_labels: TaskLabels, bands: Mapping[str, ComplexityBands]
) -> list[LabelledPrompt]:
    """Labels records with the given task labels and complexity thresholds.

    Raises:
        InvalidArgument: a record's pool has no thresholds in ``bands``.
    """
    labelled = []
    for record in records:
        if record.task not in bands:
            raise InvalidArgument(f"no complexity thresholds for pool {record.task!r} (known: {sorted(bands)})")
        quality = mean_quality(record)
        labelled.append(
            LabelledPrompt(
                id=record.id,
                pool=record.task,
                split=record.split,
                prompt=record.prompt,
                task=task_labels.task_of(record),
                answer_kind=record.answer_kind,
                complexity=bands[record.task].band(quality),
                quality=quality,
                output_tokens=output_tokens(record),
            )
        )
    return labelled
