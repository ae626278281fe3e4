"""The floor of one hop: a bare unary ``Plan`` round trip to dispatch, beside a bare gRPC echo.

Dispatch runs in its own process on loopback (as in the mesh), and so does a bare gRPC aio echo server
(:mod:`bench.grpc_echo`: no interceptors, no validation, no tracing). After a warm-up, ``--calls``
rounds each send one call of each kind, in rotating order:

* ``Plan`` to dispatch from an asyncio client: one hop with dispatch's validation, interceptors and
  tracing, the part of the mesh's time-to-first-token overhead that no model work can hide;
* the echo from an asyncio client: what one Python gRPC aio hop costs with no service code at all;
* the echo from a synchronous (thread-blocking) client: the transport without an event loop on the
  calling side.

Run: ``make bench`` or ``python -m bench.dispatch_hop --calls 1000``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from apps.mesh import ServiceProcess, wait_serving
from bench import grpc_echo
from bench.report import markdown_table, percentiles, write_section
from constellation.client import DispatchClient, ask_request
from constellation.net import free_port

KINDS = {
    "plan": "`Plan` to dispatch, asyncio client",
    "echo_aio": "bare echo, asyncio client",
    "echo_sync": "bare echo, synchronous client",
}


async def measure(dispatch: str, echo: str, calls: int, warmup: int = 100) -> dict[str, list[float]]:
    """``calls`` rounds of one call of each kind (order rotating); milliseconds per call."""
    request = ask_request("What is the capital of France?")
    payload = request.SerializeToString()
    sync_channel = grpc.insecure_channel(echo)
    echo_sync: Any = grpc_echo.stub(sync_channel)
    async with DispatchClient(dispatch, traced=False) as client, grpc.aio.insecure_channel(echo) as aio_channel:
        echo_aio: Any = grpc_echo.stub(aio_channel)

        async def plan() -> None:
            await client.plan(request)

        async def bare_aio() -> None:
            await echo_aio(payload, timeout=10)

        async def bare_sync() -> None:
            echo_sync(payload, timeout=10)

        calls_by_kind: dict[str, Callable[[], Any]] = {"plan": plan, "echo_aio": bare_aio, "echo_sync": bare_sync}
        for _ in range(warmup):
            for call in calls_by_kind.values():
                await call()
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        kinds = list(KINDS)
        for i in range(calls):
            for kind in kinds[i % 3 :] + kinds[: i % 3]:
                start = time.perf_counter()
                await calls_by_kind[kind]()
                times[kind].append((time.perf_counter() - start) * 1000)
    sync_channel.close()
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000, help="rounds (one call of each kind per round)")
    args = parser.parse_args(argv)
    port, echo_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="constellation-hop-") as tmp:
        dispatch = ServiceProcess(
            "dispatch",
            "services.dispatch.main",
            ["--port", str(port), "--triton-url", f"127.0.0.1:{free_port()}", "--metrics-port", "-1"],
            Path(tmp) / "dispatch.log",
        )
        echo = ServiceProcess("echo", "bench.grpc_echo", [str(echo_port)], Path(tmp) / "echo.log")
        dispatch.start()
        echo.start()
        try:
            wait_serving(f"127.0.0.1:{port}", 60.0, alive=dispatch.alive)
            wait_echo(f"127.0.0.1:{echo_port}", echo)
            times = asyncio.run(measure(f"127.0.0.1:{port}", f"127.0.0.1:{echo_port}", args.calls))
        finally:
            dispatch.stop()
            echo.stop()
    rows = []
    for kind, label in KINDS.items():
        stats = percentiles(times[kind])
        rows.append([label, args.calls, *(f"{stats[p]:.3f}" for p in ("p50", "p95", "p99"))])
    table = markdown_table(["call", "calls", "p50 ms", "p95 ms", "p99 ms"], rows)
    p50 = {kind: percentiles(values)["p50"] for kind, values in times.items()}
    body = f"""## The floor of one hop: a bare `Plan` round trip beside a bare gRPC echo

Command: `make bench` (runs `python -m bench.dispatch_hop --calls {args.calls}`). {args.calls} rounds (after 100
warm-up rounds), each with one call of each kind in rotating order, from one client process on
loopback: unary `DispatchService/Plan` to dispatch in its own process (dispatch's validation,
interceptors and tracing; no model or classifier behind it), and the same bytes to a bare gRPC aio echo
server in its own process (`bench/grpc_echo.py`: no service code at all), once from an asyncio client
and once from a synchronous one. Machine: {platform.machine()}, {os.cpu_count()} cpus.

{table}

Dispatch's `Plan` costs {p50["plan"] - p50["echo_aio"]:+.3f} ms at p50 over the bare echo from the same asyncio
client: its interceptors (tracing, metrics), validation and planning. A synchronous client reaches the
echo server {p50["echo_aio"] - p50["echo_sync"]:+.3f} ms faster than an asyncio one. Going through the mesh
adds at least one such hop to time to first token (the client's call to dispatch; dispatch's own call
to Triton replaces the client's direct one), so the mesh's overhead is at least the bare asyncio echo
({p50["echo_aio"]:.3f} ms here) plus dispatch's own work, against a 1.5 ms target.
"""
    write_section("dispatch-hop", body)
    print(table)


def wait_echo(address: str, process: ServiceProcess, timeout_s: float = 30.0) -> None:
    """Waits until the echo server answers (it has no health service)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        call: Any = grpc_echo.stub(channel)
        while True:
            try:
                call(b"ping", timeout=1)
                return
            except grpc.RpcError:
                if not process.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"echo server did not start:\n{process.log_tail()}") from None
                time.sleep(0.1)


if __name__ == "__main__":
    main()
