"""Ranker benchmark: the ranking service's pipeline on the recorded pools' test splits.

On AlpacaEval (open answers, 14 models, judge scores):

* pairwise agreement: over every pair of answers to a test prompt whose recorded scores differ by at
  least 0.1, the share the pair ranker orders like the judge (with and without the models'
  reliability, i.e. their mean train-split score);
* top-1: the mean recorded score of the answer the service would put first (first stage with its
  default prune, then the pair ranker), beside the best single model on train (always), a random
  answer (the mean), the longest answer, the first stage alone and the oracle.

On the graded pools (top-1 accuracy): gsm8k with a fixed set of 8 of its 41 models spread over the
train accuracy range (embedding all 41 answers of every test prompt would take most of an hour on two
cores), ARC, Winogrande and MBPP with all 11 models; beside the best single model of that set and a
majority vote over normalised answers where the answers are closed.

The pipeline runs in-process (:class:`services.ranking.rank.Ranker`, the code the service runs) on
embeddings cached beside the artifact, so the numbers measure ranking quality, not gRPC. Writes
``docs/bench/ranker.json``, ``docs/bench/ranker.png`` and the ``ranker`` section of ``docs/BENCHMARKS.md``.

Run: ``python -m bench.ranker`` (after ``constellation train ranker``; ~6 minutes the first time on two
cores, seconds later).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import DOCS, markdown_table, write_section
from constellation.pools import PoolRecord, read_pool
from services.ranking.pairwise import default_artifact_root, load_ranker, mean_win_probability
from services.ranking.rank import CandidateText, Ranker, candidate_features
from services.ranking.train import EmbeddingStore, data_dir

COMMAND = "python -m bench.ranker"
MIN_GAP = 0.1
GSM8K_MODELS = 8
GRADED = ("gsm8k", "routerbench_arc", "routerbench_winogrande", "routerbench_mbpp")


def train_means(path: Path) -> dict[str, float]:
    """Each model's mean recorded quality on the pool's train split."""
    totals: dict[str, list[float]] = defaultdict(list)
    for record in read_pool(path, split="train"):
        for model, response in record.responses.items():
            totals[model].append(response.quality)
    return {model: float(np.mean(values)) for model, values in totals.items()}


def spread_models(means: dict[str, float], count: int) -> list[str]:
    """``count`` models evenly spaced over the train-accuracy order (best and worst included)."""
    ordered = sorted(means, key=lambda m: (-means[m], m))
    picks = np.linspace(0, len(ordered) - 1, count).round().astype(int)
    return sorted({ordered[i] for i in picks})


def _candidates(
    record: PoolRecord, models: Sequence[str], means: dict[str, float], reliable: bool
) -> list[CandidateText]:
    return [
        CandidateText(
            record.responses[m].text,
            record.responses[m].answer or "",
            float(np.clip(means[m], 1e-3, 1.0)) if reliable else 0.0,
        )
        for m in models
    ]


def evaluate_pool(
    path: Path,
    models_limit: int,
    ranker: Ranker,
    store: EmbeddingStore,
    encoder: Any,
    quiet: bool,
    max_prompts: int = 0,
) -> dict[str, Any]:
    """Every figure of one pool's test split (see the module docstring)."""
    means = train_means(path)
    models = spread_models(means, models_limit) if len(means) > models_limit else sorted(means)
    records = list(read_pool(path, split="test"))
    if max_prompts:
        records = records[:max_prompts]
    store.fill(encoder, [t for r in records for t in (r.prompt, *(r.responses[m].text for m in models))],
               show_progress=not quiet)  # fmt: skip
    first_only = Ranker(None, None)
    picks: dict[str, list[float]] = defaultdict(list)
    agree: dict[str, list[bool]] = defaultdict(list)
    best_single = max(models, key=lambda m: (means[m], m))
    rng = random.Random(0)
    for record in records:
        quality = [record.responses[m].quality for m in models]
        query = store.get([record.prompt])[0]
        vectors = store.get([record.responses[m].text for m in models])
        kind = record.answer_kind
        for label, reliable in (("ranker", True), ("ranker_no_reliability", False)):
            candidates = _candidates(record, models, means, reliable)
            ranking = ranker.rank_embedded(query, vectors, candidates, kind)
            picks[label].append(quality[ranking.ranked[0].index])
            if ranker.artifact is not None:
                features = candidate_features(kind, query, vectors, candidates)
                matrix = ranker.artifact.ranker.win_matrix(query, vectors, features.side, features.shared)
                for i in range(len(models)):
                    for j in range(i + 1, len(models)):
                        if abs(quality[i] - quality[j]) >= MIN_GAP:
                            agree[label].append((matrix[i, j] > 0.5) == (quality[i] > quality[j]))
                wins = mean_win_probability(matrix)
                picks[f"{label}_no_prune"].append(quality[int(np.argmax(wins))])
        plain = _candidates(record, models, means, False)
        picks["first_stage_only"].append(quality[first_only.rank_embedded(query, vectors, plain, kind).ranked[0].index])
        picks["best_single_model"].append(record.responses[best_single].quality)
        picks["random"].append(float(np.mean(quality)))
        picks["longest"].append(quality[int(np.argmax([len(record.responses[m].text) for m in models]))])
        picks["oracle"].append(max(quality))
        answers = [record.responses[m].answer for m in models]
        if kind in ("number", "choice") and any(answers):
            counts = Counter(a for a in answers if a)
            top = max(counts.values())
            tied = [m for m, a in zip(models, answers, strict=True) if a and counts[a] == top]
            picks["majority_vote"].append(record.responses[rng.choice(tied)].quality)
        elif kind in ("number", "choice"):
            picks["majority_vote"].append(float(np.mean(quality)))
    return {
        "pool": path.name,
        "prompts": len(records),
        "models": models,
        "best_single_model": best_single,
        "top1": {k: round(float(np.mean(v)), 4) for k, v in picks.items()},
        "pairwise_agreement": {k: round(float(np.mean(v)), 4) for k, v in agree.items()},
        "pairs": {k: len(v) for k, v in agree.items()},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from constellation.ml.encoder import Encoder

    started = time.perf_counter()
    root = Path(args.artifact) if args.artifact else default_artifact_root()
    artifact = load_ranker(root)
    encoder = Encoder(threads=args.threads or None)
    assert artifact.path is not None
    store = EmbeddingStore(artifact.path.parent / f"embeddings-{encoder.identity.key}.npz")  # the trainer's cache
    ranker = Ranker(None, artifact)
    pools = {"alpacaeval": 14, **{name: GSM8K_MODELS if name == "gsm8k" else 11 for name in GRADED}}
    results = []
    for name, limit in pools.items():
        path = data_dir() / f"{name}.jsonl.gz"
        if path.is_file():
            results.append(evaluate_pool(path, limit, ranker, store, encoder, args.quiet, args.max_prompts))
    return {
        "command": COMMAND,
        "artifact": artifact.content_hash[:12],
        "held_out_on_train": artifact.manifest.get("metrics", {}).get("held_out", {}),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "seconds": round(time.perf_counter() - started, 1),
        "pools": results,
    }


ROWS = (
    ("ranker", "ranker (first stage + pairwise, with reliability)"),
    ("ranker_no_reliability", "ranker without reliability"),
    ("ranker_no_prune", "pairwise on all answers, with reliability"),
    ("first_stage_only", "first stage alone"),
    ("best_single_model", "best single model on train"),
    ("majority_vote", "majority vote"),
    ("longest", "longest answer"),
    ("random", "random answer"),
    ("oracle", "oracle"),
)


def report(record: dict[str, Any]) -> str:
    pools = record["pools"]
    header = ["policy", *(p["pool"].split(".")[0] + f" ({len(p['models'])} models)" for p in pools)]
    rows = []
    for key, label in ROWS:
        rows.append([label, *(f"{100 * p['top1'][key]:.1f}%" if key in p["top1"] else "-" for p in pools)])
    agreement = [
        ["pairwise agreement, with reliability",
         *(f"{100 * p['pairwise_agreement'].get('ranker', float('nan')):.1f}%" for p in pools)],
        ["pairwise agreement, without",
         *(f"{100 * p['pairwise_agreement'].get('ranker_no_reliability', float('nan')):.1f}%" for p in pools)],
        ["pairs (recorded quality differs by >= 0.1)", *(str(p["pairs"].get("ranker", 0)) for p in pools)],
    ]  # fmt: skip
    return "\n".join(
        [
            "## Ranker (top-1 quality on the test splits)",
            "",
            f"Command: `{COMMAND}`; artifact `{record['artifact']}` (trained on the train splits only); "
            f"{record['machine']}; {record['seconds']} s. Top-1 = mean recorded quality (AlpacaEval: judge "
            "score; others: accuracy) of the answer put first. gsm8k uses 8 of its 41 models, spread over the "
            'train accuracy range; "best single model" is the best of the set on train. Reliability = each '
            "model's mean train-split quality, sent as `Candidate.reliability`.",
            "",
            markdown_table(header, rows),
            "",
            markdown_table(header, agreement),
            "",
            "Files: `docs/bench/ranker.json`, `docs/bench/ranker.png`.",
        ]
    )


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pools = record["pools"]
    keys = ["ranker", "ranker_no_reliability", "first_stage_only", "best_single_model", "longest", "random", "oracle"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        values = [100 * p["top1"].get(key, float("nan")) for p in pools]
        ax.bar(np.arange(len(pools)) + k * width, values, width, label=key.replace("_", " "))
    ax.set_xticks(np.arange(len(pools)) + 0.4 - width / 2)
    ax.set_xticklabels([p["pool"].split(".")[0] for p in pools])
    ax.set_ylabel("top-1 quality, % (test split)")
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", help="ranker artifact (default: the current one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for embedding (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--max-prompts", type=int, default=0, help="test prompts per pool (0: all; a smoke run)")
    parser.add_argument("--report-only", action="store_true", help="re-render from docs/bench/ranker.json")
    args = parser.parse_args(argv)
    out = DOCS / "bench" / "ranker.json"
    if args.report_only:
        record = json.loads(out.read_text())
    else:
        record = run(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        plot(record, DOCS / "bench" / "ranker.png")
    body = report(record)
    write_section("ranker", body)
    print(body)


if __name__ == "__main__":
    main()
