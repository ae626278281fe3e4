from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from constellation.pools import PoolFormatError, model_cards_for, pool_models, read_pool, split_of
from tests.pool_fixtures import RECORDS, write_pool


@pytest.mark.parametrize("compress", [True, False])
def test_reads_gzip_and_plain(tmp_path: Path, compress: bool) -> None:
    path = write_pool(tmp_path / "tiny.jsonl.gz", compress=compress)
    records = list(read_pool(path))
    assert [r.id for r in records] == [r["id"] for r in RECORDS]
    assert [r.id for r in read_pool(path, split="test")] == ["tiny/2", "tiny/3", "tiny/4", "tiny/5"]
    assert pool_models(path) == ["cheap", "mid", "strong"]
    last = records[-1].responses["strong"]
    assert last.text == "8 ünïcode ✓" and last.output_tokens is None and last.quality == 0.0
    assert model_cards_for(path)["strong"].price_out_per_mtok == 30.0


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def good_line(**changes: object) -> str:
    record = {"id": "x/0", "task": "x", "split": "test", "prompt": "p", "reference": None, "answer_kind": "open",
              "responses": {"m": {"text": "t", "answer": None, "correct": None, "score": 0.5,
                                  "input_tokens": None, "output_tokens": None, "cost_usd": None}}}  # fmt: skip
    record.update(changes)
    return json.dumps(record)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not valid JSON"),
        (good_line(split="dev"), "split must be one of"),
        (good_line(answer_kind="essay"), "answer_kind must be one of"),
        (good_line(prompt=None), "'prompt' is missing"),
        (good_line(responses={}), "responses must be a non-empty object"),
        (good_line(responses={"m": {"text": 3}}), "responses['m'].text must be a string"),
        (good_line(responses={"m": {"text": "t", "score": 1.5}}), "score must be in [0, 1]"),
        (good_line(responses={"m": {"text": "t", "correct": 2}}), "correct must be 0, 1 or null"),
        (good_line(responses={"m": {"text": "t", "cost_usd": "cheap"}}), "cost_usd must be a number"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [good_line(), line])
    with pytest.raises(PoolFormatError) as caught:
        list(read_pool(path))
    assert caught.value.line == 2
    assert caught.value.path == str(path)
    assert f"{path}:2:" in caught.value.message
    assert problem in caught.value.message


def test_duplicate_ids_and_bad_gzip(tmp_path: Path) -> None:
    with pytest.raises(PoolFormatError, match="duplicate id"):
        list(read_pool(write_lines(tmp_path / "dup.jsonl", [good_line(), good_line()])))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"id": 1}\n')[:-6])
    with pytest.raises(PoolFormatError):
        list(read_pool(broken))


def test_split_rule_matches_the_data_readme() -> None:
    # sha1("gsm8k/0")[0] decides; the rule is documented in the recorded pools' README.
    assert split_of("gsm8k/0") in ("train", "test")
    assert {split_of(f"t/{i}") for i in range(50)} == {"train", "test"}
