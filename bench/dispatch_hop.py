"""The floor of one hop: a bare unary ``Plan`` round trip to dispatch, no model, no classifier.

Dispatch runs in its own process on loopback (as in the mesh); the client sends ``--calls``
sequential ``Plan`` calls after a warm-up and reports p50/p95/p99. This is the cost of one Python
gRPC aio hop with dispatch's validation, interceptors and tracing, the part of the mesh's
time-to-first-token overhead that no model work can hide.

Run: ``make bench`` or ``python -m bench.dispatch_hop --calls 1000``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

from bench.report import markdown_table, percentiles, write_section
from constellation.client import DispatchClient, ask_request
from constellation.mesh import ServiceProcess, wait_serving
from services.inference.launcher import free_port


async def measure(address: str, calls: int) -> list[float]:
    request = ask_request("What is the capital of France?")
    async with DispatchClient(address, traced=False) as client:
        for _ in range(100):
            await client.plan(request)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            await client.plan(request)
            times.append((time.perf_counter() - start) * 1000)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args(argv)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="constellation-hop-") as tmp:
        dispatch = ServiceProcess(
            "dispatch",
            "services.dispatch.main",
            ["--port", str(port), "--triton-url", f"127.0.0.1:{free_port()}", "--metrics-port", "-1"],
            Path(tmp) / "dispatch.log",
        )
        dispatch.start()
        try:
            wait_serving(f"127.0.0.1:{port}", 60.0, alive=dispatch.alive)
            times = asyncio.run(measure(f"127.0.0.1:{port}", args.calls))
        finally:
            dispatch.stop()
    stats = percentiles(times)
    table = markdown_table(["calls", "p50 ms", "p95 ms", "p99 ms"], [[args.calls, *(f"{stats[p]:.3f}" for p in stats)]])
    body = f"""## The floor of one hop: a bare `Plan` round trip

Command: `make bench` (runs `python -m bench.dispatch_hop --calls {args.calls}`). {args.calls} sequential unary
`DispatchService/Plan` calls (after 100 warm-up calls) from a client process to dispatch in its own
process on loopback, with dispatch's validation, interceptors and tracing and no model or classifier
behind it. Machine: {platform.machine()}, {os.cpu_count()} cpus.

{table}

This is most of the 1.5 ms budget the mesh has for its time-to-first-token overhead.
"""
    write_section("dispatch-hop", body)
    print(table)


if __name__ == "__main__":
    main()
