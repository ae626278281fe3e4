"""Confusion matrices: counts, the abstain column, smoothing, intervals, and reading a pool's train split."""

from __future__ import annotations

import numpy as np
import pytest

from constellation.errors import InvalidArgument
from constellation.planning.confusion import ABSTAIN, estimate, from_records, mean_costs
from constellation.pools import PoolRecord, Response


def _response(answer: str | None, cost: float = 0.001) -> Response:
    return Response("", answer, None, None, None, None, cost)


def _record(n: int, split: str, reference: str | None, answers: dict[str, str | None]) -> PoolRecord:
    responses = {m: _response(a) for m, a in answers.items()}
    return PoolRecord(f"t/{n}", "t", split, "p", reference, "choice", responses)


def test_estimate_counts_answers_outside_labels_as_abstain() -> None:
    matrix = estimate("m", "AB", [("A", "A"), ("A", "B"), ("B", None), ("B", "Z"), ("C", "A")], prior=1.0)
    assert matrix.outputs == ("A", "B", ABSTAIN)
    assert matrix.counts.tolist() == [[1, 1, 0], [0, 0, 2]]
    assert np.allclose(matrix.probs.sum(axis=1), 1.0)
    assert matrix.probs[1, 2] == pytest.approx(3 / 5)  # (2 + 1) / (2 + 3)
    assert (matrix.probs > 0).all()


def test_interval_brackets_the_posterior_mean_and_narrows_with_data() -> None:
    small = estimate("m", "AB", [("A", "A")] * 8 + [("A", "B")] * 2 + [("B", "B")] * 10)
    large = estimate("m", "AB", [("A", "A")] * 800 + [("A", "B")] * 200 + [("B", "B")] * 1000)
    low, high = small.interval(0.9)
    assert (low <= small.probs).all() and (small.probs <= high).all()
    low_l, high_l = large.interval(0.9)
    assert (high_l - low_l)[0, 0] < (high - low)[0, 0] / 5


def test_from_records_uses_only_the_train_split_and_known_references() -> None:
    records = [
        _record(0, "train", "A", {"x": "A", "y": "b"}),
        _record(1, "train", None, {"x": "A", "y": "A"}),
        _record(2, "test", "B", {"x": "A", "y": "B"}),
    ]
    matrices = from_records(records, "AB", prior=0.5)
    assert matrices["x"].counts.tolist() == [[1, 0, 0], [0, 0, 0]]
    assert matrices["y"].counts.tolist() == [[0, 1, 0], [0, 0, 0]]  # "b" upper-cased
    assert mean_costs(records) == {"x": pytest.approx(0.001), "y": pytest.approx(0.001)}
    with pytest.raises(InvalidArgument):
        from_records(records, "AB", split="test", prior=0.5) and from_records(records[1:2], "AB")
