"""The pairwise ranker: antisymmetry by construction, ordering by mean win probability, a tiny model
trained here on synthetic pairs, and the versioned artifact (round trip, tamper check)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from constellation.errors import FailedPrecondition
from services.ranking.pairwise import (
    DIMENSIONS,
    FEATURES,
    SHARED_FEATURES,
    SIDE_FEATURES,
    FitSettings,
    PairRanker,
    PairSet,
    RankerArtifact,
    fit_pair_ranker,
    load_ranker,
    mean_win_probability,
    save_ranker,
    shared_features,
)
from services.ranking.rank import CandidateText, Ranker


def _unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.normal(size=(n, DIMENSIONS)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)  # type: ignore[no-any-return]


def _random_ranker(seed: int = 0, hidden: int = 8) -> PairRanker:
    rng = np.random.default_rng(seed)
    return PairRanker(
        {
            "mean": np.zeros(FEATURES, np.float32),
            "std": np.ones(FEATURES, np.float32),
            "w1": rng.normal(size=(FEATURES, hidden)).astype(np.float32),
            "b1": rng.normal(size=hidden).astype(np.float32),
            "w2": rng.normal(size=hidden).astype(np.float32),
            "b2": np.array(0.3, dtype=np.float32),
        }
    )


def test_any_weights_give_an_antisymmetric_win_matrix() -> None:
    rng = np.random.default_rng(1)
    n = 6
    matrix = _random_ranker().win_matrix(
        _unit_rows(rng, 1)[0],
        _unit_rows(rng, n),
        rng.uniform(size=(n, len(SIDE_FEATURES))).astype(np.float32),
        shared_features("open", False),
    )
    off_diagonal = ~np.eye(n, dtype=bool)
    assert np.allclose((matrix + matrix.T)[off_diagonal], 1.0)
    assert np.allclose(np.diag(matrix), 0.5)
    assert ((matrix > 0) & (matrix < 1)).all()
    wins = mean_win_probability(matrix)
    assert ((wins >= 0) & (wins <= 1)).all()
    assert wins.mean() == pytest.approx(0.5)  # every pair hands out exactly one win in total


QUALITY_COLUMN = SIDE_FEATURES.index("format")


def _synthetic_pairs(seed: int) -> PairSet:
    """Sets of 5 candidates whose quality is their form score (a side feature). Their embeddings are
    random within a 4-dimensional subspace: with full-rank noise, a few hundred pairs are too few not to
    overfit 1,152 embedding features."""
    rng = np.random.default_rng(seed)
    groups, per = 60, 5
    embeddings = np.zeros((groups * per, DIMENSIONS), np.float32)
    embeddings[:, :4] = _unit_rows(rng, groups * per)[:, :4]
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    side = np.zeros((groups * per, len(SIDE_FEATURES)), np.float32)
    side[:, QUALITY_COLUMN] = quality = rng.uniform(size=groups * per)
    a, b, held = [], [], []
    for g in range(groups):
        members = range(g * per, (g + 1) * per)
        for i in members:
            for j in members:
                if quality[i] > quality[j]:
                    a.append(i)
                    b.append(j)
                    held.append(g % 5 == 0)
    pairs = PairSet(
        query=_unit_rows(rng, groups),
        embeddings=embeddings,
        side=side,
        shared=np.tile(shared_features("open", False), (groups, 1)),
        group=np.repeat(np.arange(groups), per),
        a=np.array(a),
        b=np.array(b),
        label=np.ones(len(a), np.float32),
        held_out=np.array(held),
    )
    return pairs


def test_a_tiny_model_learns_synthetic_preferences_and_orders_candidates() -> None:
    pairs = _synthetic_pairs(seed=2)
    ranker, report = fit_pair_ranker(pairs, FitSettings(hidden=16, epochs=25, batch_size=64, learning_rate=5e-3))
    assert report.validation_ranker is not None and 1 <= report.epochs <= 25
    assert report.validation_accuracy > 0.8
    # Fresh open-answer candidates through the real pipeline: the finished sentences (form 1.0) must
    # come before the ones cut mid-sentence (0.5) and the empty one (0.0).
    rng = np.random.default_rng(3)
    texts = ["It is cut off in the", "A full answer.", "", "Another full answer!", "Half of it and"]
    artifact = RankerArtifact(ranker, {"content_hash": "synthetic"})
    fresh = np.zeros((len(texts), DIMENSIONS), np.float32)
    fresh[:, :4] = _unit_rows(rng, len(texts))[:, :4]
    fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)
    ranking = Ranker(None, artifact).rank_embedded(
        _unit_rows(rng, 1)[0], fresh, [CandidateText(t) for t in texts], "open"
    )
    assert ranking.stage == "pairwise"
    order = [r.index for r in ranking.ranked]
    assert set(order[:2]) == {1, 3} and set(order[2:4]) == {0, 4} and order[4] == 2
    assert not any(r.pruned for r in ranking.ranked)  # five candidates: below the pruning size
    scores = [r.score for r in ranking.ranked]
    assert scores == sorted(scores, reverse=True)


def test_artifact_round_trip_and_tamper_check(tmp_path: Path) -> None:
    ranker = _random_ranker()
    saved = save_ranker(ranker, {"note": "unit test", "training": {"seconds": 1.0}}, tmp_path)
    assert saved.path is not None and saved.path.parent == tmp_path / "ranker"
    assert (tmp_path / "ranker" / "CURRENT").read_text().strip() == saved.path.name
    again = save_ranker(ranker, {"note": "unit test", "training": {"seconds": 9.0}}, tmp_path)
    assert again.content_hash == saved.content_hash  # wall times do not change the identity
    loaded = load_ranker(tmp_path)
    assert loaded.content_hash == saved.content_hash
    assert loaded.manifest["features"]["side"] == list(SIDE_FEATURES)
    assert loaded.manifest["features"]["shared"] == list(SHARED_FEATURES)
    manifest = json.loads((saved.path / "manifest.json").read_text())
    manifest["note"] = "edited"
    (saved.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FailedPrecondition, match="content hash mismatch"):
        load_ranker(saved.path)
    with pytest.raises(FailedPrecondition, match="train ranker"):
        load_ranker(tmp_path / "nothing")
