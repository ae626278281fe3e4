"""Error-bounded plans and decomposition *through the mesh*: real Triton (replay model), real dispatch, real Asks.

Two parts, one run:

1. **Error-bounded Asks** (``AskRequest.alpha``) on the test splits of ``routerbench_arc`` (A-D) and
   ``routerbench_winogrande`` (A/B), via ``constellation eval --policy planned:<alpha>,majority,static``
   (:func:`apps.eval_run.run_eval`; matrices fitted on ``train`` by the same code as ``constellation
   train confusion``): realised error per true label with a 95 % Wilson interval against alpha, mean
   cost against the best single model on train (``static``) and every model voting (``majority``). Cost
   through the mesh counts the calls that completed: a call cancelled by the certified early stop reports
   no cost (a live backend would bill its prompt tokens).
2. **Decomposition** on compound prompts of 2-4 ``gsm8k`` test prompts (numbered lists). The replay model
   looks prompts up by their exact text, and the splitter joins an item's lines with spaces, so the
   parts are the recorded prompts with their whitespace collapsed to single spaces: this run writes a
   derived pool of those one-line prompts with the *recorded* answers, and Triton's replay model serves
   it. Dispatch runs without a router, so every part goes to the best model on train (the default
   model): accuracy and cost are those of that model by construction, and what decomposition changes is
   latency (SIMULATED, the replay latency model at the given time scale): the parts at once against the
   same model answering them one after another.

Run: ``python -m bench.planned_mesh [--data-dir ../shared/data]``; writes ``docs/bench/planned_mesh.json``
and the "planned-mesh" section of ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import platform
import random
import re
import tempfile
import time
from contextlib import aclosing
from dataclasses import asdict
from pathlib import Path
from typing import Any

from apps.eval_run import MAX_TOKENS_LIMIT, REPLAY_MODEL, EvalReport, catalog_for, run_eval
from apps.evaluation import static_model
from bench.report import DOCS, markdown_table, percentiles, write_section
from constellation.client import DispatchClient, ask_request
from constellation.planning import split
from constellation.pools import PoolRecord, read_pool
from constellation.v1 import dispatch_pb2
from services.dispatch.router_train import default_data_dir

ALPHAS = {"routerbench_arc": [0.3, 0.1, 0.05, 0.02, 0.01], "routerbench_winogrande": [0.6, 0.5, 0.45, 0.4]}


def _ci(row: dict[str, float]) -> str:
    return f"{row['error']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"


def bounded_rows(report: EvalReport) -> list[list[object]]:
    """One row per alpha, then the two references."""
    by = {r.policy: r for r in report.results}
    static, majority = by["static"], by["majority"]
    rows: list[list[object]] = []
    for policy, labels in report.bounded.items():
        alpha = float(policy.split(":", 1)[1])
        result = by[policy]
        over = "".join(label for label, row in labels.items() if row["low"] > alpha) or "-"
        rows.append(
            [
                alpha,
                ", ".join(f"{label} {_ci(row)}" for label, row in labels.items()),
                over,
                f"{result.quality * 100:.1f}",
                f"{result.mean_models:.1f}",
                f"{result.mean_cost_usd:.5f}",
                f"{result.mean_cost_usd / static.mean_cost_usd:.2f}x",
                f"{result.mean_cost_usd / majority.mean_cost_usd:.2f}x",
                f"{result.simulated_ms['p50']:.0f}",
            ]
        )
    for name, result in (("best single on train (static)", static), ("every model voting (majority)", majority)):
        rows.append(
            [
                name,
                "",
                "",
                f"{result.quality * 100:.1f}",
                f"{result.mean_models:.1f}",
                f"{result.mean_cost_usd:.5f}",
                "",
                "",
                f"{result.simulated_ms['p50']:.0f}",
            ]
        )
    return rows


def findings(report: EvalReport) -> str:
    """Computed summary lines: where the realised error broke alpha, and the cost ratios' range."""
    by = {r.policy: r for r in report.results}
    cells = [(float(p.split(":", 1)[1]), row) for p, labels in report.bounded.items() for row in labels.values()]
    above = sum(row["low"] > alpha for alpha, row in cells)
    point = sum(row["error"] > alpha for alpha, row in cells)
    ratios = [by[p].mean_cost_usd / by["static"].mean_cost_usd for p in report.bounded]
    return (
        f"- Realised error above alpha in {point} of {len(cells)} (alpha, true label) cells; the whole 95 % "
        f"interval lies above alpha in {above}.\n"
        f"- Plans cost {min(ratios):.2f}x-{max(ratios):.2f}x the best single model on train; accuracy: best "
        f"single {by['static'].quality * 100:.1f} %, every model voting {by['majority'].quality * 100:.1f} %."
    )


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def build_compounds(records: list[PoolRecord], count: int, seed: int) -> list[list[PoolRecord]]:
    """``count`` random groups of 2-4 distinct test records."""
    rng = random.Random(seed)
    return [rng.sample(records, rng.randint(2, 4)) for _ in range(count)]


def write_derived_pool(records: list[PoolRecord], source: Path, directory: Path) -> Path:
    """The records again with one-line prompts (recorded answers unchanged), and the models.json beside."""
    path = directory / "gsm8k_one_line.jsonl.gz"
    rows = []
    for r in records:
        responses = {m: asdict(resp) for m, resp in r.responses.items()}
        rows.append(
            {
                "id": r.id + "/one-line",
                "split": r.split,
                "task": r.task,
                "answer_kind": r.answer_kind,
                "reference": r.reference,
                "prompt": one_line(r.prompt),
                "responses": responses,
            }
        )
    path.write_bytes(gzip.compress(("\n".join(json.dumps(row) for row in rows) + "\n").encode()))
    beside = source.with_name("models.json")
    if beside.is_file():
        (directory / "models.json").write_text(beside.read_text())
    return path


async def _ask(client: DispatchClient, request: dispatch_pb2.AskRequest) -> dispatch_pb2.FinalEvent:
    final = dispatch_pb2.FinalEvent()
    async with aclosing(client.ask(request, timeout_s=120)) as events:
        async for event in events:
            if event.WhichOneof("event") == "final":
                final = event.final
    return final


def _simulated(final: dispatch_pb2.FinalEvent) -> float:
    return sum(s.milliseconds for s in final.stages if s.simulated)


async def run_compounds(address: str, groups: list[list[PoolRecord]], model: str) -> list[dict[str, Any]]:
    """Each compound decomposed through the mesh, and its parts asked one after another of ``model``."""
    out: list[dict[str, Any]] = []
    async with DispatchClient(address, traced=False) as client:
        for group in groups:
            texts = [one_line(r.prompt) for r in group]
            prompt = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts))
            parts = split(prompt)
            exact = parts is not None and [p.text for p in parts] == texts
            if not exact:  # sent whole, the compound is no recorded prompt: the replay model cannot answer it
                out.append({"parts": len(group), "split_exactly": False})  # no Ask
                continue
            started = time.perf_counter()
            whole = await _ask(client, ask_request(prompt, max_tokens=MAX_TOKENS_LIMIT))
            wall = (time.perf_counter() - started) * 1000
            sequential = [await _ask(client, ask_request(t, model=model, max_tokens=MAX_TOKENS_LIMIT)) for t in texts]
            right = [r.responses[model].quality >= 1.0 for r in group]
            answered = [p.text for p in whole.parts]
            out.append(
                {
                    "parts": len(group),
                    "split_exactly": exact,
                    "decomposed_all_right": [a.strip() for a in answered]
                    == [r.responses[model].text.strip() for r in group]
                    and all(right),
                    "sequential_all_right": all(right)
                    and [f.text for f in sequential] == [r.responses[model].text for r in group],
                    "decomposed_cost": whole.usage.cost_usd,
                    "sequential_cost": sum(f.usage.cost_usd for f in sequential),
                    "decomposed_simulated_ms": _simulated(whole),
                    "sequential_simulated_ms": sum(_simulated(f) for f in sequential),
                    "decomposed_wall_ms": wall,
                }
            )
    return out


def decomposition(data_dir: Path, count: int, seed: int, time_scale: float) -> tuple[str, list[dict[str, Any]]]:
    """Part 2 (see the module docstring): the markdown table and the per-compound rows."""
    from apps.mesh import Mesh, MeshPorts
    from constellation.net import free_port

    source = data_dir / "gsm8k.jsonl.gz"
    records = list(read_pool(source))
    model = static_model([r for r in records if r.split == "train"])
    test = [r for r in records if r.split == "test" and model in r.responses]
    groups = build_compounds(test, count, seed)
    with tempfile.TemporaryDirectory(prefix="constellation-decompose-") as tmp:
        directory = Path(tmp)
        pool = write_derived_pool(
            sorted({r.id: r for g in groups for r in g}.values(), key=lambda r: r.id), source, directory
        )
        catalog = directory / "catalog.json"
        catalog.write_text(json.dumps(catalog_for(pool, [model])))
        mesh = Mesh(
            MeshPorts(*(free_port() for _ in range(9))),
            models=[REPLAY_MODEL],
            run_dir=directory,
            say=lambda _: None,
            model_parameters={REPLAY_MODEL: {"pool_paths": str(pool), "time_scale": str(time_scale)}},
            dispatch_args=["--models-file", str(catalog), "--default-model", model, "--no-routing", "--no-hedging",
                           "--max-tokens-limit", str(MAX_TOKENS_LIMIT)],
        )  # fmt: skip
        mesh.start()
        try:
            rows = asyncio.run(run_compounds(mesh.dispatch_address, groups, model))
        finally:
            mesh.stop()
    total = len(rows)
    rows = [r for r in rows if r["split_exactly"]]
    n = len(rows)
    split_ok = n
    dec, seq = (
        percentiles([r["decomposed_simulated_ms"] for r in rows]),
        percentiles([r["sequential_simulated_ms"] for r in rows]),
    )
    table = markdown_table(
        ["way", "compounds answered", "split into the recorded parts", "every part right %", "mean cost $",
         "simulated ms p50 / p95", "simulated latency vs sequential (p50)"],
        [
            ["decomposed (parts at once)", n, f"{split_ok}/{total}",
             f"{100 * sum(r['decomposed_all_right'] for r in rows) / n:.1f}",
             f"{sum(r['decomposed_cost'] for r in rows) / n:.5f}", f"{dec['p50']:.0f} / {dec['p95']:.0f}",
             f"{dec['p50'] / seq['p50']:.2f}x"],
            [f"{model}, parts one after another", n, "",
             f"{100 * sum(r['sequential_all_right'] for r in rows) / n:.1f}",
             f"{sum(r['sequential_cost'] for r in rows) / n:.5f}", f"{seq['p50']:.0f} / {seq['p95']:.0f}", "1.00x"],
        ],
    )  # fmt: skip
    note = (
        f"Compounds not split into exactly their parts ({total - n} of {total}) are left out: sent whole, "
        "they are no recorded prompt, so the replay model cannot answer them."
    )
    return f"{table}\n\n{note}", rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--compounds", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-scale", type=float, default=0.05)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sections = []
    results: dict[str, Any] = {}
    header = ["alpha", "realised error per true label [95 % Wilson]", "labels whose CI lies above alpha",
              "accuracy %", "models asked", "mean cost $", "cost vs best single", "cost vs every model voting",
              "simulated ms p50"]  # fmt: skip
    for pool, alphas in ALPHAS.items():
        policies = [f"planned:{a}" for a in alphas] + ["majority", "static"]
        report = run_eval(
            args.data_dir / f"{pool}.jsonl.gz", policies=policies, time_scale=args.time_scale, progress=False,
            say=lambda _: None,
        )  # fmt: skip
        prompts = len(report.results[0].outcomes)
        failed = sum(o.failed for r in report.results if r.policy.startswith("planned:") for o in r.outcomes)
        sections.append(
            f"### {pool} ({prompts} test prompts; {failed} error-bounded Asks refused or failed)\n\n"
            + markdown_table(header, bounded_rows(report))
            + "\n\n"
            + findings(report)
        )
        results[pool] = {"bounded": report.bounded, "results": [r.row() for r in report.results]}
    table, rows = decomposition(args.data_dir, args.compounds, args.seed, args.time_scale)
    results["decomposition"] = rows
    seconds = time.perf_counter() - started
    body = (
        "## Query plans with guarantees, through the mesh\n\n"
        f"Command: `python -m bench.planned_mesh` ({platform.machine()}, {seconds:.0f} s). Real Triton (replay "
        f"model, time scale {args.time_scale:g}), a dispatch process, every query an `Ask` over gRPC. "
        "Confusion matrices from `train`, figures on `test`; the guarantee and its assumptions are in the README's "
        '"Query plans with guarantees". Cost counts the calls that completed (a call cancelled by the certified '
        "early stop reports none). Latencies are SIMULATED.\n\n"
        + "\n\n".join(sections)
        + "\n\n### Decomposition (compound prompts of 2-4 gsm8k test prompts)\n\n"
        "Parts are the recorded prompts with whitespace collapsed (the replay model matches exact text), "
        "served with their recorded answers; without a router every part goes to the best model on train, so "
        "accuracy and cost match the sequential baseline by construction and latency is what changes.\n\n" + table
    )
    write_section("planned-mesh", body)
    (DOCS / "bench").mkdir(parents=True, exist_ok=True)
    (DOCS / "bench" / "planned_mesh.json").write_text(json.dumps(results, indent=2, default=str))
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
