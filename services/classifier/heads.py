"""Small trained heads over the frozen query embedding, and the versioned artifact that holds them.

Four heads share one input, the *features* of a prompt: its 384-float embedding plus ``log1p`` of the
prompt's and the focus text's lengths in characters and the truncation flag, standardised with the
training mean and spread. Each head is a one-hidden-layer MLP (ReLU) with a softmax: task type,
complexity and answer kind over their labels, output length over bins of ``log1p(tokens)``. The length
prediction is the median of that binned distribution (each bin stands for the median of its training
rows). Binning, rather than regressing, matters: lengths are bimodal (one token for a letter answer,
hundreds for prose), and a regressor hedging between the modes is wrong for both. Training runs in
torch (:func:`fit_heads`); inference is numpy (microseconds per batch).

An artifact is a directory::

    <root>/classifier/<hash12>/manifest.json   what it is: labels, thresholds, metrics, encoder identity
    <root>/classifier/<hash12>/heads.npz       the weights (no pickles)
    <root>/classifier/CURRENT                  the name of the directory to load by default

``content_hash`` is the SHA-256 of the manifest (without the hash itself, the creation time and the
training wall time) and of every array (name, dtype, shape, bytes): two artifacts with the same hash
predict the same. :func:`load_artifact` verifies it. Writing is atomic (a temporary directory renamed
into place, then ``CURRENT`` replaced), so a reader never sees half an artifact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from constellation import artifacts
from constellation.errors import FailedPrecondition

log = logging.getLogger(__name__)

ARTIFACT_KIND = "constellation.classifier.heads"
SCHEMA_VERSION = 2
FAMILY = "classifier"
TRAIN_COMMAND = "constellation train classifier"
ARRAYS = "heads.npz"
CLASS_HEADS = ("task", "complexity", "answer_kind")
"""Heads over labels; ``output_tokens`` is over length bins."""
HEADS = (*CLASS_HEADS, "output_tokens")
LENGTH_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""Bin edges of the length head beyond the first (``log1p(tokens) < 1``, letter answers): these quantiles
of the longer training rows."""
_VOLATILE = ("content_hash", "created_at")


def default_artifact_root() -> Path:
    """``<cache dir>/artifacts``: the cache dir of :func:`constellation.paths.default_cache_dir`."""
    return artifacts.default_root()


def features(
    embeddings: np.ndarray, prompt_chars: Sequence[int], focus_chars: Sequence[int], truncated: Any
) -> np.ndarray:
    """The heads' input: ``float32 [n, 387]`` (embedding, log lengths, truncation flag), not standardised."""
    extra = np.stack(
        [
            np.log1p(np.asarray(prompt_chars, dtype=np.float32)) / 10.0,
            np.log1p(np.asarray(focus_chars, dtype=np.float32)) / 10.0,
            np.asarray(truncated, dtype=np.float32),
        ],
        axis=1,
    )
    return np.concatenate([np.asarray(embeddings, dtype=np.float32), extra], axis=1)


@dataclass(frozen=True)
class HeadPredictions:
    """Predictions for a batch, in input order.

    Attributes:
        task: Task label per row, and ``task_confidence`` its softmax probability.
        complexity: Complexity label per row, with its probability.
        answer_kind: Answer kind per row, with its probability.
        output_tokens: Expected output length in tokens (``expm1`` of the regressed log).
    """

    task: list[str]
    task_confidence: np.ndarray
    complexity: list[str]
    complexity_confidence: np.ndarray
    answer_kind: list[str]
    answer_kind_confidence: np.ndarray
    output_tokens: np.ndarray


def _weighted_median(values: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Per row, the median of a distribution putting ``probabilities[i, k]`` on ``values[k]``."""
    order = np.argsort(values)
    cumulative = np.cumsum(probabilities[:, order], axis=1)
    return values[order][(cumulative >= 0.5).argmax(axis=1)]  # type: ignore[no-any-return]


def length_bins(log_tokens: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges over ``log1p(tokens)`` and each bin's median value, from training targets.

    The first edge is 1.0 (at most ~1.7 tokens: letter answers); the others are :data:`LENGTH_QUANTILES`
    of the rows above it. Empty bins are dropped.
    """
    y = np.asarray(log_tokens, dtype=np.float64)
    longer = y[y >= 1.0]
    edges = np.unique(np.concatenate([[1.0], np.quantile(longer, LENGTH_QUANTILES) if longer.size else []]))
    bins = np.digitize(y, edges)
    kept = [k for k in range(len(edges) + 1) if (bins == k).any()]
    values = np.array([np.median(y[bins == k]) for k in kept], dtype=np.float32)
    cuts = np.array([edges[k - 1] for k in kept[1:]], dtype=np.float32)
    return cuts, values


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


@dataclass
class Heads:
    """The trained heads. Immutable after construction; ``predict`` is thread-safe.

    Attributes:
        labels: Label set of each classifying head, in logit order.
        arrays: ``<head>.w1 / .b1 / .w2 / .b2`` per head, ``features.mean`` and ``features.std``, and
            ``output_tokens.edges`` / ``output_tokens.values`` (length bins over ``log1p(tokens)``).
    """

    labels: dict[str, list[str]]
    arrays: dict[str, np.ndarray]

    def _forward(self, head: str, x: np.ndarray) -> np.ndarray:
        hidden = np.maximum(x @ self.arrays[f"{head}.w1"] + self.arrays[f"{head}.b1"], 0.0)
        return hidden @ self.arrays[f"{head}.w2"] + self.arrays[f"{head}.b2"]  # type: ignore[no-any-return]

    def predict(self, raw_features: np.ndarray) -> HeadPredictions:
        """Predicts every head for ``raw_features`` (``[n, 387]``, as :func:`features` builds them)."""
        x = (raw_features - self.arrays["features.mean"]) / self.arrays["features.std"]
        out: dict[str, tuple[list[str], np.ndarray]] = {}
        for head in CLASS_HEADS:
            probabilities = _softmax(self._forward(head, x))
            best = probabilities.argmax(axis=1)
            out[head] = ([self.labels[head][i] for i in best], probabilities[np.arange(len(best)), best])
        log_tokens = _weighted_median(self.arrays["output_tokens.values"], _softmax(self._forward("output_tokens", x)))
        return HeadPredictions(
            task=out["task"][0],
            task_confidence=out["task"][1],
            complexity=out["complexity"][0],
            complexity_confidence=out["complexity"][1],
            answer_kind=out["answer_kind"][0],
            answer_kind_confidence=out["answer_kind"][1],
            output_tokens=np.expm1(np.clip(log_tokens, 0.0, 12.0)),
        )


@dataclass
class Artifact:
    """Trained heads and their manifest (a JSON object; see :func:`save_artifact` for its fields)."""

    heads: Heads
    manifest: dict[str, Any]
    path: Path | None = None

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    stable = {k: v for k, v in manifest.items() if k not in _VOLATILE}
    training = dict(stable.get("training", {}))
    training.pop("seconds", None)
    stable["training"] = training
    return json.dumps(stable, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def content_hash(manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the manifest's stable fields and of every array; see the module docstring."""
    digest = hashlib.sha256(_canonical(manifest))
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_artifact(heads: Heads, manifest: Mapping[str, Any], root: Path, *, make_current: bool = True) -> Artifact:
    """Writes heads and manifest under ``root/classifier/<hash12>/`` and (by default) points CURRENT at it.

    The manifest gets ``kind``, ``schema_version``, ``labels``, ``content_hash`` and ``created_at``
    added. Saving the same heads and manifest twice gives the same directory and hash.

    Returns:
        The saved artifact, with ``path`` set.
    """
    full = {
        **manifest,
        "kind": ARTIFACT_KIND,
        "schema_version": SCHEMA_VERSION,
        "labels": heads.labels,
    }
    target = artifacts.save(
        FAMILY, heads.arrays, full, root, make_current=make_current, arrays_file=ARRAYS, hash_of=content_hash
    )
    return Artifact(heads, json.loads((target / "manifest.json").read_text()), target)


def resolve_artifact(path: Path | str) -> Path:
    """The artifact directory that ``path`` names: itself, or what ``CURRENT`` names inside it (or inside
    its ``classifier/`` child, so the artifacts root works too).

    Raises:
        FailedPrecondition: nothing loadable there; the message says how to train one.
    """
    return artifacts.resolve(path, FAMILY, train_command=TRAIN_COMMAND)


def load_artifact(path: Path | str) -> Artifact:
    """Loads and verifies an artifact (milliseconds: a JSON file and ~1 MB of arrays).

    Args:
        path: An artifact directory, or a directory holding ``CURRENT`` (see :func:`resolve_artifact`).

    Raises:
        FailedPrecondition: no artifact there, an unknown kind or schema, or the content hash does not
            match (a damaged or hand-edited artifact).
    """
    directory = resolve_artifact(path)
    manifest = json.loads((directory / "manifest.json").read_text())
    if manifest.get("kind") != ARTIFACT_KIND or manifest.get("schema_version") != SCHEMA_VERSION:
        raise FailedPrecondition(
            f"{directory}: not a classifier artifact of schema {SCHEMA_VERSION} "
            f"(kind {manifest.get('kind')!r}, schema {manifest.get('schema_version')!r})",
            reason="CLASSIFIER_ARTIFACT_SCHEMA",
        )
    with np.load(directory / ARRAYS, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    expected = content_hash(manifest, arrays)
    if manifest.get("content_hash") != expected:
        raise FailedPrecondition(
            f"{directory}: content hash mismatch (manifest {manifest.get('content_hash')!r}, contents {expected!r});"
            " retrain it",
            reason="CLASSIFIER_ARTIFACT_CORRUPT",
        )
    labels = {head: list(manifest["labels"][head]) for head in CLASS_HEADS}
    needed = {"features.mean", "features.std", "output_tokens.edges", "output_tokens.values"}
    needed |= {f"{head}.{part}" for head in HEADS for part in ("w1", "b1", "w2", "b2")}
    if needed - set(arrays):
        raise FailedPrecondition(
            f"{directory}: heads.npz lacks {sorted(needed - set(arrays))}; retrain it",
            reason="CLASSIFIER_ARTIFACT_CORRUPT",
        )
    return Artifact(Heads(labels, arrays), manifest, directory)


# --- training -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSettings:
    """Hyper-parameters of :func:`fit_heads`.

    Attributes:
        hidden: Hidden units per head.
        epochs: Most full-batch epochs; the count is chosen on a validation split (early stopping),
            then the heads are refit on all training rows for that many epochs.
        learning_rate: Adam learning rate.
        weight_decay: AdamW decoupled weight decay.
        dropout: Dropout on the hidden layer while training.
        validation_fraction: Share of training rows held out to choose the epoch count and report
            validation metrics (chosen by a hash of the row id, so it is stable).
        patience: Epochs without validation improvement before stopping.
        seed: torch seed; with the same data and seed, training is deterministic on one machine.
    """

    hidden: int = 256
    epochs: int = 300
    learning_rate: float = 2e-3
    weight_decay: float = 1e-2
    dropout: float = 0.3
    validation_fraction: float = 0.15
    patience: int = 25
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FitReport:
    """What training measured. ``validation`` metrics come from the held-out share of train."""

    epochs: dict[str, int] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)


def macro_f1(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean of per-class F1 over ``labels`` that occur in ``truth`` or ``predicted``."""
    scores = []
    for label in labels:
        tp = sum(1 for t, p in zip(truth, predicted, strict=True) if t == label and p == label)
        fp = sum(1 for t, p in zip(truth, predicted, strict=True) if t != label and p == label)
        fn = sum(1 for t, p in zip(truth, predicted, strict=True) if t == label and p != label)
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(sum(scores) / len(scores)) if scores else 0.0


def evaluate(heads: Heads, x: np.ndarray, targets: Mapping[str, Sequence[Any]]) -> dict[str, float]:
    """Accuracy of each classifying head, complexity macro-F1, and output-length MAE in log1p tokens."""
    predictions = heads.predict(x)
    metrics = {}
    for head in CLASS_HEADS:
        predicted = getattr(predictions, head)
        truth = list(targets[head])
        metrics[f"{head}_accuracy"] = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
    metrics["complexity_macro_f1"] = macro_f1(
        list(targets["complexity"]), predictions.complexity, heads.labels["complexity"]
    )
    predicted_log = np.log1p(predictions.output_tokens)
    metrics["output_log_mae"] = float(np.mean(np.abs(predicted_log - np.asarray(targets["log_output_tokens"]))))
    return {k: round(v, 4) for k, v in metrics.items()}


def _validation_mask(ids: Sequence[str], fraction: float) -> np.ndarray:
    cut = int(fraction * 2**32)
    return np.array([int.from_bytes(hashlib.sha256(f"val:{i}".encode()).digest()[:4], "big") < cut for i in ids])


def fit_heads(
    x: np.ndarray,
    targets: Mapping[str, Sequence[Any]],
    ids: Sequence[str],
    settings: TrainingSettings = TrainingSettings(),
    *,
    label_sets: Mapping[str, Sequence[str]] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[Heads, FitReport]:
    """Trains the four heads on CPU with torch (seconds for a few thousand rows).

    Args:
        x: Raw features, ``[n, 387]`` (see :func:`features`).
        targets: ``task``, ``complexity``, ``answer_kind`` (labels) and ``log_output_tokens`` (floats).
        ids: Row ids; a hash of each picks the validation rows.
        settings: Hyper-parameters.
        label_sets: Full label set of each classifying head (default: the labels seen, sorted). Labels
            never seen in training keep a logit but are never predicted in practice.
        progress: Called as ``progress(stage, done, total)`` after each epoch.

    Returns:
        Heads refit on all rows, and a report with validation metrics.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is as fast, and far faster on a busy machine
    try:
        return _fit(torch, x, targets, ids, settings, label_sets, progress)
    finally:
        torch.set_num_threads(threads)


def _export(head: str, model: Any, into: dict[str, np.ndarray]) -> None:
    """A trained head's two linear layers as numpy arrays under ``<head>.w1/b1/w2/b2`` in ``into``."""
    into[f"{head}.w1"] = model[0].weight.detach().numpy().T.copy()
    into[f"{head}.b1"] = model[0].bias.detach().numpy().copy()
    into[f"{head}.w2"] = model[3].weight.detach().numpy().T.copy()
    into[f"{head}.b2"] = model[3].bias.detach().numpy().copy()


def _fit(
    torch: Any,
    x: np.ndarray,
    targets: Mapping[str, Sequence[Any]],
    ids: Sequence[str],
    settings: TrainingSettings,
    label_sets: Mapping[str, Sequence[str]] | None,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[Heads, FitReport]:
    torch.manual_seed(settings.seed)
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(axis=0)
    std = x.std(axis=0) + 1e-6
    xs = torch.from_numpy((x - mean) / std)
    labels = {
        head: list(label_sets[head]) if label_sets and head in label_sets else sorted(set(targets[head]))
        for head in CLASS_HEADS
    }
    ys: dict[str, Any] = {
        head: torch.tensor([labels[head].index(v) for v in targets[head]], dtype=torch.long) for head in CLASS_HEADS
    }
    edges, values = length_bins(targets["log_output_tokens"])
    ys["output_tokens"] = torch.from_numpy(np.digitize(np.asarray(targets["log_output_tokens"]), edges)).long()
    widths = {**{head: len(labels[head]) for head in CLASS_HEADS}, "output_tokens": len(values)}
    held_out = torch.from_numpy(_validation_mask(ids, settings.validation_fraction))
    kept = ~held_out
    report = FitReport()
    arrays: dict[str, np.ndarray] = {
        "features.mean": mean.astype(np.float32),
        "features.std": std.astype(np.float32),
        "output_tokens.edges": edges,
        "output_tokens.values": values,
    }
    total = 2 * 4 * settings.epochs
    done = 0

    def loss_of(head: str, out: Any, y: Any) -> Any:
        return torch.nn.functional.cross_entropy(out, y)

    def train(head: str, rows: Any, epochs: int, watch: Any | None) -> tuple[Any, int]:
        nonlocal done
        torch.manual_seed(settings.seed)
        width = widths[head]
        model = torch.nn.Sequential(
            torch.nn.Linear(xs.shape[1], settings.hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(settings.dropout),
            torch.nn.Linear(settings.hidden, width),
        )
        optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
        best_loss, best_epoch, best_state = math.inf, epochs, None
        for epoch in range(1, epochs + 1):
            model.train()
            optimiser.zero_grad()
            loss = loss_of(head, model(xs[rows]), ys[head][rows])
            loss.backward()
            optimiser.step()
            done += 1
            if progress is not None:
                progress(head, done, total)
            if watch is not None:
                model.eval()
                with torch.no_grad():
                    val = float(loss_of(head, model(xs[watch]), ys[head][watch]))
                if val < best_loss - 1e-4:
                    best_loss, best_epoch = val, epoch
                    best_state = {k: v.clone() for k, v in model.state_dict().items()}
                elif epoch - best_epoch >= settings.patience:
                    done += epochs - epoch
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        return model, best_epoch

    validation_arrays = dict(arrays)
    for head in HEADS:
        model, epochs = train(head, kept, settings.epochs, held_out if bool(held_out.any()) else None)
        _export(head, model, validation_arrays)
        report.epochs[head] = epochs
    if bool(held_out.any()):
        subset = held_out.numpy()
        report.validation = evaluate(
            Heads(labels, validation_arrays),
            x[subset],
            {
                k: [v for v, keep in zip(targets[k], subset, strict=True) if keep]
                for k in (*CLASS_HEADS, "log_output_tokens")
            },
        )
    everyone = torch.ones(len(xs), dtype=torch.bool)
    for head in HEADS:
        model, _ = train(head, everyone, report.epochs[head], None)
        _export(head, model, arrays)
    heads = Heads(labels, arrays)
    report.train = evaluate(heads, x, targets)
    return heads, report


def timed_load(path: Path | str) -> tuple[Artifact, float]:
    """:func:`load_artifact`, and how long it took in seconds."""
    started = time.perf_counter()
    artifact = load_artifact(path)
    return artifact, time.perf_counter() - started
