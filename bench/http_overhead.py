"""What the OpenAI-compatible HTTP path adds to time to first token, against the gRPC ``Ask``, in one run.

One dispatch process serves both, on one event loop over one Dispatcher (as dispatch's main mounts
the HTTP app), in front of one Triton serving the replay model with no simulated waiting and one token
per message (model time near zero, so differences are the front door's own cost). Rounds send the
same request (a recorded gsm8k prompt, ``max_tokens=16``, temperature 0) four ways, the order rotating:
straight to Triton with ``tritonclient``; ``Ask`` over gRPC; ``POST /v1/chat/completions`` streamed,
read with a bare aiohttp client; and the same with the official ``openai`` client (what its users
see, its own parsing included). The semantic cache is off (every request reaches the model).

Writes ``docs/bench/http_overhead.json`` and prints a markdown table (``--write-md``: its section of
``docs/BENCHMARKS.md``).

Run: ``python -m bench.http_overhead --rounds 300`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import tritonclient.grpc.aio as aioclient
from tqdm import tqdm

from apps.mesh import ServiceProcess
from bench.dispatch_ab import replay_run
from bench.mesh_overhead import Target, bootstrap_median_interval, direct, through_mesh
from bench.report import DOCS, markdown_table, percentiles, write_section
from constellation.client import DispatchClient
from constellation.config import load_config
from constellation.net import free_port

MAX_TOKENS = 16
PATHS = {
    "direct": "straight to Triton (tritonclient)",
    "grpc": "`Ask` over gRPC (DispatchClient)",
    "http": "HTTP SSE, aiohttp client",
    "openai": "HTTP SSE, official openai client",
}


async def serve(port: int, http_port: int, triton_url: str, models_file: str) -> None:
    """The bench's dispatch: gRPC and HTTP on one loop over one Dispatcher, until SIGTERM."""
    from constellation.server import create_server
    from services.dispatch.config import DispatchConfig
    from services.dispatch.http import create_http_app, start_http
    from services.dispatch.main import dispatcher_for, registrations

    config = load_config(
        DispatchConfig,
        None,
        port=port,
        triton_url=triton_url,
        models_file=models_file,
        metrics_port=-1,
        routing=False,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with dispatcher_for(config) as dispatcher:
        grpc_server = await create_server(registrations(dispatcher), config)
        http = await start_http(create_http_app(dispatcher), "127.0.0.1", http_port)
        print(f"dispatch: gRPC {grpc_server.port}, HTTP {http.port}", flush=True)
        try:
            await stop.wait()
        finally:
            await http.stop()
            await grpc_server.stop(1.0)


async def through_http(session: aiohttp.ClientSession, url: str, target: Target) -> float:
    """One streamed chat completion read with aiohttp; ms to the first chunk carrying text."""
    body = {
        "model": target.name,
        "messages": [{"role": "user", "content": target.prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    first = None
    async with session.post(url, json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if first is None and line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                first = time.perf_counter()
    return ((first or time.perf_counter()) - start) * 1000


async def through_openai(client: Any, target: Target) -> float:
    """The same through the official client; ms to the first chunk with content."""
    start = time.perf_counter()
    first = None
    stream = await client.chat.completions.create(
        model=target.name,
        messages=[{"role": "user", "content": target.prompt}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
    return ((first or time.perf_counter()) - start) * 1000


async def rounds(
    target: Target, triton_url: str, grpc_address: str, http_port: int, count: int, warmup: int
) -> dict[str, list[float]]:
    """``warmup + count`` rounds of one request per path, the order rotating; TTFT ms per path."""
    import openai

    url = f"http://127.0.0.1:{http_port}/v1/chat/completions"
    async with (
        aioclient.InferenceServerClient(triton_url) as triton,
        DispatchClient(grpc_address, traced=False) as dispatch,
        aiohttp.ClientSession() as session,
        openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0) as client,
    ):

        async def via_direct() -> float:
            return (await direct(triton, target, MAX_TOKENS))[0]

        async def via_grpc() -> float:
            return (await through_mesh(dispatch, target, MAX_TOKENS))[0]

        calls: dict[str, Callable[[], Awaitable[float]]] = {
            "direct": via_direct,
            "grpc": via_grpc,
            "http": lambda: through_http(session, url, target),
            "openai": lambda: through_openai(client, target),
        }
        names = list(calls)
        ttft: dict[str, list[float]] = {name: [] for name in names}
        for i in tqdm(range(warmup + count), desc="rounds", unit="round"):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                value = await calls[name]()
                if i >= warmup:
                    ttft[name].append(value)
    return ttft


def summarise(ttft: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, values in ttft.items():
        paired = [v - g for v, g in zip(values, ttft["grpc"], strict=True)]
        out[name] = percentiles(values) | {
            "added_vs_grpc_median": statistics.median(paired),
            "added_vs_grpc_ci95": bootstrap_median_interval(paired),
            "ratio_p50_vs_grpc": percentiles(values)["p50"] / percentiles(ttft["grpc"])["p50"],
        }
    return out


def report(summary: dict[str, Any], count: int, machine: str) -> str:
    rows = []
    for name, label in PATHS.items():
        row = summary[name]
        low, high = row["added_vs_grpc_ci95"]
        rows.append(
            [
                label,
                f"{row['p50']:.2f}",
                f"{row['p95']:.2f}",
                f"{row['added_vs_grpc_median']:+.2f} ({low:+.2f} to {high:+.2f})",
                f"{row['ratio_p50_vs_grpc']:.3f}",
            ]
        )
    table = markdown_table(
        ["path", "TTFT p50 ms", "TTFT p95 ms", "paired added vs gRPC, median ms (95% CI)", "p50 / gRPC p50"], rows
    )
    return f"""## HTTP front door: added time to first token against gRPC `Ask`

Command: `python -m bench.http_overhead --rounds {count}`. Machine: {machine}. One dispatch process serves
gRPC and HTTP on one event loop over one Dispatcher; Triton serves the replay model with no simulated
waiting, one token per message; `max_tokens={MAX_TOKENS}`, temperature 0, semantic cache off; {count}
rounds, one request per path each, the order rotating.

{table}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--write-md", action="store_true", help="also rewrite the section of docs/BENCHMARKS.md")
    parser.add_argument(
        "--serve", nargs=4, metavar=("PORT", "HTTP_PORT", "TRITON_URL", "MODELS_FILE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.serve:
        port, http_port, triton_url, models_file = args.serve
        asyncio.run(serve(int(port), int(http_port), triton_url, models_file))
        return
    with replay_run("constellation-http-") as run:
        port, http_port = free_port(), free_port()
        process = ServiceProcess(
            "dispatch-http",
            "bench.http_overhead",
            ["--serve", str(port), str(http_port), run.mesh.triton.grpc_url, str(run.models_file)],
            run.run_dir / "dispatch-http.log",
        )
        address = run.serve(process, f"127.0.0.1:{port}")
        try:
            ttft = asyncio.run(
                rounds(run.target, run.mesh.triton.grpc_url, address, http_port, args.rounds, args.warmup)
            )
        finally:
            run.stop_servers()
    machine = f"{platform.machine()}, {platform.system()} {platform.release()}, {os.cpu_count()} cpus"
    summary = summarise(ttft)
    record = {
        "command": f"python -m bench.http_overhead --rounds {args.rounds}",
        "machine": machine,
        "target": {"model": run.target.name, "triton_model": run.target.triton_model},
        "summary": summary,
        "samples": ttft,
    }
    out = DOCS / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "http_overhead.json").write_text(json.dumps(record, indent=2))
    body = report(summary, args.rounds, machine)
    if args.write_md:
        write_section("http-overhead", body)
    print(body)


if __name__ == "__main__":
    main()
