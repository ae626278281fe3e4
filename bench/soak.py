"""A bounded soak: minutes of steady load through the real mesh, RSS and open files of every process.

``python -m bench.soak`` (in ``make bench``). Starts the supervised mesh of :mod:`bench.faults`
(Triton replay with its python-backend stub, classifier, registry, fusion, dispatch), warms it up,
samples each process's resident memory and open file descriptors (``psutil``), sends Asks at a fixed
open-loop rate for ``--duration-s`` seconds, and samples again. Growth that a few minutes show is
printed beside the start values; it is not a leak proof, only the bound a short run can give.

Writes ``docs/bench/soak.json`` and the ``soak`` section of ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from apps.mesh import Mesh
from bench.faults import Load, Phase, build_mesh, supervised, test_prompts
from bench.quorum import DATA
from bench.report import DOCS, markdown_table, percentiles, write_section


def processes(mesh: Mesh) -> dict[str, psutil.Process]:
    """Every process of the mesh by name: the services, Triton and the processes in Triton's group."""
    found: dict[str, psutil.Process] = {}
    for child in mesh.children():
        if child.pid is not None:
            found[child.name] = psutil.Process(child.pid)
    if mesh.triton.pid is not None:
        triton = psutil.Process(mesh.triton.pid)
        found["tritonserver"] = triton
        for index, stub in enumerate(triton.children(recursive=True)):
            found[f"triton stub {index + 1}"] = stub
    return found


def sample(procs: dict[str, psutil.Process]) -> dict[str, dict[str, float]]:
    """RSS (MiB) and open file descriptors of each process; a process gone reads as -1."""
    out: dict[str, dict[str, float]] = {}
    for name, proc in procs.items():
        try:
            out[name] = {"rss_mib": proc.memory_info().rss / 2**20, "fds": float(proc.num_fds())}
        except psutil.Error:
            out[name] = {"rss_mib": -1.0, "fds": -1.0}
    return out


async def soak(mesh: Mesh, prompts: list[str], rate: float, deadline_s: float, seconds: float) -> Phase:
    """Open-loop Asks for ``seconds``; returns the phase with every outcome."""
    load = Load(mesh.dispatch_address, prompts, rate, deadline_s)
    stop = asyncio.Event()
    phase = Phase("soak", time.monotonic())
    load.phase = phase
    sender = asyncio.create_task(load.run(stop))
    await asyncio.sleep(seconds)
    load.phase = None
    stop.set()
    await sender
    await load.drain()
    phase.ended = time.monotonic()
    return phase


def report(start: dict[str, dict[str, float]], end: dict[str, dict[str, float]], summary: dict[str, Any],
           args: argparse.Namespace) -> str:  # fmt: skip
    rows = [
        [name, f"{start[name]['rss_mib']:.0f}", f"{end[name]['rss_mib']:.0f}",
         f"{end[name]['rss_mib'] - start[name]['rss_mib']:+.1f}", f"{start[name]['fds']:.0f}",
         f"{end[name]['fds']:.0f}"]
        for name in start
    ]  # fmt: skip
    table = markdown_table(["process", "RSS start MiB", "RSS end MiB", "growth MiB", "fds start", "fds end"], rows)
    outcomes = ", ".join(f"{k} {v}" for k, v in summary["kinds"].items())
    return (
        "## Soak: memory and open files over minutes of load\n\n"
        f"`python -m bench.soak --duration-s {args.duration_s:g} --rate {args.rate:g}` on {platform.machine()}, "
        f"{os.cpu_count()} cores: the supervised mesh of the fault suite (Triton replay of `{args.pool.name}`), "
        f"{summary['sent']} Asks in {args.duration_s:g} s after {args.warmup_s:g} s of warm-up ({outcomes}; "
        f"wall p50 / p99 {summary['wall_ms']['p50']:.0f} / {summary['wall_ms']['p99']:.0f} ms). Samples taken "
        f"after the warm-up and at the end; restarts during the run: {summary['restarts']}.\n\n{table}\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, default=DATA / "gsm8k.jsonl.gz")
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--warmup-s", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=5.0, help="Asks per second (open loop)")
    parser.add_argument("--deadline-s", type=float, default=20.0)
    parser.add_argument("--time-scale", type=float, default=0.05)
    args = parser.parse_args(argv)
    prompts = test_prompts(args.pool, 400)
    with tempfile.TemporaryDirectory(prefix="constellation-soak-") as tmp:
        mesh = build_mesh(Path(tmp), args.pool, args.time_scale)
        try:
            mesh.start()
            with supervised(mesh) as events:
                asyncio.run(soak(mesh, prompts, args.rate, args.deadline_s, args.warmup_s))
                procs = processes(mesh)
                start = sample(procs)
                phase = asyncio.run(soak(mesh, prompts, args.rate, args.deadline_s, args.duration_s))
                end = sample(procs)
        finally:
            mesh.stop()
    answered = [o.wall_ms for o in phase.outcomes if o.kind in ("answered", "fallback")]
    summary = {"sent": len(phase.outcomes), "kinds": dict(Counter(o.kind for o in phase.outcomes)),
               "wall_ms": percentiles(answered), "restarts": len(events)}  # fmt: skip
    out = DOCS / "bench"
    out.mkdir(parents=True, exist_ok=True)
    recorded = {k: str(v) for k, v in vars(args).items()} | {"pool": args.pool.name}
    (out / "soak.json").write_text(json.dumps({"args": recorded, **summary, "start": start, "end": end}, indent=2))
    body = report(start, end, summary, args)
    write_section("soak", body)
    print(body)


if __name__ == "__main__":
    main()
