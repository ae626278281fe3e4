"""Labels, training and the artifact, on a tiny pool this test writes itself."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from constellation.errors import FailedPrecondition
from constellation.pools import read_pool
from services.classifier import train
from services.classifier.heads import (
    TrainingSettings,
    content_hash,
    features,
    fit_heads,
    length_bins,
    load_artifact,
    macro_f1,
    save_artifact,
)
from services.classifier.labels import (
    ComplexityBands,
    fit_bands,
    label_records,
    load_task_labels,
    mean_quality,
    output_tokens,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _response(
    correct: int | None, out_tokens: int | None, text: str = "ok", score: float | None = None
) -> dict[str, Any]:
    return {
        "text": text,
        "answer": None,
        "correct": correct,
        "score": float(correct) if score is None and correct is not None else score,
        "input_tokens": 10,
        "output_tokens": out_tokens,
        "cost_usd": 0.001,
    }


def _record(
    n: int, split: str, prompt: str, kind: str, task: str, corrects: list[int], tokens: list[int | None]
) -> dict:
    responses = {f"m{i}": _response(c, t, text="x" * 40) for i, (c, t) in enumerate(zip(corrects, tokens, strict=True))}
    return {"id": f"{task}/{n}", "task": task, "split": split, "prompt": prompt, "reference": None,
            "answer_kind": kind, "responses": responses}  # fmt: skip


MATH = [
    "Tom has {a} apples and buys {b} more. How many apples does he have?",
    "A book costs ${a} and a pen costs ${b}. What is the total cost?",
    "What is {a} times {b}?",
]
CHOICE = "Which is bigger?\nA) {a}\nB) {b}\nAnswer with the letter."
CODE = "Write a Python function that returns {a} plus {b}."


def write_tiny_pool(directory: Path) -> Path:
    """Three tasks; the fraction of the three models that are right sets the complexity band."""
    rows = []
    n = 0
    for i in range(36):
        a, b = 3 + i, 5 + 2 * i
        solved = [[1, 1, 1], [1, 1, 0], [1, 0, 0]][i % 3]  # 1.0 -> low, 0.67 -> medium, 0.33 -> high
        split = "test" if i % 6 == 5 else "train"
        rows.append(_record(n, split, MATH[i % 3].format(a=a, b=b), "number", "mathpool", solved, [150, 200, 250]))
        n += 1
        rows.append(_record(n, split, CHOICE.format(a=a, b=b), "choice", "choicepool", solved, [None, None, None]))
        n += 1
        rows.append(_record(n, split, CODE.format(a=a, b=b), "code", "codepool", solved, [80, 120, None]))
        n += 1
    path = directory / "tiny.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in rows) + "\n").encode()))
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_pool(tmp_path_factory.mktemp("pool"))


def test_labels_worked_out_by_hand(pool: Path) -> None:
    records = list(read_pool(pool))
    bands = fit_bands([r for r in records if r.split == "train"])
    assert set(bands) == {"mathpool", "choicepool", "codepool"}
    assert bands["mathpool"] == ComplexityBands(0.5, 0.8, "correct", bands["mathpool"].method)
    labelled = {item.id: item for item in label_records(records, load_task_labels(), bands)}
    assert [labelled[f"mathpool/{n}"].complexity for n in (0, 3, 6)] == ["low", "medium", "high"]
    assert mean_quality(records[3]) == pytest.approx(2 / 3)
    # Unknown pools take the task of their answer kind.
    assert {labelled["mathpool/0"].task, labelled["choicepool/1"].task, labelled["codepool/2"].task} == {
        "math",
        "multiple_choice",
        "code",
    }
    # Recorded tokens are averaged over the models that recorded them; none recorded: len(text) / 4.
    assert output_tokens(records[0]) == pytest.approx(200.0)
    assert output_tokens(records[1]) == pytest.approx(10.0)
    assert output_tokens(records[2]) == pytest.approx(100.0)


def test_judged_pools_are_cut_at_tertiles() -> None:
    from constellation.pools import PoolRecord, Response

    def judged(n: int, score: float) -> PoolRecord:
        response = Response("t", None, None, score, 1, 1, 0.0)
        return PoolRecord(f"judged/{n}", "judged", "train", "p", None, "open", {"a": response})

    bands = fit_bands([judged(i, s) for i, s in enumerate([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])])["judged"]
    assert bands.signal == "score"
    assert [bands.band(q) for q in (0.1, 0.35, 0.6)] == ["high", "medium", "low"]


def test_task_label_overrides() -> None:
    labels = load_task_labels()
    assert labels.pools["routerbench_winogrande"] == "multiple_choice"
    assert labels.overrides["alpacaeval/786"] == "code"
    assert labels.overrides["alpacaeval/792"] == "math"


def test_length_bins_keep_letter_answers_apart() -> None:
    y = [math.log1p(1)] * 10 + list(np.linspace(3.0, 6.0, 40))
    edges, values = length_bins(y)
    assert edges[0] == pytest.approx(1.0)
    assert values[0] == pytest.approx(math.log1p(1))
    assert len(values) == len(edges) + 1


def test_macro_f1_by_hand() -> None:
    # low: tp 1, fp 1, fn 0 -> 2/3; high: tp 1, fp 0, fn 1 -> 2/3; medium never seen: skipped.
    assert macro_f1(["low", "high", "high"], ["low", "low", "high"], ["low", "medium", "high"]) == pytest.approx(2 / 3)


def _toy_data(rows: int = 60) -> tuple[np.ndarray, dict[str, list[Any]], list[str]]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(rows, 387)).astype(np.float32)
    task = ["math" if v > 0 else "code" for v in x[:, 0]]
    targets: dict[str, list[Any]] = {
        "task": task,
        "complexity": ["low" if v > 0 else "high" for v in x[:, 1]],
        "answer_kind": ["number" if t == "math" else "code" for t in task],
        "log_output_tokens": [math.log1p(2.0) if v > 0 else math.log1p(300.0) for v in x[:, 2]],
    }
    return x, targets, [f"toy/{i}" for i in range(rows)]


def test_fitting_is_deterministic_and_learns_a_separable_task() -> None:
    x, targets, ids = _toy_data()
    settings = TrainingSettings(hidden=16, epochs=60, validation_fraction=0.2)
    first, report = fit_heads(x, targets, ids, settings)
    second, _ = fit_heads(x, targets, ids, settings)
    assert content_hash({}, first.arrays) == content_hash({}, second.arrays)
    assert report.train["task_accuracy"] > 0.9
    predicted = first.predict(x)
    assert set(predicted.task) <= {"math", "code"}
    assert np.all(predicted.output_tokens >= 1.0)


def test_artifact_round_trip(tmp_path: Path) -> None:
    x, targets, ids = _toy_data()
    heads, _ = fit_heads(x, targets, ids, TrainingSettings(hidden=16, epochs=30))
    manifest = {"encoder": {"max_tokens": 128}, "metrics": {"validation": {}}, "training": {"seconds": 1.0}}
    saved = save_artifact(heads, manifest, tmp_path)
    loaded = load_artifact(tmp_path)  # through CURRENT
    assert saved.path is not None and loaded.path == saved.path
    assert loaded.content_hash == saved.content_hash
    assert loaded.manifest["labels"]["task"] == heads.labels["task"]
    before, after = heads.predict(x), loaded.heads.predict(x)
    assert before.task == after.task and before.complexity == after.complexity
    assert np.array_equal(before.output_tokens, after.output_tokens)
    # Saving again (another wall time, same content) gives the same hash and directory.
    again = save_artifact(loaded.heads, {**manifest, "training": {"seconds": 99.0}}, tmp_path)
    assert again.content_hash == saved.content_hash and again.path == saved.path
    # A damaged artifact is refused.
    with np.load(saved.path / "heads.npz") as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["task.b2"] = arrays["task.b2"] + 1.0
    np.savez(saved.path / "heads.npz", **arrays)
    with pytest.raises(FailedPrecondition, match="content hash"):
        load_artifact(saved.path)
    with pytest.raises(FailedPrecondition, match="train classifier"):
        load_artifact(tmp_path / "nothing-here")


def test_train_cli_on_a_tiny_pool(pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "artifacts"
    code = train.main([str(pool), "--out", str(out), "--epochs", "40", "--quiet", "--seed", "3"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 90  # the 18 test-split records are never read
    artifact = load_artifact(out)
    assert artifact.content_hash == summary["content_hash"]
    manifest = artifact.manifest
    assert manifest["encoder"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert manifest["encoder"]["dimensions"] == 384
    assert manifest["complexity_bands"]["mathpool"]["low_from"] == 0.8
    assert manifest["training"]["pools"][0]["file"] == "tiny.jsonl.gz"
    assert set(manifest["metrics"]["validation"]) >= {"task_accuracy", "complexity_accuracy", "output_log_mae"}
    assert manifest["labels"]["complexity"] == ["low", "medium", "high"]
    # The embedding cache makes a second run skip the encoder work and reproduce the same heads.
    assert list((out / "classifier").glob("embeddings-*.npz"))
    assert train.main([str(pool), "--out", str(out), "--epochs", "40", "--quiet", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["content_hash"] == summary["content_hash"]
    # Heads trained here read features built the way the service builds them.
    probe = features(np.zeros((1, 384), dtype=np.float32), [10], [10], [False])
    assert artifact.heads.predict(probe).task[0] in artifact.heads.labels["task"]


def test_train_cli_help_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as help_exit:
        train.main(["--help"])
    assert help_exit.value.code == 0
    assert "train splits" in capsys.readouterr().out
    assert train.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "no *.jsonl.gz" in capsys.readouterr().err
