"""The ranking service's cheap first stage on hand-made candidates: answer reading, form checks,
agreement, centrality, the prune and the first-stage-only order (no encoder, no trained model)."""

from __future__ import annotations

import numpy as np
import pytest

from constellation.errors import InvalidArgument
from services.ranking.checks import closed_answer, code_score, format_score, open_score
from services.ranking.prefilter import agreement, centrality, keep_count, signals, survivors
from services.ranking.rank import CandidateText, Ranker, validate_request


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"reasoning": "9 eggs at $2", "answer": "$18"}', "18"),
        ("So the total is \\boxed{1,250}.", "1250"),
        ("First 3 + 4 = 7, then the answer is 14.0 apples", "14"),
        ("She pays 5 dollars, then 7 dollars, 12 in all", "12"),
        ("no digits here", None),
    ],
)
def test_numbers_are_read_and_normalised(text: str, expected: str | None) -> None:
    assert closed_answer("number", text) == expected


def test_choices_are_read_and_the_callers_answer_wins() -> None:
    assert closed_answer("choice", " b") == "B"
    assert closed_answer("choice", "(C) because plants need light") == "C"
    assert closed_answer("choice", "I think the answer is D.") == "D"
    assert closed_answer("choice", "I do not know") is None
    assert closed_answer("choice", "whatever the text says", normalized_answer="a") == "A"
    assert closed_answer("number", "42", normalized_answer="1,000") == "1000"
    assert closed_answer("open", "42") is None


def test_code_form() -> None:
    good = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"
    truncated = "```python\ndef add(a, b):\n    total = a +\n"
    broken = "def add(a, b) return a + b"
    assert code_score(good) == 1.0
    assert code_score("x = 1") == 0.5
    assert code_score(truncated) == 0.75
    assert code_score(broken) == 0.25
    assert code_score("I cannot write code.") == 0.0  # prose: does not parse, defines nothing
    assert format_score("code", good) > format_score("code", broken)


def test_open_form() -> None:
    assert open_score("") == 0.0
    assert open_score("Paris is the capital of France.") == 1.0
    assert open_score("Paris is the capital of France and it is famous for") == 0.5
    assert open_score("Steps:\n1. Boil water") == 0.75
    assert format_score("number", "nothing to read") == 0.25 and format_score("number", "It is 4") == 1.0


def test_agreement_counts_the_others() -> None:
    shares = agreement(["4", "4", "5", None, "4"])
    assert shares.tolist() == pytest.approx([0.5, 0.5, 0.0, 0.0, 0.5])
    assert agreement(["4"]).tolist() == [0.0]


def test_centrality_is_the_mean_cosine_to_the_others() -> None:
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    assert centrality(vectors, 3).tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert centrality(None, 3).tolist() == [0.0, 0.0, 0.0]


def test_keep_count_defaults_and_overrides() -> None:
    assert keep_count(20) == 7  # ceil(0.35 * 20)
    assert keep_count(5) == 5  # small sets are not pruned by default
    assert keep_count(5, keep=1) == 2  # never fewer than two
    assert keep_count(5, keep=9) == 5
    assert keep_count(1, keep=3) == 1
    assert keep_count(9, fraction=0.1) == 2


def test_survivors_are_best_first_with_stable_ties() -> None:
    assert survivors(np.array([0.2, 0.9, 0.9, 0.5], dtype=np.float32), 3).tolist() == [1, 2, 3]


def test_majority_answer_leads_without_an_encoder() -> None:
    texts = ["The answer is 12", "12", "I get 13", "so 12 in total", "it is 7", "maybe 13", "hmm", "12 apples", "9"]
    found = signals("number", texts)
    assert found.answers[:3] == ["12", "12", "13"] and found.answers[6] is None
    assert found.score[1] > found.score[2] > found.score[6]
    ranking = Ranker(None, None).rank("How many apples?", [CandidateText(t) for t in texts], "number")
    assert ranking.stage == "first_stage"
    assert sorted(r.index for r in ranking.ranked) == list(range(len(texts)))
    assert [r.rank for r in ranking.ranked] == list(range(len(texts)))
    kept = [r for r in ranking.ranked if not r.pruned]
    assert len(kept) == 4  # ceil(0.35 * 9)
    assert {texts[r.index] for r in kept} == {"The answer is 12", "12", "so 12 in total", "12 apples"}
    assert all(r.pruned for r in ranking.ranked[len(kept) :])
    assert all(0.0 <= r.score <= 1.0 for r in ranking.ranked)


def test_validation_names_each_bad_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_request(" ", [], max_chars=100)
    assert [v.field for v in caught.value.violations] == ["prompt", "candidates"]
    with pytest.raises(InvalidArgument) as too_many:
        validate_request("q", [CandidateText("a")] * 65, max_chars=100)
    assert [v.field for v in too_many.value.violations] == ["candidates"]
    with pytest.raises(InvalidArgument) as long_text:
        validate_request("q", [CandidateText("a"), CandidateText("b" * 101, reliability=2.0)], max_chars=100)
    assert [v.field for v in long_text.value.violations] == ["candidates[1].text", "candidates[1].reliability"]


def test_open_answers_are_pruned_by_length_form_and_centrality() -> None:
    long_answer = "Paris is the capital of France. " * 20
    texts = ["Paris.", long_answer, "It is Paris, which is", "Hmm", "", "France's capital is Paris, on the Seine."]
    texts += ["Paris, I think."] * 3
    found = signals("open", texts)
    assert found.length.max() == pytest.approx(1.0) and found.length[4] == 0.0
    assert int(np.argmax(found.score)) == 1
    kept = survivors(found.score, keep_count(len(texts)))
    assert 1 in kept and 4 not in kept
