"""The floor under dispatch: what a Python gRPC hop costs before dispatch does anything.

The mesh adds a hop between the client and Triton. This benchmark measures, in one run, how much of
dispatch's added time to first token that hop alone takes. It starts one Triton (the replay model, no
simulated waiting, one token per message), then three servers of ``DispatchService/Ask`` on loopback:

- **dispatch**, as ``make run`` starts it (validation, planning, tracing, metrics, events, accounting);
- the **aio relay** of :mod:`bench.relays`: dispatch's own Triton client on a ``grpc.aio`` server and
  nothing else;
- the **sync relay**: a thread-pool ``grpc.server`` with a blocking Triton stub.

Rounds send the same request straight to Triton with ``tritonclient`` and through each server, the
order rotating. Per path: the median of the paired differences against the direct call in the same
round, with a 95% bootstrap interval. Compare paths within one run: four calls per round load the
machine differently from ``bench.mesh_overhead``'s two, so absolute figures differ between the two.
Writes ``docs/bench/relay_floor.json``, a plot and its section of ``docs/BENCHMARKS.md``.

Run: ``make bench`` or ``python -m bench.relay_floor --rounds 400`` (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from apps.mesh import ServiceProcess
from bench.dispatch_ab import replay_run, rounds
from bench.mesh_overhead import REPLAY_MODEL, bootstrap_median_interval
from bench.report import DOCS, markdown_table, write_section
from constellation.net import free_port

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = 1.5
PATHS = {
    "dispatch": ("services.dispatch.main", ["--metrics-port", "-1"]),
    "aio relay": ("bench.relays", ["--kind", "aio"]),
    "sync relay": ("bench.relays", ["--kind", "sync"]),
}


def plot(added: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for name, values in added.items():
        ordered = np.sort(values)
        ax.step(ordered, np.arange(1, len(ordered) + 1) / len(ordered), where="post", label=name)
    ax.axvline(TARGET_MS, color="black", linestyle="--", linewidth=1, label=f"target +{TARGET_MS} ms")
    ax.set_xlim(-2, 8)
    ax.set_xlabel("added time to first token, paired with a direct call in the same round (ms)")
    ax.set_ylabel("fraction of rounds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=400, help="measured rounds, one call per path each")
    parser.add_argument("--warmup", type=int, default=20, help="rounds run first and not counted")
    args = parser.parse_args(argv)
    with replay_run("constellation-floor-") as run:
        addresses = {}
        common = ["--triton-url", run.mesh.triton.grpc_url, "--models-file", str(run.models_file)]
        for name, (module, extra) in PATHS.items():
            port = free_port()
            label = name.replace(" ", "-")
            process = ServiceProcess(
                label, module, [*common, "--port", str(port), *extra], run.run_dir / f"{label}.log", cwd=ROOT
            )
            addresses[name] = run.serve(process, f"127.0.0.1:{port}")
        ttft = asyncio.run(rounds(run.target, run.mesh.triton.grpc_url, addresses, args.rounds, args.warmup))

    added = {name: [m - d for m, d in zip(ttft[name], ttft["direct"], strict=True)] for name in addresses}
    summary: dict[str, dict[str, Any]] = {
        name: {
            "ttft_p50_ms": statistics.median(ttft[name]),
            "paired_added_median_ms": statistics.median(values),
            "paired_added_ci95_ms": bootstrap_median_interval(values),
        }
        for name, values in added.items()
    }
    machine = f"{platform.machine()}, {platform.system()} {platform.release()}, {os.cpu_count()} cpus"
    out = DOCS / "bench"
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python -m bench.relay_floor " + " ".join(argv or []),
        "machine": machine,
        "rounds": args.rounds,
        "model": f"replay ({REPLAY_MODEL}, gsm8k test, no simulated waiting)",
        "direct_ttft_p50_ms": statistics.median(ttft["direct"]),
        "summary": summary,
        "samples": ttft,
    }
    (out / "relay_floor.json").write_text(json.dumps(record, indent=2))
    plot(added, out / "relay_floor.png")

    rows = [["direct `tritonclient`", f"{statistics.median(ttft['direct']):.2f}", "", ""]]
    for name, values in summary.items():
        low, high = values["paired_added_ci95_ms"]
        rows.append(
            [
                f"`Ask` through the {name}",
                f"{values['ttft_p50_ms']:.2f}",
                f"{values['paired_added_median_ms']:+.2f}",
                f"{low:+.2f} to {high:+.2f}",
            ]
        )
    table = markdown_table(["path", "TTFT p50 ms", "paired added ms (median)", "95% interval"], rows)
    hop = summary["aio relay"]["paired_added_median_ms"]
    work = summary["dispatch"]["paired_added_median_ms"] - hop
    sync_gain = hop - summary["sync relay"]["paired_added_median_ms"]
    lines = [
        f"- The asyncio hop alone adds {hop:+.2f} ms; dispatch's own work on top of it (validation, planning, "
        f"tracing, metrics, plan and progress events) {work:+.2f} ms.",
        f"- A thread-pool server making the same Triton call blocking is {abs(sync_gain):.2f} ms "
        f"{'faster' if sync_gain >= 0 else 'slower'} than the asyncio relay.",
    ]
    for name in ("aio relay", "sync relay"):
        low, high = summary[name]["paired_added_ci95_ms"]
        if low > TARGET_MS:
            verdict = f"lies above the +{TARGET_MS} ms target: in this run, the hop alone misses it"
        elif high <= TARGET_MS:
            verdict = f"lies within the +{TARGET_MS} ms target"
        else:
            verdict = f"spans the +{TARGET_MS} ms target"
        lines.append(f"- The bare {name}'s 95% interval ({low:+.2f} to {high:+.2f} ms) {verdict}.")
    findings = "\n".join(lines)
    body = f"""## Relay floor: the hop under dispatch

Command: `make bench` (runs `python -m bench.relay_floor --rounds {args.rounds}`). One Triton serving the
replay model ({REPLAY_MODEL}'s recorded gsm8k answer, no simulated waiting, one token per message); in
each of {args.rounds} rounds the same request goes straight to Triton with `tritonclient` and through
three `DispatchService/Ask` servers, the order rotating: dispatch itself, and the two bare relays of
`bench/relays.py`, which only forward the request to Triton and the text back (one on `grpc.aio`, one a
thread-pool `grpc.server` making the same Triton call blocking). Added time is paired with the direct
call of the same round. Compare the paths within this table: four calls a round load the machine
differently from the two of the mesh-overhead section, so absolute figures differ between the two.
Machine: {machine}.

{table}

{findings}

![added time to first token](bench/relay_floor.png)
"""
    write_section("relay-floor", body)
    print(table)
    print(findings)


if __name__ == "__main__":
    main()
