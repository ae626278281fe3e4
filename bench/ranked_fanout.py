"""A ranked fan-out for answers that cannot be voted on: ask the k best cheap models, keep the ranker's pick.

For code and open answers no vote or cascade applies, so the router plans one model. This measures the
alternative on the recorded answers, without the mesh: the ``k`` models with the best train record
among those cheaper than half the best model's mean cost are all asked, and the trained pair ranker
(``constellation train ranker``, with each model's train record as its reliability) picks the answer.
It reports the quality of that answer and the summed cost of the k calls beside the best single model,
on ``train`` and ``test``.

The ranker was fitted on the train splits, so its ``train`` figures are in-sample (optimistic); the
``test`` ones are not. Needs the ranker artifact and its embedding cache (``python -m bench.ranker``
fills the cache).

Run: ``python -m bench.ranked_fanout`` (writes its section of ``docs/BENCHMARKS.md``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from bench.ranker import EmbeddingStore, _candidates, data_dir, train_means
from bench.report import markdown_table, write_section
from constellation.pools import read_pool
from services.ranking.pairwise import default_artifact_root, load_ranker
from services.ranking.rank import Ranker


def main(argv: Sequence[str] | None = None) -> None:
    from constellation.ml.encoder import Encoder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pools", nargs="*", default=["routerbench_mbpp", "alpacaeval"])
    parser.add_argument("--max-k", type=int, default=4, help="largest fan-out measured")
    parser.add_argument("--cost-cap", type=float, default=0.5, help="members cost less than this x the best model")
    args = parser.parse_args(argv)
    artifact = load_ranker(default_artifact_root())
    encoder = Encoder()
    assert artifact.path is not None
    store = EmbeddingStore(artifact.path.parent / f"embeddings-{encoder.identity.key}.npz")
    ranker = Ranker(None, artifact)
    rows = []
    for name in args.pools:
        path = data_dir() / f"{name}.jsonl.gz"
        means = train_means(path)
        best = max(means, key=lambda m: (means[m], m))
        for split in ("train", "test"):
            records = list(read_pool(path, split=split))
            models = list(records[0].responses)
            texts = [t for r in records for t in (r.prompt, *(r.responses[m].text for m in models))]
            store.fill(encoder, texts, show_progress=False)
            cost = {m: float(np.mean([r.responses[m].cost_usd or 0.0 for r in records])) for m in models}
            best_quality = float(np.mean([r.responses[best].quality for r in records]))
            rows.append([name, split, f"best single: {best}", f"{100 * best_quality:.2f}", "1.00x"])
            cheap = sorted((m for m in models if cost[m] < args.cost_cap * cost[best]), key=lambda m: -means[m])
            for k in range(2, min(args.max_k, len(cheap)) + 1):
                members = cheap[:k]
                picked = []
                for record in records:
                    query = store.get([record.prompt])[0]
                    vectors = store.get([record.responses[m].text for m in members])
                    candidates = _candidates(record, members, means, True)
                    ranking = ranker.rank_embedded(query, vectors, candidates, record.answer_kind)
                    picked.append(record.responses[members[ranking.ranked[0].index]].quality)
                relative = sum(cost[m] for m in members) / cost[best] if cost[best] else 0.0
                label = ", ".join(m.split("/")[-1] for m in members)
                rows.append(
                    [name, split, f"ranked: {label}", f"{100 * float(np.mean(picked)):.2f}", f"{relative:.2f}x"]
                )
    store.save()
    table = markdown_table(["pool", "split", "policy", "quality", "cost vs best single"], rows)
    body = f"""## Ranked fan-out for code and open answers (recorded answers, no mesh)

Command: `python -m bench.ranked_fanout`. The k models with the best train record among those costing
less than {args.cost_cap}x the best model are all asked; the trained pair ranker (artifact
`{artifact.content_hash[:12]}`, each model's train record as its reliability) picks the answer. Cost is
the sum of the k calls. The ranker was fitted on the train splits, so **train figures are in-sample**;
test figures are held out. The router plans this (`rank_size` in a profile) where `constellation train
router` finds it within a point of the best model on train at the lowest cost; `bench.pools` measures
the learned profiles through the mesh.

{table}
"""
    write_section("ranked-fanout", body)
    print(table)


if __name__ == "__main__":
    main()
