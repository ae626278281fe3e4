"""Per-model confusion matrices for closed-answer tasks, estimated on a pool's ``train`` split.

A matrix of model ``m`` holds ``P_m(y | theta)``: the probability that ``m`` answers ``y`` when the true
label is ``theta``. Rows are the task's labels (``A``-``D`` for ARC, ``A``/``B`` for Winogrande);
columns are the labels plus :data:`ABSTAIN` (no extractable answer, or an answer outside the labels),
so a refusal is evidence too and never silently dropped.

Estimates are Dirichlet posteriors: each row's counts plus a symmetric pseudo-count ``prior`` (Laplace
smoothing at ``prior=1``), so no entry is 0 and no single call can veto a label. The posterior mean is
the point estimate (:attr:`ConfusionMatrix.probs`); :meth:`ConfusionMatrix.interval` gives entry-wise
credible intervals, and :meth:`ConfusionMatrix.posterior_draws` feeds the pessimistic planning of
:func:`constellation.planning.surrogate.pair_table`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from constellation.errors import InvalidArgument
from constellation.pools import PoolRecord

ABSTAIN = "<abstain>"


@dataclass(frozen=True)
class ConfusionMatrix:
    """One model's answer distribution per true label (a Dirichlet posterior per row).

    Attributes:
        model: The model's name.
        labels: The task's labels, in a fixed order shared by every matrix of the task.
        counts: ``len(labels) x (len(labels) + 1)`` observed counts; the last column is :data:`ABSTAIN`.
        prior: The symmetric Dirichlet pseudo-count added to every cell (> 0).
    """

    model: str
    labels: tuple[str, ...]
    counts: np.ndarray
    prior: float = 1.0

    def __post_init__(self) -> None:
        k = len(self.labels)
        if k < 2:
            raise InvalidArgument(f"a confusion matrix needs at least two labels, got {self.labels}")
        if self.counts.shape != (k, k + 1):
            raise InvalidArgument(f"counts of {self.model} must be {k}x{k + 1}, got {self.counts.shape}")
        if self.prior <= 0 or (self.counts < 0).any():
            raise InvalidArgument("prior must be > 0 and counts >= 0")

    @property
    def outputs(self) -> tuple[str, ...]:
        """Column names: the labels, then :data:`ABSTAIN`."""
        return (*self.labels, ABSTAIN)

    @property
    def probs(self) -> np.ndarray:
        """Posterior-mean ``P(y | theta)``, rows sum to 1 and every entry is > 0."""
        smoothed = self.counts + self.prior
        return smoothed / smoothed.sum(axis=1, keepdims=True)

    @property
    def accuracy_per_label(self) -> dict[str, float]:
        """Posterior-mean probability of answering the true label, per label."""
        return {label: float(self.probs[i, i]) for i, label in enumerate(self.labels)}

    def column(self, answer: str | None) -> int:
        """The column of an answer: its label's, else :data:`ABSTAIN`'s (None, empty, unknown)."""
        if answer is not None and answer in self.labels:
            return self.labels.index(answer)
        return len(self.labels)

    def posterior_draws(self, draws: int, rng: np.random.Generator) -> np.ndarray:
        """``draws x K x (K+1)`` matrices sampled from the rows' Dirichlet posteriors (independent rows)."""
        alpha = self.counts + self.prior
        return np.stack([rng.dirichlet(row, size=draws) for row in alpha], axis=1)

    def interval(self, level: float = 0.95, draws: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Entry-wise equal-tailed credible interval ``(low, high)`` of ``P(y | theta)`` at ``level``."""
        sample = self.posterior_draws(draws, np.random.default_rng(seed))
        tail = (1.0 - level) / 2.0
        return np.quantile(sample, tail, axis=0), np.quantile(sample, 1.0 - tail, axis=0)


def estimate(
    model: str, labels: Sequence[str], pairs: Iterable[tuple[str, str | None]], prior: float = 1.0
) -> ConfusionMatrix:
    """A matrix from ``(true label, answer)`` pairs; answers outside ``labels`` count as :data:`ABSTAIN`.

    Pairs whose true label is not in ``labels`` are skipped (e.g. a prompt without a reference).
    """
    labels = tuple(labels)
    counts = np.zeros((len(labels), len(labels) + 1))
    for truth, answer in pairs:
        if truth not in labels:
            continue
        column = labels.index(answer) if answer in labels else len(labels)
        counts[labels.index(truth), column] += 1
    return ConfusionMatrix(model, labels, counts, prior)


def _choice(answer: str | None) -> str | None:
    return answer.strip().upper() or None if answer is not None else None


def from_records(
    records: Iterable[PoolRecord], labels: Sequence[str], *, split: str = "train", prior: float = 1.0
) -> dict[str, ConfusionMatrix]:
    """Per-model matrices from a closed-answer pool's records of one ``split`` (train by default).

    Answers and references are compared as upper-case letters. Records of other splits and records
    without a reference are ignored.

    Raises:
        InvalidArgument: no record of ``split`` has a reference among ``labels``.
    """
    labels = tuple(labels)
    observed: dict[str, list[tuple[str, str | None]]] = {}
    for record in records:
        truth = _choice(record.reference)
        if record.split != split or truth is None or truth not in labels:
            continue
        for model, response in record.responses.items():
            observed.setdefault(model, []).append((truth, _choice(response.answer)))
    if not observed:
        raise InvalidArgument(f"no {split} record has a reference among {tuple(labels)}")
    return {model: estimate(model, labels, pairs, prior) for model, pairs in observed.items()}


def mean_costs(records: Iterable[PoolRecord], *, split: str = "train") -> dict[str, float]:
    """Mean recorded ``cost_usd`` per model on one split (missing costs count as 0)."""
    totals: dict[str, list[float]] = {}
    for record in records:
        if record.split != split:
            continue
        for model, response in record.responses.items():
            totals.setdefault(model, []).append(response.cost_usd or 0.0)
    return {model: float(np.mean(values)) for model, values in totals.items()}


def check_aligned(matrices: Mapping[str, ConfusionMatrix]) -> tuple[str, ...]:
    """The labels shared by every matrix.

    Raises:
        InvalidArgument: no matrices, or two matrices disagree on the labels.
    """
    if not matrices:
        raise InvalidArgument("no confusion matrices")
    labels = {m.labels for m in matrices.values()}
    if len(labels) != 1:
        raise InvalidArgument(f"confusion matrices disagree on labels: {sorted(labels)}")
    return labels.pop()
