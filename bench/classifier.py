"""Classifier benchmark: keyword-only, encoder-only and hybrid on the recorded pools' test splits.

For each policy a classifier server runs in its own process (as in production) and the benchmark
talks to it over gRPC on loopback:

* accuracy: every test prompt through ClassifyBatch; task accuracy, complexity accuracy and macro-F1,
  output-length error, beside the majority-class baseline (the most common train label);
* latency: single Classify calls, one at a time, on a fixed sample of test prompts (p50 / p99 at the
  client, after a warm-up);
* throughput: all test prompts as ClassifyBatch calls of 64, two in flight.

Latency and throughput are measured twice: without the embedding (``omit_embedding``: the
classification alone, where the hybrid policy can skip the encoder) and with it (what dispatch asks
for, since routing reuses the embedding; every policy then runs the encoder). The keyword rules are
also timed in-process, without gRPC.

The heads come from the current artifact (``constellation train classifier``, train splits only);
``--train`` trains first. Writes ``docs/bench/classifier.json`` and the ``classifier`` section of
``docs/BENCHMARKS.md``.

Run: ``python -m bench.classifier`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.report import DOCS, markdown_table, percentiles, write_section
from constellation.pools import read_pool
from constellation.v1 import common_pb2
from services.classifier.client import ClassifierClient
from services.classifier.heads import default_artifact_root, load_artifact, macro_f1
from services.classifier.labels import (
    COMPLEXITIES,
    TASKS,
    ComplexityBands,
    LabelledPrompt,
    label_records,
    load_task_labels,
)
from services.classifier.rules import KeywordRules
from services.classifier.train import DEFAULT_DATA_DIR, build_parser, train

COMMAND = "python -m bench.classifier"
BATCH = 64
IN_FLIGHT = 2
POLICIES = ("keyword", "encoder", "hybrid")
TARGETS = {"task_accuracy": 0.98, "single_p50_ms": 5.0, "batch_qps": 300.0}
_TASK_NAMES = {common_pb2.TaskType.Value(f"TASK_TYPE_{t.upper()}"): t for t in TASKS}
_COMPLEXITY_NAMES = {common_pb2.Complexity.Value(f"COMPLEXITY_{c.upper()}"): c for c in COMPLEXITIES}


def test_prompts(artifact_manifest: dict[str, Any], data_dir: Path) -> tuple[list[LabelledPrompt], dict[str, Any]]:
    """Labelled test prompts (thresholds from the artifact, i.e. fitted on train) and train majorities."""
    bands = {pool: ComplexityBands.from_json(raw) for pool, raw in artifact_manifest["complexity_bands"].items()}
    labels = load_task_labels()
    pools = sorted(data_dir.glob("*.jsonl.gz"))
    test = [r for p in pools for r in read_pool(p, split="test") if r.task in bands]
    train_records = [r for p in pools for r in read_pool(p, split="train") if r.task in bands]
    train_labelled = label_records(train_records, labels, bands)
    majority = {
        "task": Counter(i.task for i in train_labelled).most_common(1)[0][0],
        "complexity": Counter(i.complexity for i in train_labelled).most_common(1)[0][0],
        "log_output_tokens": float(np.median([i.log_output_tokens for i in train_labelled])),
    }
    return label_records(test, labels, bands), majority


def score(
    items: Sequence[LabelledPrompt], tasks: Sequence[str], complexities: Sequence[str], tokens: Sequence[float]
) -> dict[str, Any]:
    """Accuracy, macro-F1 and length error of one set of predictions."""
    log_error = np.abs(np.log1p(np.asarray(tokens, dtype=float)) - np.array([i.log_output_tokens for i in items]))
    by_pool: dict[str, list[bool]] = {}
    for item, task in zip(items, tasks, strict=True):
        by_pool.setdefault(item.pool, []).append(item.task == task)
    return {
        "task_accuracy": float(np.mean([i.task == t for i, t in zip(items, tasks, strict=True)])),
        "complexity_accuracy": float(np.mean([i.complexity == c for i, c in zip(items, complexities, strict=True)])),
        "complexity_macro_f1": macro_f1([i.complexity for i in items], list(complexities), COMPLEXITIES),
        "output_log_mae": float(log_error.mean()),
        "output_within_2x": float(np.mean(log_error <= math.log(2))),
        "task_accuracy_by_pool": {p: float(np.mean(v)) for p, v in sorted(by_pool.items())},
    }


class Server:
    """A classifier server in its own process, on a free loopback port."""

    def __init__(self, policy: str, artifact: Path):
        self.policy = policy
        self.artifact = artifact
        self.process: subprocess.Popen[str] | None = None
        self.address = ""

    def __enter__(self) -> Server:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "CONSTELLATION_CLASSIFIER_LOG_LEVEL": "WARNING",
        }
        command = [sys.executable, "-m", "services.classifier.main", "--port", "0", "--policy", self.policy]
        command += ["--artifact", str(self.artifact)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert self.process.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            found = re.search(r"listening on ([\w.\[\]:]+):(\d+)", line)
            if found:
                self.address = f"127.0.0.1:{found.group(2)}"
                return self
            if not line and self.process.poll() is not None:
                break
        self.__exit__()
        raise RuntimeError(f"the {self.policy} classifier server did not start")

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


async def classify_all(address: str, prompts: Sequence[str], *, omit_embedding: bool) -> tuple[list[Any], float]:
    """Every prompt through ClassifyBatch (batches of 64, two in flight); results in order, and wall seconds."""
    chunks = [list(prompts[i : i + BATCH]) for i in range(0, len(prompts), BATCH)]
    results: list[list[Any]] = [[] for _ in chunks]
    gate = asyncio.Semaphore(IN_FLIGHT)
    async with ClassifierClient(address, traced=False) as client:
        await client.classify_batch(chunks[0][:8], timeout_s=120, omit_embedding=omit_embedding)  # warm-up

        async def one(index: int) -> None:
            async with gate:
                results[index] = await client.classify_batch(
                    chunks[index], timeout_s=600, omit_embedding=omit_embedding
                )

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(chunks))))
        wall = time.perf_counter() - started
    return [r for chunk in results for r in chunk], wall


async def single_latencies(
    address: str, prompts: Sequence[str], *, omit_embedding: bool, warmup: int = 20
) -> list[float]:
    """Milliseconds of sequential Classify calls, at the client."""
    async with ClassifierClient(address, traced=False) as client:
        for prompt in prompts[:warmup]:
            await client.classify(prompt, timeout_s=60, omit_embedding=omit_embedding)
        times = []
        for prompt in prompts:
            started = time.perf_counter()
            await client.classify(prompt, timeout_s=60, omit_embedding=omit_embedding)
            times.append((time.perf_counter() - started) * 1000)
    return times


def keyword_microseconds(prompts: Sequence[str], rounds: int = 5) -> float:
    """Mean time of the keyword rules per prompt, in-process, best of ``rounds`` passes."""
    rules = KeywordRules()
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        for prompt in prompts:
            rules.classify(prompt)
        best = min(best, time.perf_counter() - started)
    return best / len(prompts) * 1e6


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.artifacts) if args.artifacts else default_artifact_root()
    if args.train:
        train(build_parser().parse_args(["--out", str(root), "--quiet"]))
    artifact = load_artifact(root)
    assert artifact.path is not None
    items, majority = test_prompts(artifact.manifest, Path(args.data_dir))
    prompts = [i.prompt for i in items]
    sample = random.Random(7).sample(prompts, min(args.latency_samples, len(prompts)))
    record: dict[str, Any] = {
        "command": COMMAND,
        # the artifact's directory name, not where the cache lies on this machine
        "artifact": {"content_hash": artifact.content_hash, "path": f"classifier/{Path(artifact.path).name}"},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        },
        "test_prompts": len(items),
        "latency_samples": len(sample),
        "majority": {
            **majority,
            **score(
                items,
                [majority["task"]] * len(items),
                [majority["complexity"]] * len(items),
                [math.expm1(majority["log_output_tokens"])] * len(items),
            ),
        },
        "keyword_rules_us_per_prompt": keyword_microseconds(prompts),
        "policies": {},
    }
    for policy in tqdm(POLICIES, desc="policies", unit="policy"):
        with Server(policy, artifact.path) as server:
            entry: dict[str, Any] = {}
            for omit in (True, False):
                label = "classification" if omit else "with_embedding"
                results, wall = asyncio.run(classify_all(server.address, prompts, omit_embedding=omit))
                latencies = asyncio.run(single_latencies(server.address, sample, omit_embedding=omit))
                entry[label] = {
                    **score(
                        items,
                        [_TASK_NAMES[r.task] for r in results],
                        [_COMPLEXITY_NAMES[r.complexity] for r in results],
                        [r.expected_output_tokens for r in results],
                    ),
                    "decided_by": dict(Counter(r.decided_by for r in results)),
                    "batch_qps": len(prompts) / wall,
                    "single_ms": percentiles(latencies, (50, 95, 99)),
                }
            record["policies"][policy] = entry
    return record


def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def report(record: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    majority = record["majority"]
    rows = [
        [
            f"majority class (train: {majority['task']}, {majority['complexity']}, median length)",
            _fmt(100 * majority["task_accuracy"]),
            _fmt(100 * majority["complexity_accuracy"]),
            _fmt(majority["complexity_macro_f1"], 3),
            _fmt(majority["output_log_mae"], 3),
            _fmt(100 * majority["output_within_2x"]),
            "",
            "",
            "",
        ]
    ]
    for policy in POLICIES:
        for label, title in (("classification", "omit_embedding"), ("with_embedding", "with embedding")):
            entry = record["policies"][policy][label]
            rows.append(
                [
                    f"**{policy}** ({title})",
                    _fmt(100 * entry["task_accuracy"]),
                    _fmt(100 * entry["complexity_accuracy"]),
                    _fmt(entry["complexity_macro_f1"], 3),
                    _fmt(entry["output_log_mae"], 3),
                    _fmt(100 * entry["output_within_2x"]),
                    f"{entry['single_ms']['p50']:.2f} / {entry['single_ms']['p99']:.2f}",
                    _fmt(entry["batch_qps"], 0),
                    ", ".join(f"{k} {v}" for k, v in sorted(entry["decided_by"].items())),
                ]
            )
    table = markdown_table(
        [
            "path",
            "task acc %",
            "complexity acc %",
            "complexity macro-F1",
            "length MAE (log1p tokens)",
            "length within 2x %",
            "single query ms p50 / p99 (gRPC)",
            "batched queries/s",
            "decided by",
        ],
        rows,
    )
    pools = sorted(record["majority"]["task_accuracy_by_pool"])
    pool_rows = [
        [policy, *(_fmt(100 * record["policies"][policy]["classification"]["task_accuracy_by_pool"][p]) for p in pools)]
        for policy in POLICIES
    ]
    pool_table = markdown_table(["task accuracy % by pool", *pools], pool_rows)
    hybrid = record["policies"]["hybrid"]["classification"]
    keyword = record["policies"]["keyword"]["classification"]
    verdicts = [
        f"- task accuracy ≥ {100 * TARGETS['task_accuracy']:.0f}%: hybrid {100 * hybrid['task_accuracy']:.1f}%, "
        f"keyword {100 * keyword['task_accuracy']:.1f}% "
        f"({'**meets**' if hybrid['task_accuracy'] >= TARGETS['task_accuracy'] else '**misses**'}).",
    ]
    for policy in POLICIES:
        for label, title in (("classification", "omit_embedding"), ("with_embedding", "with embedding")):
            entry = record["policies"][policy][label]
            p50, qps = entry["single_ms"]["p50"], entry["batch_qps"]
            ok = p50 <= TARGETS["single_p50_ms"] and qps >= TARGETS["batch_qps"]
            verdicts.append(
                f"- {policy}, {title}: single p50 {p50:.2f} ms (target ≤ {TARGETS['single_p50_ms']:.0f}), "
                f"{qps:.0f} queries/s batched (target ≥ {TARGETS['batch_qps']:.0f}): "
                f"{'**meets** both' if ok else '**misses**'}."
            )
    notes = [
        "Reading the table:",
        "",
        "- The encoder is the cost. all-MiniLM-L6-v2 on one CPU thread embeds about 50 test prompts/s "
        "(57 word pieces on average after focus extraction); every row that runs it for every prompt sits "
        "there, whatever the batching. 300 queries/s with embeddings would need about 380 GFLOP/s of fp32, "
        "more than two cores have; `encoder_threads = 2` gives about 1.8x on an idle host (and far less on a "
        "busy one), int8 dynamic quantisation 1.5-2x but moves embeddings about 0.06 cosine away. The "
        "hybrid policy meets the latency and throughput targets because it sends only the prompts the rules "
        "are unsure of to the encoder; with the embedding requested it cannot skip it.",
        "- Complexity, as defined here (how many of the pool's models got the prompt right), is hard to read "
        "from the prompt: the heads beat the majority class by about 10 points and the rules' per-task base "
        "rates by about 2; cross-validation on the train splits shows the same ceiling.",
        "- AlpacaEval task labels are one annotator's reading of 805 prompts against the rubric in "
        "`task_labels.toml` (a quarter are not open-ended writing); agreement there is the hard part of the "
        "task accuracy.",
    ]
    machine = record["machine"]
    return "\n".join(
        [
            "## Classifier: keyword rules, encoder heads and the hybrid policy",
            "",
            f"Command: `{COMMAND}` (after `constellation train classifier`, which fits the heads on the train "
            f"splits; `--train` retrains first). Artifact `{record['artifact']['content_hash'][:12]}`. "
            f"{record['test_prompts']} prompts: the test splits of every recorded pool. Each policy runs as a "
            "classifier server in its own process (encoder on 1 torch thread); the client talks gRPC on loopback. "
            f"Single-query latency: {record['latency_samples']} sequential `Classify` calls on a fixed sample of "
            f"test prompts; throughput: all test prompts as `ClassifyBatch` calls of {BATCH}, {IN_FLIGHT} in flight. "
            "Labels: task from `services/classifier/data/task_labels.toml`; complexity LOW/MEDIUM/HIGH from the "
            "share of the pool's models that answered correctly (graded pools: HIGH below 50%, LOW from 80%) or "
            "the train tertiles of the mean judge score (AlpacaEval); output length log1p(mean recorded output "
            "tokens), else len(text)/4. "
            f"Machine: {machine['platform']}, {machine['cpus']} cpus, shared (load average "
            f"{machine['load_average_at_start'][0]} at start).",
            "",
            table,
            "",
            "`omit_embedding` rows measure the classification alone; `with embedding` rows return the 384-float "
            "query embedding too (what dispatch asks for, so routing need not compute it), which makes every "
            "policy run the encoder. Keyword rules alone, in-process: "
            f"{record['keyword_rules_us_per_prompt']:.1f} µs per prompt "
            "(mean over the test prompts, best of 5 passes).",
            "",
            pool_table,
            "",
            *verdicts,
            "",
            *notes,
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.classifier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="recorded pools (test splits are scored)")
    parser.add_argument("--artifacts", default="", help="artifact root (default: the cache dir's artifacts/)")
    parser.add_argument("--train", action="store_true", help="train the heads on the train splits first")
    parser.add_argument("--latency-samples", type=int, default=300, help="single-query calls per measurement")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: re-render the section from docs/bench/classifier.json",
    )
    args = parser.parse_args(argv)
    saved = DOCS / "bench" / "classifier.json"
    record = json.loads(saved.read_text()) if args.report_only else run(args)
    body = report(record)
    print(body)
    if not args.no_write:
        saved.parent.mkdir(parents=True, exist_ok=True)
        if not args.report_only:
            saved.write_text(json.dumps(record, indent=2) + "\n")
        write_section("classifier", body)


if __name__ == "__main__":
    main()
