"""What the mesh adds: the same prompt and token budget sent straight to Triton and through Ask.

Starts a real Triton (SmolLM2) and a dispatch process on free loopback ports, then sends requests in
interleaved pairs (direct, mesh / mesh, direct, alternating) so that both paths see the same machine
load. Measures time to first token and total time at the client. Writes
``docs/bench/mesh_overhead.json``, ``docs/bench/mesh_overhead_ttft.png`` and its section of
``docs/BENCHMARKS.md``.

Run: ``make bench`` or ``python -m bench.mesh_overhead --rounds 60``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tqdm import tqdm

from bench.report import DOCS, markdown_table, percentiles, write_section
from constellation.client import DispatchClient, ask_request
from constellation.mesh import Mesh, MeshPorts
from constellation.triton import Sampling
from services.inference.launcher import free_port

PROMPT = "List three facts about the Moon."
MODEL = "smollm2"


async def direct(client: aioclient.InferenceServerClient, max_tokens: int) -> tuple[float, float]:
    """One request straight to Triton with tritonclient; returns (ttft_ms, total_ms)."""
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_))
    stream = grpcclient.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True], dtype=bool))
    params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    sampling = Sampling(max_tokens=max_tokens, temperature=0.0)
    params.set_data_from_numpy(np.array([sampling.to_json().encode()], dtype=np.object_))
    done = asyncio.Event()

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": MODEL, "inputs": [text, stream, params]}
        await done.wait()

    start = time.perf_counter()
    first = None
    async for result, error in client.stream_infer(requests(), stream_timeout=120):
        if error is not None:
            raise RuntimeError(error)
        out = result.as_numpy("text_output")
        if first is None and out is not None and any(out.reshape(-1)):
            first = time.perf_counter()
        reason = result.as_numpy("finish_reason")
        if reason is not None and reason.reshape(-1)[0]:
            done.set()
    end = time.perf_counter()
    return ((first or end) - start) * 1000, (end - start) * 1000


async def through_mesh(client: DispatchClient, max_tokens: int) -> tuple[float, float]:
    """One Ask through dispatch; returns (ttft_ms, total_ms) at the client."""
    start = time.perf_counter()
    first = None
    async for event in client.ask(ask_request(PROMPT, max_tokens=max_tokens, temperature=0), timeout_s=120):
        if first is None and event.WhichOneof("event") == "delta":
            first = time.perf_counter()
    end = time.perf_counter()
    return ((first or end) - start) * 1000, (end - start) * 1000


async def measure(mesh: Mesh, rounds: int, warmup: int, max_tokens: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"direct_ttft": [], "direct_total": [], "mesh_ttft": [], "mesh_total": []}
    async with (
        DispatchClient(mesh.dispatch_address, traced=False) as dispatch,
        aioclient.InferenceServerClient(mesh.triton.grpc_url) as triton,
    ):
        for _ in range(warmup):
            await direct(triton, max_tokens)
            await through_mesh(dispatch, max_tokens)
        for i in tqdm(range(rounds), desc="interleaved pairs", unit="pair"):
            order = ("direct", "mesh") if i % 2 == 0 else ("mesh", "direct")
            for path in order:
                ttft, total = await (
                    direct(triton, max_tokens) if path == "direct" else through_mesh(dispatch, max_tokens)
                )
                samples[f"{path}_ttft"].append(ttft)
                samples[f"{path}_total"].append(total)
    return samples


def plot(samples: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, label in (("direct_ttft", "direct tritonclient"), ("mesh_ttft", "through Ask (dispatch)")):
        values = np.sort(samples[key])
        ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=label)
    ax.set_xlabel("time to first token at the client (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("SmolLM2-135M on Triton (CPU): direct vs through the mesh")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60, help="interleaved pairs to measure (default 60)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    ports = MeshPorts(free_port(), free_port(), free_port(), free_port(), free_port())
    with tempfile.TemporaryDirectory(prefix="constellation-bench-") as run_dir:
        mesh = Mesh(ports, models=[MODEL], run_dir=Path(run_dir))
        try:
            mesh.start()
            samples = asyncio.run(measure(mesh, args.rounds, args.warmup, args.max_tokens))
        finally:
            mesh.stop()
    out = DOCS / "bench"
    out.mkdir(parents=True, exist_ok=True)
    paired = {
        kind: [m - d for m, d in zip(samples[f"mesh_{kind}"], samples[f"direct_{kind}"], strict=True)]
        for kind in ("ttft", "total")
    }
    summary: dict[str, Any] = {key: percentiles(values) for key, values in samples.items()} | {
        f"paired_added_{k}_median": statistics.median(v) for k, v in paired.items()
    }
    record = {
        "command": "make bench (python -m bench.mesh_overhead " + " ".join(argv or []) + ")",
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}, {os.cpu_count()} cpus",
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "prompt": PROMPT,
        "summary": summary,
        "samples": samples,
    }
    (out / "mesh_overhead.json").write_text(json.dumps(record, indent=2))
    plot(samples, out / "mesh_overhead_ttft.png")

    rows = []
    for kind, label in (("ttft", "time to first token"), ("total", f"total ({args.max_tokens} tokens)")):
        d, m = summary[f"direct_{kind}"], summary[f"mesh_{kind}"]
        for p in ("p50", "p95", "p99"):
            rows.append([label, p, f"{d[p]:.2f}", f"{m[p]:.2f}", f"{m[p] - d[p]:+.2f}", f"{m[p] / d[p]:.3f}"])
    table = markdown_table(["measure", "pct", "direct ms", "mesh ms", "added ms", "mesh/direct"], rows)
    added = summary["paired_added_ttft_median"]
    verdict = "meets" if summary["mesh_ttft"]["p50"] - summary["direct_ttft"]["p50"] <= 1.5 else "misses"
    body = f"""## Mesh overhead: direct Triton vs `Ask`

Command: `make bench` (runs `python -m bench.mesh_overhead --rounds {args.rounds}`).
{args.rounds} interleaved pairs (order alternating), prompt "{PROMPT}", `max_tokens={args.max_tokens}`,
temperature 0, SmolLM2-135M-Instruct on Triton (CPU, python backend), dispatch in its own process,
all on loopback. Machine: {record["machine"]}.

{table}

Median of the paired differences (mesh − direct, same round): time to first token
{added:+.2f} ms, total {summary["paired_added_total_median"]:+.2f} ms. Target: at most 1.5 ms added to
time to first token at p50: this run **{verdict}** it.

![TTFT CDF](bench/mesh_overhead_ttft.png)
"""
    write_section("mesh-overhead", body)
    print(table)
    print(f"\npaired median added TTFT: {added:+.2f} ms; wrote {out / 'mesh_overhead.json'} and docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
