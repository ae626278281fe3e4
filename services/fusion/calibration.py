"""Calibrated confidence of a vote: P(the voted answer is correct) from its agreement features.

A :class:`Calibrator` is a logistic regression over the standardised features of
:func:`constellation.ml.vote.features`, optionally followed by an isotonic map of its output (a
monotone step function fitted by pool-adjacent-violators, interpolated linearly between steps). Both
are fitted here in numpy (Newton's method with a small L2 penalty; no scikit-learn), in well under a
second for tens of thousands of rows. ``uncertain`` is ``confidence < threshold``, with the threshold
chosen on train.

The artifact is a directory holding one JSON file::

    <root>/fusion/<hash12>/manifest.json   coefficients, isotonic steps, threshold, training metrics
    <root>/fusion/CURRENT                  the name of the directory to load by default

``content_hash`` is the SHA-256 of the manifest without its volatile fields (the hash itself, the
creation time and training wall time). Writing is atomic (a temporary directory renamed into place, then
``CURRENT`` replaced). Predicting is plain Python and thread-safe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from constellation import artifacts
from constellation.errors import FailedPrecondition
from constellation.ml.calibration import fit_isotonic
from constellation.ml.vote import FEATURE_NAMES

ARTIFACT_KIND = "constellation.fusion.calibrator"
SCHEMA_VERSION = 1
FAMILY = "fusion"
TRAIN_COMMAND = "constellation train fusion"
"""Numbers given as a sequence or a 1-D array."""


@dataclass(frozen=True)
class Calibrator:
    """Maps agreement features to a calibrated probability of being right.

    Attributes:
        mean: Feature means used for standardising (one per :data:`FEATURE_NAMES`).
        std: Feature spreads (1 where a feature was constant).
        coef: Logistic-regression weights on the standardised features.
        intercept: Its intercept.
        iso_x: Isotonic step positions on the regression's probability (ascending); empty: none.
        iso_y: Calibrated probabilities at those positions (non-decreasing).
        threshold: Confidence below which a vote is flagged ``uncertain``.
        weighting: The vote weighting the calibrator was fitted for (see :data:`~constellation.ml.vote.WEIGHTINGS`).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    iso_x: tuple[float, ...]
    iso_y: tuple[float, ...]
    threshold: float
    weighting: str

    def regression(self, features: Sequence[float]) -> float:
        """The logistic regression's probability alone (before the isotonic map)."""
        z = self.intercept + sum(
            c * (f - m) / s for c, f, m, s in zip(self.coef, features, self.mean, self.std, strict=True)
        )
        return 1.0 / (1.0 + math.exp(-max(min(z, 40.0), -40.0)))

    def confidence(self, features: Sequence[float]) -> float:
        """P(correct) for one vote's features, in [0, 1]."""
        p = self.regression(features)
        if not self.iso_x:
            return p
        return float(np.interp(p, self.iso_x, self.iso_y))

    def to_json(self) -> dict[str, Any]:
        return {
            "features": list(FEATURE_NAMES),
            "mean": list(self.mean),
            "std": list(self.std),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "isotonic": {"x": list(self.iso_x), "y": list(self.iso_y)},
            "threshold": self.threshold,
            "weighting": self.weighting,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Calibrator:
        if list(raw["features"]) != list(FEATURE_NAMES):
            raise ValueError(f"calibrator features {raw['features']} differ from this code's {list(FEATURE_NAMES)}")
        return cls(
            mean=tuple(float(v) for v in raw["mean"]),
            std=tuple(float(v) for v in raw["std"]),
            coef=tuple(float(v) for v in raw["coef"]),
            intercept=float(raw["intercept"]),
            iso_x=tuple(float(v) for v in raw["isotonic"]["x"]),
            iso_y=tuple(float(v) for v in raw["isotonic"]["y"]),
            threshold=float(raw["threshold"]),
            weighting=str(raw["weighting"]),
        )


# --- fitting ------------------------------------------------------------------------------------


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1e-3, iterations: int = 50) -> tuple[np.ndarray, float]:
    """Weights and intercept of an L2-penalised logistic regression (Newton's method; intercept unpenalised).

    Args:
        x: ``[n, d]`` standardised features.
        y: ``[n]`` labels in {0, 1}.
        l2: Penalty on the weights, per row.
        iterations: Most Newton steps (it converges in under 15 on these features).
    """
    n, d = x.shape
    design = np.hstack([np.ones((n, 1)), x])
    beta = np.zeros(d + 1)
    penalty = np.full(d + 1, l2 * n)
    penalty[0] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ beta, -40, 40)))
        gradient = design.T @ (p - y) + penalty * beta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if float(np.max(np.abs(step))) < 1e-8:
            break
    return beta[1:], float(beta[0])


def fit_calibrator(
    x: np.ndarray, y: np.ndarray, *, isotonic: bool, weighting: str, threshold: float = 0.5
) -> Calibrator:
    """Fits a calibrator on raw (unstandardised) features ``x`` and labels ``y``."""
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std < 1e-9] = 1.0
    coef, intercept = fit_logistic((x - mean) / std, y)
    calibrator = Calibrator(
        tuple(float(v) for v in mean), tuple(float(v) for v in std), tuple(float(v) for v in coef),
        intercept, (), (), threshold, weighting,
    )  # fmt: skip
    if not isotonic:
        return calibrator
    scores = np.array([calibrator.regression(row) for row in x])
    iso_x, iso_y = fit_isotonic(scores, y)
    return Calibrator(
        calibrator.mean, calibrator.std, calibrator.coef, intercept,
        tuple(float(v) for v in iso_x), tuple(float(v) for v in iso_y), threshold, weighting,
    )  # fmt: skip


# --- artifact -----------------------------------------------------------------------------------


def default_artifact_root() -> Path:
    """``<cache dir>/artifacts`` (``$CONSTELLATION_CACHE_DIR``, else ``~/.cache/constellation``)."""
    return artifacts.default_root()


@dataclass(frozen=True)
class CalibrationArtifact:
    """A loaded calibrator with its manifest and directory."""

    calibrator: Calibrator
    manifest: dict[str, Any]
    path: Path

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])


def save_artifact(
    calibrator: Calibrator, manifest: Mapping[str, Any], root: Path, *, make_current: bool = True
) -> CalibrationArtifact:
    """Writes ``root/fusion/<hash12>/manifest.json`` (see :mod:`constellation.artifacts`) and, by default,
    points ``CURRENT`` at it. Saving the same calibrator and manifest twice gives the same directory."""
    full = {**manifest, "kind": ARTIFACT_KIND, "schema_version": SCHEMA_VERSION, "calibrator": calibrator.to_json()}
    target = artifacts.save(FAMILY, {}, full, root, make_current=make_current)
    return load_artifact(target)


def resolve_artifact(path: Path | str) -> Path:
    """The artifact directory ``path`` names: itself, or what ``CURRENT`` names in it or in its ``fusion/``.

    Raises:
        FailedPrecondition: nothing loadable there; the message says how to train one.
    """
    return artifacts.resolve(path, FAMILY, train_command=TRAIN_COMMAND)


def load_artifact(path: Path | str) -> CalibrationArtifact:
    """Loads and verifies a calibrator artifact (one small JSON file: milliseconds).

    Raises:
        FailedPrecondition: no artifact there, an unknown kind or schema, a content hash that does not
            match (damaged or hand-edited), or features that differ from this code's.
    """
    loaded = artifacts.load(path, FAMILY, train_command=TRAIN_COMMAND)
    directory, manifest = loaded.path, loaded.manifest
    if manifest.get("kind") != ARTIFACT_KIND or manifest.get("schema_version") != SCHEMA_VERSION:
        raise FailedPrecondition(
            f"{directory}: not a fusion calibrator of schema {SCHEMA_VERSION} "
            f"(kind {manifest.get('kind')!r}, schema {manifest.get('schema_version')!r})",
            reason="FUSION_ARTIFACT_SCHEMA",
        )
    try:
        calibrator = Calibrator.from_json(manifest["calibrator"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FailedPrecondition(f"{directory}: {exc}; retrain it", reason="FUSION_ARTIFACT_SCHEMA") from exc
    return CalibrationArtifact(calibrator, manifest, directory)
