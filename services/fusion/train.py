"""``constellation train fusion``: fits the vote's confidence calibrator on the train splits of recorded pools.

Steps (train splits only; ``python -m bench.fusion`` scores on the test splits):

1. each model's accuracy on the pool's train split is its reliability;
2. per train prompt, simulated constellations (:mod:`services.fusion.simulate`): the top k models by
   accuracy and ``--random-sets`` random k-model sets, for k in 3, 5, 7;
3. the vote weighting with the highest voted accuracy over those votes is kept (all three are reported);
4. a logistic regression on the agreement features, with and without an isotonic map on top; the one
   with the lower 5-fold cross-validated expected calibration error (folds by prompt) is kept, then
   refitted on every row;
5. the ``uncertain`` threshold: the lowest confidence at which the votes kept (not flagged) were right
   at least ``--target-accuracy`` of the time (default 0.95), on the out-of-fold confidences of all
   pools together. With one threshold for every kind of query, easy pools are flagged rarely and hard
   ones often: the jury says it disagrees rather than pretend. (On train, 0.95 flags ~19% of votes: 5% on
   gsm8k, 14% on ARC, 39% on Winogrande; 0.9 would flag 2% and leave Winogrande's kept votes 80% right,
   0.97 would flag 35%.)

The artifact lands in ``<out>/fusion/<hash12>/manifest.json`` and ``<out>/fusion/CURRENT`` names it.
Runs in seconds on one core.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from constellation.ml.calibration import choose_threshold, expected_calibration_error
from constellation.ml.vote import FEATURE_NAMES, WEIGHTINGS
from constellation.pools import read_pool
from constellation.training import run_training
from services.fusion.calibration import Calibrator, default_artifact_root, fit_calibrator, save_artifact
from services.fusion.simulate import POOLS, VoteRow, simulate, train_accuracy

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
"""``../shared/data`` beside the project checkout."""
DEFAULT_TARGET_ACCURACY = 0.95
FOLDS = 5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="constellation train fusion",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fit the fusion vote's confidence calibrator (P(voted answer is correct)) on simulated "
        "constellations over the train splits of the closed-answer pools (gsm8k, routerbench_arc, "
        "routerbench_winogrande), and write a versioned artifact that `constellation serve fusion` loads.",
        epilog="examples:\n  constellation train fusion\n  constellation train fusion --target-accuracy 0.95 "
        "--out /tmp/artifacts\n\nScore on the test splits with `python -m bench.fusion`.",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"where pools live (default {DEFAULT_DATA_DIR})"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="artifact root (default: $CONSTELLATION_CACHE_DIR/artifacts, else ~/.cache/constellation/artifacts)",
    )
    parser.add_argument(
        "--target-accuracy",
        type=float,
        default=DEFAULT_TARGET_ACCURACY,
        help=f"accuracy the votes not flagged uncertain must reach on train (default {DEFAULT_TARGET_ACCURACY})",
    )
    parser.add_argument("--random-sets", type=int, default=3, help="random k-model sets per prompt and k (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sets")
    parser.add_argument("--weighting", choices=WEIGHTINGS, help="force a vote weighting instead of choosing on train")
    parser.add_argument("--no-current", action="store_true", help="write the artifact but leave CURRENT alone")
    return parser


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folds(rows: Sequence[VoteRow]) -> np.ndarray:
    """Fold of each row, by a hash of its prompt id (a prompt's votes stay in one fold)."""
    return np.array([hashlib.sha1(r.record_id.encode()).digest()[1] % FOLDS for r in rows])


def out_of_fold(x: np.ndarray, y: np.ndarray, folds: np.ndarray, *, isotonic: bool, weighting: str) -> np.ndarray:
    """Each row's confidence from a calibrator fitted on the other folds."""
    predicted = np.zeros(len(y))
    for fold in range(FOLDS):
        held = folds == fold
        calibrator = fit_calibrator(x[~held], y[~held], isotonic=isotonic, weighting=weighting)
        predicted[held] = [calibrator.confidence(row) for row in x[held]]
    return predicted


def _per_pool_metrics(
    pool_of: np.ndarray, y: np.ndarray, confidence: np.ndarray, flagged: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Each pool's share of the out-of-fold results: rows, voted accuracy, ECE, flagged share, kept accuracy."""
    per_pool = {}
    for pool in POOLS:
        mask = pool_of == pool
        kept = mask & ~flagged
        per_pool[pool] = {
            "rows": int(mask.sum()),
            "voted_accuracy": float(y[mask].mean()),
            "cv_ece": expected_calibration_error(confidence[mask], y[mask]),
            "cv_flagged_share": float(flagged[mask].mean()),
            "cv_kept_accuracy": float(y[kept].mean()) if kept.any() else float("nan"),
        }
    return per_pool


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Fits and saves the calibrator for parsed arguments; returns a summary (what ``main`` prints)."""
    started = time.perf_counter()
    if not 0.0 < args.target_accuracy <= 1.0:
        raise ValueError("--target-accuracy must be in (0, 1]")
    paths = {pool: Path(args.data_dir) / f"{pool}.jsonl.gz" for pool in POOLS}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"pools not found: {', '.join(missing)}")
    records = {pool: list(read_pool(path, split="train")) for pool, path in paths.items()}
    accuracy = {pool: train_accuracy(recs) for pool, recs in records.items()}

    def rows_for(weighting: str) -> list[VoteRow]:
        return [
            row
            for pool in POOLS
            for row in simulate(
                pool, records[pool], accuracy[pool], random_sets=args.random_sets, seed=args.seed, weighting=weighting
            )
        ]

    by_weighting: dict[str, dict[str, Any]] = {}
    rows_of: dict[str, list[VoteRow]] = {}
    for weighting in [args.weighting] if args.weighting else WEIGHTINGS:
        rows_of[weighting] = rows_for(weighting)
        rows = rows_of[weighting]
        by_weighting[weighting] = {
            "voted_accuracy": float(np.mean([r.correct for r in rows])),
            "top_k_voted_accuracy": float(np.mean([r.correct for r in rows if r.draw == "top"])),
        }
    weighting = max(by_weighting, key=lambda w: by_weighting[w]["voted_accuracy"])
    rows = rows_of[weighting]
    x = np.array([r.features for r in rows], dtype=float)
    y = np.array([r.correct for r in rows], dtype=float)
    folds = _folds(rows)
    candidates: dict[str, dict[str, Any]] = {}
    oof: dict[str, np.ndarray] = {}
    for name, isotonic in (("logistic", False), ("logistic+isotonic", True)):
        oof[name] = out_of_fold(x, y, folds, isotonic=isotonic, weighting=weighting)
        candidates[name] = {
            "cv_ece": expected_calibration_error(oof[name], y),
            "cv_brier": float(np.mean((oof[name] - y) ** 2)),
        }
    chosen = min(candidates, key=lambda n: candidates[n]["cv_ece"])
    pool_of = np.array([r.pool for r in rows])
    threshold = choose_threshold(oof[chosen], y, args.target_accuracy)
    flagged = oof[chosen] < threshold
    fitted = fit_calibrator(x, y, isotonic=chosen.endswith("isotonic"), weighting=weighting, threshold=threshold)
    calibrator = Calibrator(**{**fitted.__dict__, "threshold": threshold})
    per_pool = _per_pool_metrics(pool_of, y, oof[chosen], flagged)
    metrics = {
        "weightings": by_weighting,
        "calibrators": candidates,
        "per_pool": per_pool,
        "threshold": threshold,
        "target_accuracy": args.target_accuracy,
        "cv_flagged_share": float(flagged.mean()),
        "cv_kept_accuracy": float(y[~flagged].mean()) if (~flagged).any() else float("nan"),
    }
    training = {
        "pools": [{"file": p.name, "sha256": _file_sha256(p)} for p in paths.values()],
        "rows": len(rows),
        "random_sets": args.random_sets,
        "seed": args.seed,
        "ks": [3, 5, 7],
        "seconds": round(time.perf_counter() - started, 1),
    }
    manifest = {
        "features": list(FEATURE_NAMES),
        "method": chosen,
        "weighting": weighting,
        "reliability": "each model's accuracy on the pool's train split",
        "ece_bins": "10 equal-width bins on [0, 1]",
        "threshold_rule": (
            f"lowest confidence at which the kept votes of all pools together reach accuracy >= "
            f"{args.target_accuracy} (out-of-fold confidences)"
        ),
        "model_accuracy": accuracy,
        "training": training,
        "metrics": metrics,
    }
    root = Path(args.out) if args.out is not None else default_artifact_root()
    artifact = save_artifact(calibrator, manifest, root, make_current=not args.no_current)
    return {
        "artifact": str(artifact.path),
        "content_hash": artifact.content_hash,
        "rows": len(rows),
        "weighting": weighting,
        "method": chosen,
        "threshold": threshold,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``constellation train fusion``; returns the exit status."""
    return run_training(build_parser(), train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
