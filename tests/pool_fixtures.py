"""A tiny recorded pool the tests write themselves, with numbers simple enough to check by hand."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any


def response(text: str, answer: str | None, correct: int, cost: float, out_tokens: int | None = 10) -> dict[str, Any]:
    return {
        "text": text,
        "answer": answer,
        "correct": correct,
        "score": float(correct),
        "input_tokens": 20,
        "output_tokens": out_tokens,
        "cost_usd": cost,
    }


# Models: cheap (weak), mid, strong (expensive). Costs in USD per call.
# Train: strong 2/2, mid 1/2, cheap 1/2  -> static = strong.
# Test:   t1: cheap ok,  mid ok,  strong ok   (answers 4, 4, 4)
#         t2: cheap bad, mid ok,  strong ok   (answers 7, 6, 6)
#         t3: cheap bad, mid bad, strong ok   (answers 1, 2, 9) reference 9
#         t4: cheap bad, mid bad, strong bad  (answers 5, 5, 8) reference 3
RECORDS: list[dict[str, Any]] = [
    {"id": "tiny/0", "split": "train", "reference": "1",
     "responses": {"cheap": response("The answer is 1", "1", 1, 0.001),
                   "mid": response("The answer is 2", "2", 0, 0.01),
                   "strong": response("The answer is 1", "1", 1, 0.1)}},
    {"id": "tiny/1", "split": "train", "reference": "2",
     "responses": {"cheap": response("It is 3", "3", 0, 0.001),
                   "mid": response("It is 2", "2", 1, 0.01),
                   "strong": response("It is 2.0", "2.0", 1, 0.1)}},
    {"id": "tiny/2", "split": "test", "reference": "4",
     "responses": {"cheap": response("4", "4", 1, 0.001), "mid": response("four: 4", "4", 1, 0.01),
                   "strong": response("Answer: 4", "4", 1, 0.1)}},
    {"id": "tiny/3", "split": "test", "reference": "6",
     "responses": {"cheap": response("7", "7", 0, 0.001), "mid": response("6", "6", 1, 0.01),
                   "strong": response("6.0", "6.0", 1, 0.1)}},
    {"id": "tiny/4", "split": "test", "reference": "9",
     "responses": {"cheap": response("1", "1", 0, 0.001), "mid": response("2", "2", 0, 0.01),
                   "strong": response("nine = 9", "9", 1, 0.1)}},
    {"id": "tiny/5", "split": "test", "reference": "3",
     "responses": {"cheap": response("5", "5", 0, 0.001), "mid": response("5!", "5", 0, 0.01),
                   "strong": response("8 ünïcode ✓", "8", 0, 0.1, out_tokens=None)}},
]  # fmt: skip


def write_pool(path: Path, *, compress: bool = True) -> Path:
    lines = []
    for i, record in enumerate(RECORDS):
        full = {"task": "tiny", "answer_kind": "number", "prompt": f"Question {i}: what is the number?", **record}
        lines.append(json.dumps(full))
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    models = {
        "cheap": {"family": "toy", "params_b": 1.0, "price_in_per_mtok": 0.1, "price_out_per_mtok": 0.1},
        "mid": {"family": "toy", "params_b": 30.0, "price_in_per_mtok": 1.0, "price_out_per_mtok": 1.0},
        "strong": {"family": "toy", "params_b": None, "price_in_per_mtok": 10.0, "price_out_per_mtok": 30.0},
    }
    path.with_name("models.json").write_text(json.dumps(models))
    return path
