"""``constellation train classifier``: fits the encoder path's heads on the train splits of recorded pools.

Reads the pools (all ``*.jsonl.gz`` beside the project by default), labels every train prompt (task from
``data/task_labels.toml``, complexity from the share of the pool's models that answered well, output
length from the recorded outputs; see :mod:`services.classifier.labels`), embeds the focus text of each
prompt with all-MiniLM-L6-v2, fits the heads, and writes a versioned artifact that the classifier
service loads at start. Test splits are never read for training; ``python -m bench.classifier`` scores
on them.

Embeddings are cached next to the artifacts (keyed by the encoder settings and the text), so a second
run only fits the heads (seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from constellation.ml.embeddings import EmbeddingCache, embed
from constellation.ml.encoder import DEFAULT_HEAD_TOKENS, DEFAULT_MAX_TOKENS, Encoder
from constellation.pools import PoolRecord, read_pool
from constellation.training import run_training
from services.classifier.heads import (
    TrainingSettings,
    default_artifact_root,
    features,
    fit_heads,
    save_artifact,
    timed_load,
)
from services.classifier.labels import (
    ANSWER_KINDS,
    COMPLEXITIES,
    DEFAULT_TASK_LABELS,
    GRADED_BANDS,
    TASKS,
    LabelledPrompt,
    fit_bands,
    label_records,
    load_task_labels,
)
from services.classifier.rules import DEFAULT_RULES, KeywordRules

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
"""``../shared/data`` beside the project checkout."""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse_bands(text: str) -> tuple[float, float]:
    try:
        high_below, low_from = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HIGH_BELOW,LOW_FROM such as 0.5,0.8; got {text!r}") from None
    if not 0.0 <= high_below <= low_from <= 1.0:
        raise argparse.ArgumentTypeError("need 0 <= HIGH_BELOW <= LOW_FROM <= 1")
    return high_below, low_from


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="constellation train classifier",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the classifier's encoder heads (task type, complexity LOW/MEDIUM/HIGH, answer kind, "
        "output length) on the train splits of recorded pools, and write a versioned artifact that "
        "`constellation serve classifier` loads.",
        epilog="""labels:
  task         the pool's task type (data/task_labels.toml; AlpacaEval prompts are labelled one by one)
  complexity   mean quality over the pool's models, cut into bands: graded pools LOW when at least 80%
               of the models are right, HIGH below 50% (--graded-bands); judged pools (AlpacaEval) at
               the tertiles of their train split's mean judge score
  output       log1p(mean recorded output tokens), else len(text)/4 per model (RouterBench records none)

examples:
  constellation train classifier                      # every pool in ../shared/data
  constellation train classifier ../shared/data/gsm8k.jsonl.gz ../shared/data/alpacaeval.jsonl.gz
  constellation train classifier --out /tmp/artifacts --seed 1

The artifact lands in <out>/classifier/<hash12>/ (manifest.json + heads.npz) and <out>/classifier/CURRENT
names it. Only train splits are read; score on the test splits with `python -m bench.classifier`.""",
    )
    parser.add_argument(
        "pools",
        nargs="*",
        type=Path,
        help="pool files (JSON lines, optionally gzip); default: every *.jsonl.gz in --data-dir",
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
    parser.add_argument("--task-labels", type=Path, default=DEFAULT_TASK_LABELS, help="task label file (TOML)")
    parser.add_argument(
        "--rules", type=Path, default=DEFAULT_RULES, help="keyword rule file; its focus rules pick the text to embed"
    )
    parser.add_argument(
        "--graded-bands",
        type=_parse_bands,
        default=GRADED_BANDS,
        metavar="HIGH_BELOW,LOW_FROM",
        help="complexity thresholds on the fraction of models correct (default 0.5,0.8)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="encoder input length in word pieces (default 128)"
    )
    parser.add_argument(
        "--head-tokens", type=int, default=DEFAULT_HEAD_TOKENS, help="leading pieces kept when cutting (default 96)"
    )
    parser.add_argument(
        "--quantize", action="store_true", help="int8 encoder (faster, embeddings ~0.94 cosine of fp32)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for embedding (default 1; 0: one per core)"
    )
    parser.add_argument("--hidden", type=int, default=TrainingSettings.hidden, help="hidden units per head")
    parser.add_argument(
        "--epochs", type=int, default=TrainingSettings.epochs, help="most epochs (early stopping on a validation share)"
    )
    parser.add_argument("--seed", type=int, default=TrainingSettings.seed, help="training seed")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    parser.add_argument("--no-current", action="store_true", help="write the artifact but leave CURRENT alone")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def read_train(paths: Sequence[Path]) -> list[PoolRecord]:
    """Train-split records of every pool, in file order."""
    return [record for path in paths for record in read_pool(path, split="train")]


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Runs training for parsed arguments and returns a summary (also what ``main`` prints)."""
    from tqdm import tqdm

    started = time.perf_counter()
    paths = list(args.pools) or sorted(Path(args.data_dir).glob("*.jsonl.gz"))
    if not paths:
        raise FileNotFoundError(f"no pools given and no *.jsonl.gz in {args.data_dir}")
    records = read_train(paths)
    if not records:
        raise ValueError("the pools hold no train-split records")
    task_labels = load_task_labels(args.task_labels)
    bands = fit_bands(records, graded=args.graded_bands)
    labelled: list[LabelledPrompt] = label_records(records, task_labels, bands)
    rules = KeywordRules(args.rules)
    focus = [rules.focus(item.prompt)[0] for item in labelled]
    encoder = Encoder(
        max_tokens=args.max_tokens, head_tokens=args.head_tokens, quantize=args.quantize, threads=args.threads or None
    )
    root = Path(args.out) if args.out is not None else default_artifact_root()
    identity_key = encoder.identity.key
    cache = EmbeddingCache(None if args.no_cache else root / "classifier" / f"embeddings-{identity_key}.npz")
    embed_started = time.perf_counter()
    vectors, truncated, _ = embed(encoder, focus, cache, show_progress=not args.quiet)
    embed_seconds = time.perf_counter() - embed_started
    cache.save()
    x = features(vectors, [len(i.prompt) for i in labelled], [len(f) for f in focus], truncated)
    targets: dict[str, list[Any]] = {
        "task": [i.task for i in labelled],
        "complexity": [i.complexity for i in labelled],
        "answer_kind": [i.answer_kind for i in labelled],
        "log_output_tokens": [i.log_output_tokens for i in labelled],
    }
    settings = TrainingSettings(hidden=args.hidden, epochs=args.epochs, seed=args.seed)
    fit_started = time.perf_counter()
    with tqdm(total=8 * settings.epochs, desc="fitting heads", unit="epoch", disable=args.quiet) as bar:

        def progress(stage: str, done: int, total: int) -> None:
            bar.set_postfix_str(stage)
            bar.update(done - bar.n)

        heads, report = fit_heads(
            x,
            targets,
            [i.id for i in labelled],
            settings,
            label_sets={"task": TASKS, "complexity": COMPLEXITIES, "answer_kind": ANSWER_KINDS},
            progress=progress,
        )
    fit_seconds = time.perf_counter() - fit_started
    manifest = {
        "encoder": encoder.identity.to_json(),
        "features": "embedding(384) + log1p(prompt chars)/10 + log1p(focus chars)/10 + truncated; standardised",
        "complexity_bands": {pool: band.to_json() for pool, band in bands.items()},
        "task_labels": {
            "file": task_labels.source,
            "sha256": _file_sha256(Path(args.task_labels)),
            "pools": task_labels.pools,
        },
        "rules_sha256": rules.sha256,
        "output_tokens": "log1p(mean recorded output_tokens over models; else len(text)/4, at least 1)",
        "training": {
            "pools": [{"file": p.name, "sha256": _file_sha256(p)} for p in paths],
            "rows": len(labelled),
            "settings": settings.to_json(),
            "epochs": report.epochs,
            "seconds": round(time.perf_counter() - started, 1),
        },
        "metrics": {
            "validation": report.validation,
            "train": report.train,
            "counts": {
                head: {label: targets[head].count(label) for label in sorted(set(targets[head]))}
                for head in ("task", "complexity", "answer_kind")
            },
        },
    }
    artifact = save_artifact(heads, manifest, root, make_current=not args.no_current)
    assert artifact.path is not None
    _, load_seconds = timed_load(artifact.path)
    return {
        "artifact": str(artifact.path),
        "content_hash": artifact.content_hash,
        "rows": len(labelled),
        "pools": [p.name for p in paths],
        "validation": report.validation,
        "seconds": {
            "total": round(time.perf_counter() - started, 1),
            "embedding": round(embed_seconds, 1),
            "fitting": round(fit_seconds, 1),
            "load": round(load_seconds, 3),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``constellation train classifier``; returns the exit status."""
    return run_training(build_parser(), train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
