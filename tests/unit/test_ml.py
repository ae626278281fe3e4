"""The shared ML of :mod:`constellation.ml`: answers, votes, calibration and the embedding caches."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from constellation.ml.answers import candidate_answer, extract_answer, normalize_answer
from constellation.ml.calibration import choose_threshold, fit_isotonic
from constellation.ml.embeddings import EmbeddingCache, EmbeddingStore, text_key
from constellation.ml.vote import FEATURE_NAMES, UNKNOWN_RELIABILITY, Ballot, features, options_in, tally, weight


def test_reading_answers_from_text() -> None:
    assert extract_answer("number", 'so {"reasoning": "...", "answer": "1,250.0"}') == "1250"
    assert extract_answer("number", r"The total is \boxed{42} dollars, not 7.") == "42"
    assert extract_answer("number", "First 3, then 5, so the answer is 18.") == "18"
    assert extract_answer("number", "no digits here") is None
    assert extract_answer("choice", "B") == "B"
    assert extract_answer("choice", "(C) because ...") == "C"
    assert extract_answer("choice", "The answer is (d).") == "D"
    assert extract_answer("choice", "I do not know") is None
    assert extract_answer("choice", "A first step would be") is None
    assert candidate_answer("number", "$1,000", "whatever 7") == "1000"


def test_weights_decide_over_headcount() -> None:
    strong, weak = 0.97, 0.55
    result = tally([Ballot("7", strong, 0), Ballot("9", weak, 1), Ballot("9", weak, 2)])
    assert weight(strong) > 2 * weight(weak)
    assert result.answer == "7"
    assert (result.votes_for, result.votes_total) == (1, 3)
    assert 0.5 < result.weighted_share < 1.0
    assert result.runner_up == "9"
    # Plurality ignores reliability: headcount wins.
    assert tally([Ballot("7", strong, 0), Ballot("9", weak, 1), Ballot("9", weak, 2)], "plurality").answer == "9"


def test_exact_tie_goes_to_the_better_ranked_voter_whatever_the_order() -> None:
    ballots = [Ballot("B", 0.8, 1), Ballot("A", 0.8, 0)]
    assert tally(ballots).answer == "A"
    assert tally(list(reversed(ballots))).answer == "A"
    assert tally(ballots).weighted_share == pytest.approx(0.5)


def test_unset_reliability_counts_as_unknown() -> None:
    assert Ballot("1", 0.0).p == UNKNOWN_RELIABILITY
    result = tally([Ballot("1", 0.0), Ballot("1", 0.0), Ballot("2", 0.0)])
    assert result.answer == "1" and result.weighted_share == pytest.approx(2 / 3)


def test_isotonic_is_monotone_and_threshold_reaches_the_target() -> None:
    positions, values = fit_isotonic(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.0, 1.0, 0.0, 1.0]))
    assert list(values) == sorted(values) and len(positions) == len(values) == 3
    confidence = [0.1, 0.3, 0.6, 0.9, 0.95]
    correct = [0, 0, 1, 1, 1]
    assert choose_threshold(confidence, correct, 1.0) == pytest.approx(0.305)
    assert choose_threshold([0.2], [0], 0.9) == 1.0
    assert len(features(tally([Ballot("1", 0.9)]), "number")) == len(FEATURE_NAMES)


def test_options_are_counted_in_the_last_question_only() -> None:

    few_shot = "Q: pick one\nA) x\nB) y\nC) z\nAnswer: B\n\nNow: which?\nA) Kyle\nB) Logan\nAnswer:"
    assert options_in(few_shot) == 2
    assert options_in("(A) red\n(B) blue\n(C) green\n(D) none") == 4
    assert options_in("What is 2 + 2?") == 0


def test_normalised_answers_compare_numbers_as_numbers() -> None:
    assert normalize_answer("number", " 1,000.0 ") == normalize_answer("number", "$1000") == "1000"
    assert normalize_answer("number", "2.5") == "2.5"
    assert normalize_answer("choice", " b ") == "B"
    assert normalize_answer("open", "   ") is None


def test_one_isotonic_fit_pools_ties_only_when_asked() -> None:
    x, y = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 0.0, 0.5, 0.5])
    pooled_x, pooled_y = fit_isotonic(x, y)
    apart_x, apart_y = fit_isotonic(x, y, merge_ties=False)
    assert list(pooled_y) == [0.5] and list(pooled_x) == [1.5]
    assert list(apart_y) == [0.5, 0.5, 0.5] and list(apart_x) == [0.5, 2.0, 3.0]


class FakeEncoder:
    """Stands in for the MiniLM encoder: a text's vector is its length in every dimension; counts calls."""

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, texts: list[str]) -> SimpleNamespace:
        self.encoded += texts
        vectors = np.array([[float(len(t))] * 4 for t in texts], dtype=np.float32)
        return SimpleNamespace(embeddings=vectors, truncated=np.zeros(len(texts), bool), tokens=np.ones(len(texts)))


def test_embedding_store_embeds_each_text_once_and_survives_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    store, encoder = EmbeddingStore(path), FakeEncoder()
    assert store.fill(encoder, ["ab", "abc", "ab"], show_progress=False) == 2
    assert store.fill(encoder, ["ab"], show_progress=False) == 0
    assert encoder.encoded == ["ab", "abc"]
    reloaded = EmbeddingStore(path)
    assert reloaded.get(["abc"]).tolist() == [[3.0] * 4]
    assert not list(tmp_path.glob("*.tmp.npz"))


def test_embedding_cache_keeps_flags_and_token_counts_across_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "cache.npz"
    cache = EmbeddingCache(path)
    cache.put("hello", np.ones(4, np.float32), True, 7)
    cache.save()
    row = EmbeddingCache(path).get("hello")
    assert row is not None and row[1] is True and row[2] == 7
    assert EmbeddingCache.key("hello") == EmbeddingStore.key("hello") == text_key("hello")
