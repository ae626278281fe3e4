"""The pairwise ranker: P(A is better than B | query), a small MLP over MiniLM embeddings, and its artifact.

In the spirit of LLM-Blender's PairRanker, sized for a CPU: instead of a cross-encoder reading the query
and both answers together, the frozen all-MiniLM-L6-v2 embeddings of the query ``q`` and of the answers
``a`` and ``b`` are combined into pair features::

    phi(A, B) = [q * (a - b), a - b, |a - b|, side(A) - side(B), shared]

where ``side`` holds per-candidate scalars (:data:`SIDE_FEATURES`: length, form, agreement, centrality,
relevance to the query, the caller's reliability weight, whether a closed answer was read) and
``shared`` describes the set (answer kind, whether reliability is known). A one-hidden-layer MLP ``g``
scores a pair, and the ranker is antisymmetric by construction::

    logit(A, B) = (g(phi(A, B)) - g(phi(B, A))) / 2,   P(A > B) = sigmoid(logit),   so P(A > B) = 1 - P(B > A).

Candidates are ordered by their mean win probability over every other candidate (a Borda count of
probabilities; in [0, 1]). Training is torch (:func:`fit_pair_ranker`), inference numpy.

An artifact is a directory ``<root>/ranker/<hash12>/`` with ``manifest.json`` (encoder identity, pools
and their sha256, settings, held-out metrics) and ``ranker.npz`` (weights; no pickles), and
``<root>/ranker/CURRENT`` naming the default one. ``content_hash`` covers the manifest's stable fields
and every array, and :func:`load_ranker` verifies it. Writes are atomic (temporary directory renamed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from constellation import artifacts
from constellation.errors import FailedPrecondition
from services.ranking.checks import ANSWER_KINDS

ARTIFACT_KIND = "constellation.ranking.pair_ranker"
SCHEMA_VERSION = 1
FAMILY = "ranker"
ARRAYS = "ranker.npz"
TRAIN_COMMAND = "constellation train ranker"
DIMENSIONS = 384
SIDE_FEATURES = ("log_chars", "format", "agreement", "centrality", "relevance", "reliability", "has_answer")
SHARED_FEATURES = (*(f"kind_{k}" for k in ANSWER_KINDS), "reliability_known")
FEATURES = 3 * DIMENSIONS + len(SIDE_FEATURES) + len(SHARED_FEATURES)


def default_artifact_root() -> Path:
    """``<cache dir>/artifacts`` (``$CONSTELLATION_CACHE_DIR``, else ``~/.cache/constellation``)."""
    return artifacts.default_root()


def side_features(
    texts: Sequence[str],
    query: np.ndarray | None,
    embeddings: np.ndarray | None,
    form: np.ndarray,
    agreement: np.ndarray,
    centrality: np.ndarray,
    reliability: Sequence[float],
    has_answer: Sequence[bool],
) -> np.ndarray:
    """Per-candidate scalars, ``float32 [n, len(SIDE_FEATURES)]`` (relevance is 0 without embeddings)."""
    n = len(texts)
    relevance = embeddings @ query if embeddings is not None and query is not None else np.zeros(n, dtype=np.float32)
    columns = [
        np.log1p(np.array([len(t) for t in texts], dtype=np.float32)) / 8.0,
        np.asarray(form, dtype=np.float32),
        np.asarray(agreement, dtype=np.float32),
        np.asarray(centrality, dtype=np.float32),
        np.asarray(relevance, dtype=np.float32),
        np.asarray(reliability, dtype=np.float32),
        np.asarray(has_answer, dtype=np.float32),
    ]
    return np.stack(columns, axis=1) if n else np.zeros((0, len(SIDE_FEATURES)), dtype=np.float32)


def shared_features(kind: str, reliability_known: bool) -> np.ndarray:
    """Features of the candidate set as a whole, ``float32 [len(SHARED_FEATURES)]``."""
    kinds = [1.0 if kind == k else 0.0 for k in ANSWER_KINDS]
    return np.array([*kinds, 1.0 if reliability_known else 0.0], dtype=np.float32)


def pair_features(
    query: np.ndarray, a: np.ndarray, b: np.ndarray, side_a: np.ndarray, side_b: np.ndarray, shared: np.ndarray
) -> np.ndarray:
    """``phi(A, B)`` for rows of pairs: ``query`` ``[m, 384]`` (or ``[384]``), ``a``/``b`` ``[m, 384]``,
    ``side_*`` ``[m, len(SIDE_FEATURES)]``, ``shared`` ``[m, len(SHARED_FEATURES)]`` (or one row)."""
    m = a.shape[0]
    diff = a - b
    shared_rows = np.broadcast_to(shared, (m, shared.shape[-1]))
    return np.concatenate([query * diff, diff, np.abs(diff), side_a - side_b, shared_rows], axis=1).astype(np.float32)


@dataclass
class PairRanker:
    """Trained weights: ``mean``/``std`` (feature standardisation), ``w1 [F, H]``, ``b1 [H]``, ``w2 [H]``,
    ``b2 []``. Immutable after construction; every method is thread-safe (numpy only)."""

    arrays: dict[str, np.ndarray]

    def _g(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.arrays["mean"]) / self.arrays["std"]
        hidden = np.maximum(z @ self.arrays["w1"] + self.arrays["b1"], 0.0)
        return hidden @ self.arrays["w2"] + self.arrays["b2"]  # type: ignore[no-any-return]

    def pair_logits(self, phi_ab: np.ndarray, phi_ba: np.ndarray) -> np.ndarray:
        """Antisymmetric logits of ``P(A > B)`` for pair rows (``phi_ba`` is ``phi`` with A and B swapped)."""
        return (self._g(phi_ab) - self._g(phi_ba)) / 2.0

    def win_matrix(self, query: np.ndarray, embeddings: np.ndarray, side: np.ndarray, shared: np.ndarray) -> np.ndarray:
        """``P[i, j]`` = probability that candidate i beats candidate j; ``P + P.T = 1`` off the diagonal,
        0.5 on it. Cost: one MLP pass over n*(n-1)/2 pairs (milliseconds for 64 candidates)."""
        n = embeddings.shape[0]
        probabilities = np.full((n, n), 0.5, dtype=np.float64)
        if n < 2:
            return probabilities
        rows, cols = np.triu_indices(n, k=1)
        phi_ab = pair_features(query, embeddings[rows], embeddings[cols], side[rows], side[cols], shared)
        phi_ba = pair_features(query, embeddings[cols], embeddings[rows], side[cols], side[rows], shared)
        p = 0.5 * (1.0 + np.tanh(self.pair_logits(phi_ab, phi_ba).astype(np.float64) / 2.0))  # sigmoid, no overflow
        probabilities[rows, cols] = p
        probabilities[cols, rows] = 1.0 - p
        return probabilities


def mean_win_probability(probabilities: np.ndarray) -> np.ndarray:
    """Each candidate's mean probability of beating the others, in [0, 1] (0.5 for a lone candidate)."""
    n = probabilities.shape[0]
    if n < 2:
        return np.full(n, 0.5)
    return (probabilities.sum(axis=1) - np.diag(probabilities)) / (n - 1)  # type: ignore[no-any-return]


# --- artifact ---------------------------------------------------------------------------------------


@dataclass
class RankerArtifact:
    """A trained ranker and its manifest (JSON; see :func:`save_ranker`)."""

    ranker: PairRanker
    manifest: dict[str, Any]
    path: Path | None = None

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])


def save_ranker(
    ranker: PairRanker, manifest: Mapping[str, Any], root: Path, *, make_current: bool = True
) -> RankerArtifact:
    """Writes the ranker under ``root/ranker/<hash12>/`` and (by default) points ``CURRENT`` at it.

    Adds ``kind``, ``schema_version``, ``features``, ``content_hash`` and ``created_at`` to the manifest.
    Saving the same weights and manifest twice gives the same directory. Atomic: readers never see half.
    """
    full = {
        **manifest,
        "kind": ARTIFACT_KIND,
        "schema_version": SCHEMA_VERSION,
        "features": {"side": list(SIDE_FEATURES), "shared": list(SHARED_FEATURES), "width": FEATURES},
    }
    target = artifacts.save(FAMILY, ranker.arrays, full, root, make_current=make_current, arrays_file=ARRAYS)
    return RankerArtifact(ranker, json.loads((target / "manifest.json").read_text()), target)


def resolve_ranker(path: Path | str) -> Path:
    """The artifact directory ``path`` names: itself, what ``CURRENT`` names in it, or in its ``ranker/`` child.

    Raises:
        FailedPrecondition: nothing loadable there; the message says how to train one.
    """
    return artifacts.resolve(path, FAMILY, train_command=TRAIN_COMMAND)


def load_ranker(path: Path | str) -> RankerArtifact:
    """Loads and verifies a ranker artifact (milliseconds).

    Raises:
        FailedPrecondition: none there, a different kind or schema, a content-hash mismatch, missing weights.
    """
    loaded = artifacts.load(path, FAMILY, train_command=TRAIN_COMMAND, arrays_file=ARRAYS)
    directory, manifest, arrays = loaded.path, loaded.manifest, loaded.arrays
    if manifest.get("kind") != ARTIFACT_KIND or manifest.get("schema_version") != SCHEMA_VERSION:
        raise FailedPrecondition(
            f"{directory}: not a ranker artifact of schema {SCHEMA_VERSION} "
            f"(kind {manifest.get('kind')!r}, schema {manifest.get('schema_version')!r})",
            reason="RANKER_ARTIFACT_SCHEMA",
        )
    missing = {"mean", "std", "w1", "b1", "w2", "b2"} - set(arrays)
    if missing or arrays.get("w1", np.zeros((0, 0))).shape[0] != FEATURES:
        raise FailedPrecondition(
            f"{directory}: weights missing ({sorted(missing)}) or of another feature width; retrain it",
            reason="RANKER_ARTIFACT_CORRUPT",
        )
    return RankerArtifact(PairRanker(arrays), manifest, directory)


# --- training ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitSettings:
    """Hyper-parameters of :func:`fit_pair_ranker`."""

    hidden: int = 64
    epochs: int = 30
    batch_size: int = 512
    learning_rate: float = 1e-3
    weight_decay: float = 1e-3
    dropout: float = 0.1
    patience: int = 4
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PairSet:
    """Labelled pairs over a table of candidates (indices, so the features are built per minibatch).

    Attributes:
        query: ``[groups, 384]`` query embedding of each candidate set.
        embeddings: ``[candidates, 384]``.
        side: ``[candidates, len(SIDE_FEATURES)]``.
        shared: ``[groups, len(SHARED_FEATURES)]``.
        group: ``[candidates]`` the set each candidate belongs to.
        a, b: ``[pairs]`` candidate indices; ``label`` ``[pairs]`` is 1.0 when ``a`` is the better one.
        held_out: ``[pairs]`` True for validation pairs (whole sets are held out together).
    """

    query: np.ndarray
    embeddings: np.ndarray
    side: np.ndarray
    shared: np.ndarray
    group: np.ndarray
    a: np.ndarray
    b: np.ndarray
    label: np.ndarray
    held_out: np.ndarray

    def features(self, rows: np.ndarray, *, swap: bool = False) -> np.ndarray:
        """``phi(A, B)`` of the pairs ``rows`` (``phi(B, A)`` when ``swap``)."""
        a, b = (self.b[rows], self.a[rows]) if swap else (self.a[rows], self.b[rows])
        groups = self.group[a]
        return pair_features(
            self.query[groups], self.embeddings[a], self.embeddings[b], self.side[a], self.side[b], self.shared[groups]
        )


@dataclass
class FitReport:
    """What training measured: epochs kept, held-out loss and pairwise accuracy."""

    epochs: int = 0
    validation_loss: float = float("nan")
    validation_accuracy: float = float("nan")
    history: list[float] = field(default_factory=list)
    validation_ranker: PairRanker | None = field(default=None, repr=False)
    """The model fitted without the held-out pairs (to score held-out sets); None without any."""


def fit_pair_ranker(
    pairs: PairSet,
    settings: FitSettings = FitSettings(),
    *,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[PairRanker, FitReport]:
    """Trains the antisymmetric MLP on CPU with torch (one thread; seconds for tens of thousands of pairs).

    Early stopping watches the held-out pairs' loss; the model is then refit on every pair for the
    best number of epochs. Without held-out pairs it trains for ``settings.epochs``.

    Args:
        pairs: The labelled pairs.
        settings: Hyper-parameters.
        progress: Called as ``progress(epoch, total, held_out_loss)`` after each epoch of the first fit.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(torch, pairs, settings, progress)
    finally:
        torch.set_num_threads(threads)


def _fit(
    torch: Any, pairs: PairSet, settings: FitSettings, progress: Callable[[int, int, float], None] | None
) -> tuple[PairRanker, FitReport]:
    all_rows = np.arange(len(pairs.a))
    sample = all_rows if len(all_rows) <= 20000 else np.random.default_rng(settings.seed).choice(all_rows, 20000)
    both = np.concatenate([pairs.features(sample), pairs.features(sample, swap=True)])
    mean = both.mean(axis=0).astype(np.float32)
    # Floor: a feature (nearly) constant in training must not be blown up at serving time.
    std = np.maximum(both.std(axis=0), 1e-3).astype(np.float32)
    mean_t, std_t = torch.from_numpy(mean), torch.from_numpy(std)
    held = pairs.held_out
    report = FitReport()

    def tensors(rows: np.ndarray) -> tuple[Any, Any, Any]:
        ab = (torch.from_numpy(pairs.features(rows)) - mean_t) / std_t
        ba = (torch.from_numpy(pairs.features(rows, swap=True)) - mean_t) / std_t
        return ab, ba, torch.from_numpy(pairs.label[rows].astype(np.float32))

    def run(rows: np.ndarray, epochs: int, watch: np.ndarray | None) -> tuple[Any, int]:
        torch.manual_seed(settings.seed)
        rng = np.random.default_rng(settings.seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, settings.hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(settings.dropout),
            torch.nn.Linear(settings.hidden, 1),
        )
        optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
        watched = tensors(watch) if watch is not None and len(watch) else None
        best_loss, best_epoch, best_state = math.inf, epochs, None
        for epoch in range(1, epochs + 1):
            model.train()
            order = rng.permutation(rows)
            for start in range(0, len(order), settings.batch_size):
                ab, ba, y = tensors(order[start : start + settings.batch_size])
                logits = (model(ab) - model(ba)).squeeze(1) / 2.0
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            if watched is None:
                continue
            model.eval()
            with torch.no_grad():
                logits = (model(watched[0]) - model(watched[1])).squeeze(1) / 2.0
                value = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, watched[2]))
                accuracy = float(((logits > 0).float() == watched[2]).float().mean())
            report.history.append(round(value, 5))
            if progress is not None:
                progress(epoch, epochs, value)
            if value < best_loss - 1e-4:
                best_loss, best_epoch = value, epoch
                report.validation_loss, report.validation_accuracy = value, accuracy
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            elif epoch - best_epoch >= settings.patience:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        return model, best_epoch

    def export(model: Any) -> PairRanker:
        return PairRanker(
            {
                "mean": mean,
                "std": std,
                "w1": model[0].weight.detach().numpy().T.copy(),
                "b1": model[0].bias.detach().numpy().copy(),
                "w2": model[3].weight.detach().numpy()[0].copy(),
                "b2": model[3].bias.detach().numpy()[0].copy(),
            }
        )

    if held.any():
        first, report.epochs = run(all_rows[~held], settings.epochs, all_rows[held])
        report.validation_ranker = export(first)
    else:
        report.epochs = settings.epochs
    model, _ = run(all_rows, report.epochs, None)
    return export(model), report
