"""The front door's semantic cache on the recorded pools: how often it is wrong, how often it helps, what it costs.

Every prompt of the recorded pools is a different question, so any hit between two of them that are not
the same text (after :func:`~services.dispatch.http.cache.normalise`) is a false hit. The embedding is
the classifier's: all-MiniLM-L6-v2 over the prompt's keyword focus (the question a few-shot prompt
asks), as routing uses it; embeddings come from the classifier's on-disk cache where present.

1. **Threshold**, on the TRAIN prompts of all five pools only: each train prompt is looked up against
   all the others (one cache, one tenant, one set of sampling parameters, so prompts of different pools
   can collide too); the threshold is the lowest on a grid whose leave-one-out false-hit rate is at most
   ``--train-rate`` (default 0.02%), the signature guard (same numbers, same content words in order) included.
2. **False hits**: a cache filled with every train prompt, then every TEST prompt of every pool looked up.
3. **Hit rate** on repeated and trivially reworded train prompts (:func:`reword`: case, whitespace,
   punctuation, "please", politeness moved to the other end, and a short preamble that normalising does
   not remove, so only the semantic lookup can find it); a hit counts only when it returns the original.
4. **Latency** of a lookup that hits (exact; semantic, embedding included) against one that misses.

Writes ``docs/bench/cache.json`` and prints a markdown table (its section of ``docs/BENCHMARKS.md``
with ``--write-md``).

Run: ``python -m bench.cache`` (about a minute when the embeddings are cached; ``make bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import DOCS, markdown_table, percentiles, write_section
from constellation.pools import PoolRecord, read_pool
from services.dispatch.http.cache import CacheKey, SemanticCache, normalise, signature

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
KEY = CacheKey(model="constellation/balanced", max_tokens=256, temperature=0.0)
REWORDINGS = ("repeated", "case", "whitespace", "punctuation", "please", "politeness_moved", "preamble")


def reword(prompt: str, kind: str) -> str:
    """A deterministic trivial rewording of ``prompt`` of the given kind (one of :data:`REWORDINGS`)."""
    body = prompt.strip()
    if kind == "repeated":
        return prompt
    if kind == "case":
        return body.upper() if len(body) < 400 else body[:200].upper() + body[200:]
    if kind == "whitespace":
        return "  " + body.replace(" ", "  ").replace("\n", " \n ") + "\n\n"
    if kind == "punctuation":
        stripped = body.rstrip(".?!")
        return stripped + ("?!" if body.endswith("?") else "...")
    if kind == "please":
        return "Please " + body[:1].lower() + body[1:]
    if kind == "politeness_moved":
        return body.rstrip(".?!") + ", please. Thanks!"
    if kind == "preamble":
        return "Quick question for you. " + body
    raise ValueError(f"unknown rewording {kind!r}")


@dataclass
class FocusEmbedder:
    """The classifier's embedding of a prompt (MiniLM over its keyword focus), memoised on disk."""

    encoder: Any
    rules: Any
    store: Any
    calls: int = 0

    @classmethod
    def load(cls) -> FocusEmbedder:
        from constellation.artifacts import default_root
        from constellation.ml.encoder import Encoder
        from services.classifier.rules import KeywordRules
        from services.classifier.train import EmbeddingCache

        encoder = Encoder()
        store = EmbeddingCache(default_root() / "classifier" / f"embeddings-{encoder.identity.key}.npz")
        return cls(encoder, KeywordRules(), store)

    def many(self, prompts: Sequence[str]) -> np.ndarray:
        from services.classifier.train import embed

        focus = [self.rules.focus(p)[0] for p in prompts]
        vectors, _, _ = embed(self.encoder, focus, self.store, show_progress=True)
        return vectors.astype(np.float32)

    def __call__(self, prompt: str) -> np.ndarray:
        """One prompt, computed fresh (what a live lookup pays), never from the disk memo."""
        self.calls += 1
        return self.encoder.encode([self.rules.focus(prompt)[0]]).embeddings[0]


def load_pools(data_dir: Path) -> dict[str, list[PoolRecord]]:
    pools = sorted(data_dir.glob("*.jsonl.gz"))
    if not pools:
        raise SystemExit(f"no recorded pools (*.jsonl.gz) in {data_dir}; pass --data-dir")
    return {path.name.removesuffix(".jsonl.gz"): list(read_pool(path)) for path in pools}


def leave_one_out_best(vectors: np.ndarray, prompts: Sequence[str], *, guard: bool = True) -> np.ndarray:
    """For each prompt, the highest similarity to another prompt that the cache could return for it: a
    different normalised text with the same signature (numbers and content words; -1 when none).
    Without ``guard``, any different normalised text (what the embedding alone would allow)."""
    normalised = [normalise(p) for p in prompts]
    text_ids = np.array([hash(n) for n in normalised])
    number_ids = np.array([hash(signature(p)) if guard else 0 for p in prompts])
    best = np.full(len(prompts), -1.0, dtype=np.float32)
    for start in range(0, len(prompts), 512):
        sims = vectors[start : start + 512] @ vectors.T
        rows = np.arange(start, min(start + 512, len(prompts)))
        blocked = (text_ids[rows, None] == text_ids[None, :]) | (number_ids[rows, None] != number_ids[None, :])
        sims[blocked] = -1.0
        best[rows] = sims.max(axis=1)
    return best


def choose_threshold(best: np.ndarray, target_rate: float) -> tuple[float, list[dict[str, float]]]:
    """The lowest threshold on a 0.001 grid whose leave-one-out false-hit rate is at most ``target_rate``."""
    curve = []
    chosen = 1.0
    for step in range(800, 1001):
        threshold = step / 1000
        rate = float(np.mean(best >= threshold))
        curve.append({"threshold": threshold, "train_false_hit_rate": rate})
        if rate <= target_rate and chosen == 1.0:
            chosen = threshold
    return chosen, curve


def filled_cache(
    embed: Callable[[str], np.ndarray], threshold: float, prompts: Sequence[str], vectors: np.ndarray
) -> SemanticCache[str]:
    """A cache holding ``prompts`` (their precomputed embeddings), each prompt its own value."""
    from dataclasses import replace

    cache: SemanticCache[str] = SemanticCache(embed, threshold=threshold, max_entries=len(prompts) + 10)
    for prompt, vector in zip(prompts, vectors, strict=True):
        probe = cache.probe(prompt, KEY)
        assert probe is not None
        cache.store(replace(probe, embedding=vector), prompt)
    return cache


def false_hits(cache: SemanticCache[str], prompts: Sequence[str], vectors: np.ndarray) -> dict[str, Any]:
    """Looks every prompt up; a hit on a different normalised text is false, on the same one a duplicate."""
    from dataclasses import replace

    false, duplicates = 0, 0
    examples: list[dict[str, Any]] = []
    for prompt, vector in zip(prompts, vectors, strict=True):
        probe = cache.probe(prompt, KEY)
        assert probe is not None
        hit, _ = cache.lookup(replace(probe, embedding=vector))
        if hit is None:
            continue
        if normalise(hit.prompt) == probe.normalised:
            duplicates += 1
        else:
            false += 1
            if len(examples) < 5:
                examples.append({"asked": prompt[-200:], "hit": hit.prompt[-200:], "similarity": hit.similarity})
    return {
        "lookups": len(prompts),
        "false_hits": false,
        "false_hit_rate": false / len(prompts),
        "duplicate_hits": duplicates,
        "examples": examples,
    }


def reworded_hits(cache: SemanticCache[str], originals: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per rewording kind: the share of lookups that returned the original, and by which lookup."""
    out = {}
    for kind in REWORDINGS:
        exact = semantic = wrong = 0
        for original in originals:
            probe = cache.probe(reword(original, kind), KEY)
            assert probe is not None
            hit, _ = cache.lookup(probe)
            if hit is None:
                continue
            if hit.value != original:
                wrong += 1
            elif hit.kind == "exact":
                exact += 1
            else:
                semantic += 1
        n = len(originals)
        out[kind] = {
            "lookups": n,
            "hit_rate": (exact + semantic) / n,
            "exact": exact / n,
            "semantic": semantic / n,
            "wrong": wrong / n,
        }
    return out


def lookup_latency(cache: SemanticCache[str], prompts: Sequence[str]) -> dict[str, list[float]]:
    """Milliseconds per :meth:`SemanticCache.lookup`, by outcome: ``exact``, ``semantic`` or ``miss``
    (the last two include computing the embedding, on this machine's CPU)."""
    times: dict[str, list[float]] = {"exact": [], "semantic": [], "miss": []}
    for prompt in prompts:
        probe = cache.probe(prompt, KEY)
        assert probe is not None
        start = time.perf_counter()
        hit, _ = cache.lookup(probe)
        times["miss" if hit is None else hit.kind].append((time.perf_counter() - start) * 1000)
    return times


def measure(data_dir: Path, target_rate: float, sample: int) -> dict[str, Any]:
    pools = load_pools(data_dir)
    train = [r.prompt for records in pools.values() for r in records if r.split == "train"]
    test = [r.prompt for records in pools.values() for r in records if r.split == "test"]
    embedder = FocusEmbedder.load()
    train_vectors, test_vectors = embedder.many(train), embedder.many(test)
    embedder.store.save()
    best = leave_one_out_best(train_vectors, train)
    threshold, curve = choose_threshold(best, target_rate)
    unguarded = leave_one_out_best(train_vectors, train, guard=False)
    embedding_alone = {f"{t:.3f}": float(np.mean(unguarded >= t)) for t in (0.95, 0.99, 0.995, 0.999)}
    cache = filled_cache(embedder, threshold, train, train_vectors)
    wrong = false_hits(cache, test, test_vectors)
    originals = train[:: max(1, len(train) // sample)][:sample]
    reworded = reworded_hits(cache, originals)
    latency_prompts = [reword(p, "repeated") for p in originals[:50]]
    latency_prompts += [reword(p, "preamble") for p in originals[:50]] + test[:50]
    latency = lookup_latency(cache, latency_prompts)
    return {
        "pools": {name: len(records) for name, records in pools.items()},
        "train_prompts": len(train),
        "test_prompts": len(test),
        "threshold": threshold,
        "train_target_rate": target_rate,
        "train_nearest_distinct_similarity": percentiles(best.tolist(), (50, 90, 99, 99.9, 100)),
        "threshold_curve": curve,
        "train_false_hit_rate_embedding_alone": embedding_alone,
        "false_hits": wrong,
        "reworded": reworded,
        "latency_ms": {kind: percentiles(values) | {"n": len(values)} for kind, values in latency.items()},
    }


def report(result: dict[str, Any], command: str, machine: str) -> str:
    wrong = result["false_hits"]
    rows = [
        [
            "false hits, all test prompts vs a cache of all train prompts",
            f"{wrong['false_hits']} / {wrong['lookups']}",
            f"{100 * wrong['false_hit_rate']:.3f}%",
        ]
    ]
    for kind, row in result["reworded"].items():
        rows.append(
            [
                f"hit rate, {kind.replace('_', ' ')} train prompt",
                f"exact {100 * row['exact']:.1f}%, semantic {100 * row['semantic']:.1f}%, "
                f"wrong {100 * row['wrong']:.1f}%",
                f"{100 * row['hit_rate']:.1f}%",
            ]
        )
    for threshold, rate in result["train_false_hit_rate_embedding_alone"].items():
        rows.append(
            [f"train leave-one-out false hits, embedding alone at {threshold}", "no signature", f"{100 * rate:.2f}%"]
        )
    latency = result["latency_ms"]
    for kind, label in (("exact", "exact hit"), ("semantic", "semantic hit"), ("miss", "miss")):
        row = latency[kind]
        if row["n"]:
            rows.append(
                [f"lookup latency, {label} (n={row['n']})", f"p95 {row['p95']:.3f} ms", f"p50 {row['p50']:.3f} ms"]
            )
    table = markdown_table(["measure", "detail", "value"], rows)
    return f"""## Semantic cache: false hits, hit rate, lookup latency

Command: `{command}`. Machine: {machine}. Threshold {result["threshold"]:.3f}, chosen on the
{result["train_prompts"]} TRAIN prompts of the five recorded pools alone (the lowest whose leave-one-out
false-hit rate is at most {100 * result["train_target_rate"]:.3f}%); a semantic hit also needs the same
signature (numbers, content words in order) in both prompts. Embedding: all-MiniLM-L6-v2 over the
classifier's keyword focus. A miss pays its lookup (embedding included) and then the whole `Ask`; a hit
pays only its lookup.

{table}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--train-rate", type=float, default=0.0002, help="largest train false-hit rate allowed")
    parser.add_argument("--sample", type=int, default=200, help="train prompts reworded for the hit rate")
    parser.add_argument("--write-md", action="store_true", help="also rewrite the section of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = measure(args.data_dir, args.train_rate, args.sample)
    machine = f"{platform.machine()}, {platform.system()} {platform.release()}, {os.cpu_count()} cpus"
    command = "python -m bench.cache " + " ".join(argv if argv is not None else [])
    result |= {"command": command.strip(), "machine": machine, "seconds": time.perf_counter() - started}
    out = DOCS / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache.json").write_text(json.dumps(result, indent=2))
    body = report(result, result["command"], machine)
    if args.write_md:
        write_section("semantic-cache", body)
    print(body)


if __name__ == "__main__":
    main()
