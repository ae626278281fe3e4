"""Routing profiles and baselines on every recorded pool, through the real mesh: ``constellation eval`` per pool.

For each ``*.jsonl.gz`` in the data directory (default ``../shared/data``): the test split through a
fresh mesh (Triton replay model + classifier + dispatch), every single model, static, random, oracle,
(closed answers) majority vote, and the router's four profiles (``quality``, ``balanced``, ``cost``,
``speed``; trained first with ``constellation train router`` on the train splits). Writes
``docs/eval/<task>.{json,md}`` and ``<task>_pareto.png``, and the "baselines" section of
``docs/BENCHMARKS.md`` with a summary of the profiles against the best single model.

Run: ``make bench`` or ``python -m bench.pools [--data-dir DIR] [--concurrency 32]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from apps.eval_run import markdown, run_eval, write_report
from apps.evaluation import mean_quality_by_model
from bench.report import DOCS, write_section
from constellation.pools import read_pool

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    pools = sorted(args.data_dir.glob("*.jsonl.gz"))
    if not pools:
        raise SystemExit(f"no pool files (*.jsonl.gz) in {args.data_dir}; pass --data-dir")
    out = DOCS / "eval"
    started = time.perf_counter()
    sections = []
    summary = [
        "| pool | best single (test) | its mean cost $ | quality profile | cost ratio | balanced profile | cost ratio "
        "| balanced within 1 point at <= 0.5x cost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    total_calls = 0
    for pool in pools:
        report = run_eval(pool, concurrency=args.concurrency)
        write_report(report, out)
        total_calls += report.calls
        by_name = {r.policy: r for r in report.results}
        best = report.best_single
        if "profile:quality" in by_name and "profile:balanced" in by_name:
            q, b = by_name["profile:quality"], by_name["profile:balanced"]
            ok = b.quality >= best.quality - 0.01 and b.mean_cost_usd <= 0.5 * best.mean_cost_usd
            summary.append(
                f"| {report.task} | {best.policy.removeprefix('single:')} {best.quality * 100:.2f} "
                f"| {best.mean_cost_usd:.5f} | {q.quality * 100:.2f} | {q.mean_cost_usd / best.mean_cost_usd:.2f}x "
                f"| {b.quality * 100:.2f} | {b.mean_cost_usd / best.mean_cost_usd:.2f}x | {'yes' if ok else 'no'} |"
            )
        sections.append(
            f"### {report.task} ({report.metric}, test split)\n\n"
            f"{report.calls} calls in {report.wall_s:.1f} s ({report.calls_per_s:.0f} calls/s); "
            f"{report.failed_calls} failed. The last column is each model's recorded {report.metric} over the "
            "whole file (train + test), the figure the data README's tables give.\n\n"
            f"{markdown(report, mean_quality_by_model(read_pool(pool)))}\n"
            f"![{report.task} Pareto](eval/{report.task}_pareto.png)\n"
        )
    wall = time.perf_counter() - started
    body = (
        "## Routing profiles and baselines on the recorded pools (through the mesh)\n\n"
        "The router is trained on the train splits only (`constellation train router`); the profiles are "
        "then asked through dispatch with no model named, so the classifier, the router and any cascade or "
        "vote it plans run for real. Quality and cost ratios are against the best single model **on the "
        "test split** (chosen after the fact, a bar no router can know in advance).\n\n" + "\n".join(summary) + "\n\n"
        f"Command: `make bench` (runs `python -m bench.pools`; one pool: `constellation eval --pool FILE`). "
        f"Every call is a real `Ask` through dispatch to Triton's replay model (concurrency {args.concurrency}); "
        "quality is the recorded correctness (or judge score) of the answer that came back, checked "
        "text-for-text against the recording. Model latency is **simulated** (size class + seeded "
        "log-normal tail; not waited, time scale 0); the real mesh time is reported beside it. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cpus.\n\n"
        f"All {len(pools)} pools: {total_calls} calls in {wall:.0f} s wall, including mesh start-ups "
        f"({total_calls / wall:.0f} calls/s overall).\n\n" + "\n".join(sections)
    )
    write_section("baselines", body)
    print(f"\n{len(pools)} pools, {total_calls} calls, {wall:.0f} s; wrote docs/eval/ and docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
