"""``constellation train ranker``: fits the pairwise ranker on the train splits of recorded pools.

Pairs come from two kinds of pool:

* judged (open answers, AlpacaEval): every model's answer to a prompt is one candidate set; a pair is
  labelled by the recorded judge scores, and pairs closer than ``--min-gap`` are skipped as near-ties;
* graded (gsm8k number, ARC / Winogrande choice, MBPP code): a random subset of the models forms the
  set (at most ``--set-size``, so centrality and agreement look like a real fan-out, and it always mixes
  right and wrong answers where the prompt has both); a pair is a correct answer against a wrong one.

At most ``--max-pairs-per-prompt`` pairs are sampled per prompt. Each candidate's reliability is its
model's mean recorded quality on the *other* train prompts of the pool (leave-one-out), hidden for a
third of the prompts so the ranker also works when callers send none. One prompt in ten (by a hash of
its id) is held out to choose the number of epochs and report metrics; the model is then refit on all.

Embeddings are cached on disk per encoder identity, so a second run only fits (tens of seconds).
Test splits are never read; ``python -m bench.ranker`` scores on them.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from constellation.ml.embeddings import EmbeddingStore
from constellation.pools import PoolRecord, read_pool
from constellation.training import run_training
from services.ranking.pairwise import (
    FEATURES,
    SIDE_FEATURES,
    FitSettings,
    PairRanker,
    PairSet,
    RankerArtifact,
    default_artifact_root,
    fit_pair_ranker,
    save_ranker,
)
from services.ranking.rank import CandidateText, Ranker, candidate_features

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
"""``../shared/data`` beside the project checkout (``$CONSTELLATION_DATA_DIR`` overrides it)."""
HELD_OUT_SHARE = 0.1
HIDDEN_RELIABILITY_SHARE = 1 / 3


def data_dir() -> Path:
    """``$CONSTELLATION_DATA_DIR`` when set, else :data:`DEFAULT_DATA_DIR`."""
    explicit = os.environ.get("CONSTELLATION_DATA_DIR")
    return Path(explicit).expanduser() if explicit else DEFAULT_DATA_DIR


def _unit(key: str) -> float:
    """A stable number in [0, 1) from a string (splits and sampling must not depend on the run)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") / 2**32


@dataclass(frozen=True)
class CandidateSet:
    """One prompt's candidates as training sees them.

    Attributes:
        pool: Pool file stem (``gsm8k``); ``kind`` its answer kind; ``record_id`` the prompt.
        models: The models in the set; ``quality`` their recorded quality; ``candidates`` their texts.
        pairs: ``(i, j)`` index pairs where ``i`` is the better answer.
        held_out: The prompt is in the validation share.
    """

    pool: str
    kind: str
    record_id: str
    prompt: str
    models: list[str]
    quality: list[float]
    candidates: list[CandidateText]
    pairs: list[tuple[int, int]]
    held_out: bool


def leave_one_out_reliability(records: Sequence[PoolRecord]) -> dict[str, dict[str, float]]:
    """``{record_id: {model: mean quality of the model on the pool's other records}}``."""
    totals: dict[str, float] = defaultdict(float)
    for record in records:
        for model, response in record.responses.items():
            totals[model] += response.quality
    n = len(records)
    return {
        record.id: {
            model: (totals[model] - response.quality) / (n - 1) if n > 1 else 0.5
            for model, response in record.responses.items()
        }
        for record in records
    }


def candidate_sets(
    pool: str,
    records: Sequence[PoolRecord],
    *,
    max_pairs: int,
    set_size: int,
    min_gap: float,
    seed: int,
) -> list[CandidateSet]:
    """The candidate sets and labelled pairs of one pool's train records (see the module docstring)."""
    reliability = leave_one_out_reliability(records)
    sets: list[CandidateSet] = []
    for record in records:
        rng = random.Random(f"{seed}:{record.id}")
        kind = record.answer_kind
        models = sorted(record.responses)
        graded = kind != "open" and all(record.responses[m].correct is not None for m in models)
        if graded and len(models) > set_size:
            right = [m for m in models if record.responses[m].correct == 1]
            wrong = [m for m in models if record.responses[m].correct != 1]
            chosen = rng.sample(models, set_size)
            if right and wrong and not {*chosen} & {*right}:
                chosen[0] = rng.choice(right)
            elif right and wrong and not {*chosen} & {*wrong}:
                chosen[0] = rng.choice(wrong)
            models = sorted(chosen)
        quality = [record.responses[m].quality for m in models]
        if graded:
            possible = [(i, j) for i in range(len(models)) for j in range(len(models)) if quality[i] > quality[j]]
        else:
            possible = [
                (i, j) for i in range(len(models)) for j in range(len(models)) if quality[i] - quality[j] >= min_gap
            ]
        if not possible:
            continue
        pairs = rng.sample(possible, min(max_pairs, len(possible)))
        hide = _unit(f"reliability:{record.id}") < HIDDEN_RELIABILITY_SHARE
        candidates = [
            CandidateText(
                text=record.responses[m].text,
                normalized_answer=record.responses[m].answer or "",
                reliability=0.0 if hide else float(np.clip(reliability[record.id][m], 1e-3, 1.0)),
            )
            for m in models
        ]
        sets.append(
            CandidateSet(
                pool=pool,
                kind=kind,
                record_id=record.id,
                prompt=record.prompt,
                models=models,
                quality=quality,
                candidates=candidates,
                pairs=pairs,
                held_out=_unit(f"held-out:{record.id}") < HELD_OUT_SHARE,
            )
        )
    return sets


def build_pairs(sets: Sequence[CandidateSet], store: EmbeddingStore) -> PairSet:
    """The :class:`PairSet` of ``sets``, with features from :func:`candidate_features` (as served)."""
    queries, embeddings, sides, shareds, groups = [], [], [], [], []
    a: list[int] = []
    b: list[int] = []
    held: list[bool] = []
    offset = 0
    for g, item in enumerate(sets):
        query = store.get([item.prompt])[0]
        vectors = store.get([c.text for c in item.candidates])
        features = candidate_features(item.kind, query, vectors, item.candidates)
        queries.append(query)
        embeddings.append(vectors)
        sides.append(features.side)
        shareds.append(features.shared)
        groups.append(np.full(len(item.candidates), g))
        for i, j in item.pairs:
            a.append(offset + i)
            b.append(offset + j)
            held.append(item.held_out)
        offset += len(item.candidates)
    count = len(a)
    # Half the pairs put the better answer second, so the label is not constant (the model is
    # antisymmetric, so this changes nothing but the reading of the loss).
    flip = np.array([_unit(f"flip:{k}") < 0.5 for k in range(count)])
    first = np.where(flip, np.array(b), np.array(a))
    second = np.where(flip, np.array(a), np.array(b))
    return PairSet(
        query=np.stack(queries).astype(np.float32),
        embeddings=np.concatenate(embeddings).astype(np.float32),
        side=np.concatenate(sides).astype(np.float32),
        shared=np.stack(shareds).astype(np.float32),
        group=np.concatenate(groups),
        a=first,
        b=second,
        label=(~flip).astype(np.float32),
        held_out=np.array(held, dtype=bool),
    )


def held_out_metrics(
    sets: Sequence[CandidateSet], pairs: PairSet, ranker: PairRanker, store: EmbeddingStore
) -> dict[str, Any]:
    """Per pool, on the held-out prompts: pairwise accuracy, and the mean recorded quality of the
    ranker's top-1 answer beside a random answer's and the best answer's (no pruning)."""
    metrics: dict[str, Any] = {}
    held_rows = np.flatnonzero(pairs.held_out)
    if held_rows.size:
        logits = ranker.pair_logits(pairs.features(held_rows), pairs.features(held_rows, swap=True))
        correct = (logits > 0) == (pairs.label[held_rows] > 0.5)
        pool_of_pair = np.array([sets[g].pool for g in pairs.group[pairs.a[held_rows]]])
        for pool in sorted(set(pool_of_pair)):
            metrics.setdefault(pool, {})["pairwise_accuracy"] = round(float(correct[pool_of_pair == pool].mean()), 4)
            metrics[pool]["pairs"] = int((pool_of_pair == pool).sum())
    judge = Ranker(None, RankerArtifact(ranker, {"content_hash": "held-out"}))
    by_pool: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for item in sets:
        if not item.held_out:
            continue
        query = store.get([item.prompt])[0]
        vectors = store.get([c.text for c in item.candidates])
        ranking = judge.rank_embedded(query, vectors, item.candidates, item.kind, keep=len(item.candidates))
        top = ranking.ranked[0].index
        by_pool[item.pool].append((item.quality[top], float(np.mean(item.quality)), max(item.quality)))
    for pool, rows in sorted(by_pool.items()):
        values = np.array(rows)
        metrics.setdefault(pool, {}).update(
            {
                "prompts": len(rows),
                "top1_quality": round(float(values[:, 0].mean()), 4),
                "random_quality": round(float(values[:, 1].mean()), 4),
                "best_quality": round(float(values[:, 2].mean()), 4),
            }
        )
    return metrics


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="constellation train ranker",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the pairwise ranker of the ranking service on the train splits of recorded pools, "
        "and write a versioned artifact that `constellation serve ranking` loads.",
        epilog="""what it learns:
  P(A better than B | query) from all-MiniLM-L6-v2 embeddings of the query and both answers plus
  length, form, answer agreement, centrality and reliability features; antisymmetric by construction.

pairs:
  open answers (AlpacaEval)     two answers whose recorded judge scores differ by >= --min-gap
  graded pools (gsm8k, ARC,     a correct answer against a wrong one to the same prompt, within a
  Winogrande, MBPP)             random set of at most --set-size models

examples:
  constellation train ranker                                    # every pool in the data dir
  constellation train ranker --pool ../shared/data/alpacaeval.jsonl.gz --pool ../shared/data/gsm8k.jsonl.gz
  constellation train ranker --max-pairs-per-prompt 8 --max-prompts 100 --out /tmp/artifacts   # a quick run

The artifact lands in <out>/ranker/<hash12>/ (manifest.json + ranker.npz) and <out>/ranker/CURRENT names
it. Embeddings are cached in <out>/ranker/embeddings-<encoder>.npz: the first full run embeds ~25k
texts (about 8 minutes on 2 busy cores); later runs take well under a minute. Only train splits are
read; score on the test splits with `python -m bench.ranker`.""",
    )
    parser.add_argument(
        "--pool",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="a pool file (repeatable); default: every *.jsonl.gz in $CONSTELLATION_DATA_DIR or ../shared/data",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="artifact root (default: $CONSTELLATION_CACHE_DIR/artifacts, else ~/.cache/constellation/artifacts)",
    )
    parser.add_argument(
        "--max-pairs-per-prompt", type=int, default=24, metavar="K", help="pairs sampled per prompt (default 24)"
    )
    parser.add_argument(
        "--set-size", type=int, default=8, help="most models per candidate set in graded pools (default 8)"
    )
    parser.add_argument(
        "--min-gap", type=float, default=0.1, help="smallest judge-score difference that makes a pair (default 0.1)"
    )
    parser.add_argument(
        "--max-prompts", type=int, default=0, help="use at most this many train prompts per pool (0: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling and training seed (default 0)")
    parser.add_argument("--hidden", type=int, default=FitSettings.hidden, help="hidden units of the MLP (default 64)")
    parser.add_argument("--epochs", type=int, default=FitSettings.epochs, help="most epochs (early stopping)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for embedding (default 1; 0: one per core)"
    )
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    parser.add_argument("--no-current", action="store_true", help="write the artifact but leave CURRENT alone")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Runs training for parsed arguments; returns a summary (what ``main`` prints)."""
    from tqdm import tqdm

    from constellation.ml.encoder import Encoder

    started = time.perf_counter()
    paths = list(args.pool) or sorted(data_dir().glob("*.jsonl.gz"))
    if not paths:
        raise FileNotFoundError(f"no pools given and no *.jsonl.gz in {data_dir()}")
    if args.max_pairs_per_prompt < 1 or args.set_size < 2:
        raise ValueError("--max-pairs-per-prompt must be >= 1 and --set-size >= 2")
    sets: list[CandidateSet] = []
    for path in tqdm(paths, desc="reading pools", unit="pool", disable=args.quiet):
        records = list(read_pool(path, split="train"))
        if args.max_prompts:
            records = records[: args.max_prompts]
        pool = path.name.split(".")[0]
        sets += candidate_sets(
            pool,
            records,
            max_pairs=args.max_pairs_per_prompt,
            set_size=args.set_size,
            min_gap=args.min_gap,
            seed=args.seed,
        )
    if not sets:
        raise ValueError("the pools give no training pairs (no train records with a better and a worse answer)")
    encoder = Encoder(threads=args.threads or None)
    root = Path(args.out) if args.out is not None else default_artifact_root()
    identity_key = encoder.identity.key
    store = EmbeddingStore(None if args.no_cache else root / "ranker" / f"embeddings-{identity_key}.npz")
    texts = [t for s in sets for t in (s.prompt, *(c.text for c in s.candidates))]
    embed_started = time.perf_counter()
    embedded = store.fill(encoder, texts, show_progress=not args.quiet)
    embed_seconds = time.perf_counter() - embed_started
    pairs = build_pairs(sets, store)
    settings = FitSettings(hidden=args.hidden, epochs=args.epochs, seed=args.seed)
    fit_started = time.perf_counter()
    with tqdm(total=settings.epochs, desc="fitting", unit="epoch", disable=args.quiet) as bar:

        def progress(epoch: int, total: int, loss: float) -> None:
            bar.set_postfix_str(f"held-out loss {loss:.4f}")
            bar.update(epoch - bar.n)

        ranker, report = fit_pair_ranker(pairs, settings, progress=progress)
    fit_seconds = time.perf_counter() - fit_started
    validation = (
        held_out_metrics(sets, pairs, report.validation_ranker, store) if report.validation_ranker is not None else {}
    )
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"prompts": 0, "pairs": 0})
    for item in sets:
        counts[item.pool]["prompts"] += 1
        counts[item.pool]["pairs"] += len(item.pairs)
    manifest = {
        "encoder": encoder.identity.to_json(),
        "model": {
            "form": "antisymmetric MLP: logit(A,B) = (g(phi(A,B)) - g(phi(B,A)))/2, one hidden ReLU layer",
            "features": f"[q*(a-b), a-b, |a-b|, side(A)-side(B), shared]; {FEATURES} wide; side = {SIDE_FEATURES}",
            "order": "mean win probability over the other survivors of the first stage",
        },
        "training": {
            "pools": [{"file": p.name, "sha256": _file_sha256(p)} for p in paths],
            "split": "train",
            "counts": dict(counts),
            "max_pairs_per_prompt": args.max_pairs_per_prompt,
            "set_size": args.set_size,
            "min_gap": args.min_gap,
            "max_prompts": args.max_prompts,
            "held_out_share": HELD_OUT_SHARE,
            "settings": settings.to_json(),
            "epochs": report.epochs,
            "seconds": round(time.perf_counter() - started, 1),
        },
        "metrics": {
            "held_out_loss": round(report.validation_loss, 5),
            "held_out_pairwise_accuracy": round(report.validation_accuracy, 4),
            "held_out": validation,
            "loss_history": report.history,
        },
    }
    artifact = save_ranker(ranker, manifest, root, make_current=not args.no_current)
    return {
        "artifact": str(artifact.path),
        "content_hash": artifact.content_hash,
        "pools": [p.name for p in paths],
        "sets": len(sets),
        "pairs": len(pairs.a),
        "epochs": report.epochs,
        "held_out": manifest["metrics"],
        "seconds": {
            "total": round(time.perf_counter() - started, 1),
            "embedding": round(embed_seconds, 1),
            "embedded_texts": embedded,
            "fitting": round(fit_seconds, 1),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``constellation train ranker``; returns the exit status."""
    return run_training(build_parser(), train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
