"""Tail latency under open-loop load, explained from collected traces; and what tracing itself costs.

1. Starts the trace collector (OTLP/gRPC, SQLite) and a mesh: Triton's replay model serving the gsm8k
   pool with its simulated heavy-tailed latency really waited (time scale 1), the classifier, the
   fusion service, and two dispatch processes on the same Triton: one exporting traces to the
   collector, one with the OpenTelemetry SDK disabled (``OTEL_SDK_DISABLED=true``).
2. Tracing overhead, side by side: the same closed-loop sequence of requests alternates between the
   two dispatch processes; each process's CPU time (psutil) per request and the client latency are
   compared (tracing on / off).
3. Tail latency: ``constellation load``'s open-loop Poisson arrivals at ``--rate`` against the traced
   dispatch, routed by the trained router's ``quality`` profile (fan-outs); after the run,
   ``constellation traces analyze`` on the collected spans gives the p99 and which member and phase
   set it.

Writes ``docs/bench/tail_latency.{md,json}``, the plots, and the "tail-latency" section of
``docs/BENCHMARKS.md``. Run: ``make bench`` or ``python -m bench.tail_latency --rate 20 --duration 30``.
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
from pathlib import Path

import psutil

from apps.eval_run import trained_router
from apps.load import run_load
from apps.mesh import Mesh, MeshPorts, ServiceProcess, wait_serving
from apps.traces.analyze import analyze, markdown, plot, write_json
from apps.traces.collector import CollectorConfig, running_collector
from bench.report import DOCS, markdown_table, write_section
from constellation.client import DispatchClient, ask_request
from constellation.config import load_config
from constellation.net import free_port
from constellation.pools import pool_models, read_pool

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
POOL = DATA / "gsm8k.jsonl.gz"


def catalog(models: list[str]) -> dict[str, dict[str, object]]:
    return {m: {"triton_model": "replay", "parameters": {"recorded_model": m}} for m in models}


async def overhead(
    on: str, off: str, pids: dict[str, int], shared: dict[str, int], prompts: list[str], n: int, concurrency: int = 16
) -> dict:
    """The same ``n`` routed requests to the traced and to the untraced dispatch, both at once,
    ``concurrency`` in flight per side; each dispatch's CPU time (psutil) per request, the client
    latency, and the CPU of the services both sides share (Triton, classifier, fusion) per request."""
    work = [prompts[i % len(prompts)] for i in range(n)]
    procs = {name: psutil.Process(pid) for name, pid in {**pids, **shared}.items()}
    latency: dict[str, list[float]] = {name: [] for name in pids}

    async def side(name: str, address: str) -> None:
        limit = asyncio.Semaphore(concurrency)
        async with DispatchClient(address, traced=False) as client:

            async def one(prompt: str) -> None:
                async with limit:
                    start = time.perf_counter()
                    async for _ in client.ask(ask_request(prompt), timeout_s=120):
                        pass
                    latency[name].append((time.perf_counter() - start) * 1000)

            await asyncio.gather(*(one(p) for p in work))

    before = {name: sum(proc.cpu_times()[:2]) for name, proc in procs.items()}
    await asyncio.gather(side("on", on), side("off", off))
    cpu = {name: sum(proc.cpu_times()[:2]) - before[name] for name, proc in procs.items()}
    result: dict[str, object] = {
        name: {"cpu_ms_per_request": cpu[name] * 1000 / n, "latency_p50_ms": statistics.median(latency[name])}
        for name in pids
    }
    result["shared_cpu_ms_per_request"] = {name: cpu[name] * 1000 / (2 * n) for name in shared}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=8.0, help="offered requests per second (default 8)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals (default 30)")
    parser.add_argument("--overhead-requests", type=int, default=200, help="requests per side for the overhead")
    parser.add_argument("--time-scale", type=float, default=1.0, help="fraction of simulated latency waited")
    args = parser.parse_args(argv)
    if not POOL.is_file():
        raise SystemExit(f"needs the recorded pool {POOL}")
    prompts = [r.prompt for r in read_pool(POOL, split="test")]
    models = pool_models(POOL)  # the catalog: every recorded gsm8k model, served by the replay model
    out = DOCS / "bench"
    out.mkdir(parents=True, exist_ok=True)

    router = trained_router(None)
    if router is None:
        print("no trained router: requests go to the untrained router (run `constellation train router` first)")
    with tempfile.TemporaryDirectory(prefix="constellation-tail-") as tmp:
        run_dir = Path(tmp)
        models_file = run_dir / "models.json"
        models_file.write_text(json.dumps(catalog(models)))
        db = run_dir / "traces.sqlite"

        async def run() -> tuple[dict, dict, object, int]:
            config = load_config(CollectorConfig, None, port=0, http_port=-1, db=str(db), shutdown_grace_s=1.0)
            async with running_collector(config) as collector:
                ports = MeshPorts(*(free_port() for _ in range(9)))
                routing_args = ["--models-file", str(models_file), "--default-profile", "quality"]
                routing_args += ["--classify-timeout", "2", *(["--router-artifact", str(router)] if router else [])]
                mesh = Mesh(
                    ports,
                    models=["replay"],
                    run_dir=run_dir,
                    model_parameters={
                        "replay": {
                            "pool_paths": str(POOL),
                            "time_scale": str(args.time_scale),
                            "tokens_per_chunk": "16",
                        }
                    },
                    dispatch_args=routing_args,
                    dispatch_env={
                        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.grpc_port}",
                        "OTEL_SERVICE_NAME": "dispatch",
                    },
                    classifier=True,
                    fusion=True,
                    service_env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.grpc_port}"},
                )
                untraced_port = free_port()
                untraced = ServiceProcess(
                    "dispatch-untraced",
                    "services.dispatch.main",
                    ["--port", str(untraced_port), "--triton-url", f"127.0.0.1:{ports.triton_grpc}",
                     "--metrics-port", "-1", *routing_args,
                     "--classifier-url", f"127.0.0.1:{ports.classifier}",
                     "--fusion-url", f"127.0.0.1:{ports.fusion}"],
                    run_dir / "dispatch-untraced.log",
                    env={"OTEL_SDK_DISABLED": "true"},
                )  # fmt: skip
                try:
                    await asyncio.to_thread(mesh.start)
                    untraced.start()
                    await asyncio.to_thread(wait_serving, f"127.0.0.1:{untraced_port}", 60.0)
                    assert mesh.dispatch.process is not None and untraced.process is not None
                    assert mesh.triton.pid is not None
                    shared: dict[str, int] = {"triton": mesh.triton.pid}
                    for process, _ in mesh.supporting:
                        assert process.process is not None
                        shared[process.name] = process.process.pid
                    cost = await overhead(
                        mesh.dispatch_address,
                        f"127.0.0.1:{untraced_port}",
                        {"on": mesh.dispatch.process.pid, "off": untraced.process.pid},
                        shared,
                        prompts,
                        args.overhead_requests,
                    )
                    load_started_ns = time.time_ns()
                    load = await run_load(
                        mesh.dispatch_address,
                        prompts,
                        rate=args.rate,
                        duration_s=args.duration,
                        max_requests=int(args.rate * args.duration * 2),
                        timeout_s=60.0,
                    )
                finally:
                    untraced.stop()
                    await asyncio.to_thread(mesh.stop)  # dispatch flushes its last spans on SIGTERM
                await asyncio.sleep(0.5)
            return cost, load.summary(), load, load_started_ns

        cost, load_summary, load, load_started_ns = asyncio.run(run())
        from apps.traces.store import SpanStore

        store = SpanStore.open(db)
        # Only the load phase: the overhead phase's requests went through the traced dispatch too.
        analysis = analyze((s for s in store.spans() if s.start_ns >= load_started_ns), percentile=99.0)
        store.close()
    paths = plot(analysis, out, prefix="tail_latency")
    report = markdown(analysis, plots={k: f"bench/{p.name}" for k, p in paths.items()})
    (out / "tail_latency.md").write_text(report)
    write_json(analysis, out / "tail_latency.json")
    load.write(out / "tail_latency_load.json")  # type: ignore[attr-defined]

    on, off = cost["on"], cost["off"]
    ratio = on["cpu_ms_per_request"] / off["cpu_ms_per_request"] - 1
    shared_ms = sum(cost["shared_cpu_ms_per_request"].values())
    mesh_ratio = (on["cpu_ms_per_request"] - off["cpu_ms_per_request"]) / (off["cpu_ms_per_request"] + shared_ms)
    overhead_table = markdown_table(
        ["dispatch", "CPU ms per request", "client latency p50 ms"],
        [
            [label, f"{side['cpu_ms_per_request']:.3f}", f"{side['latency_p50_ms']:.1f}"]
            for label, side in (
                ("tracing on (OTLP export to the collector)", on),
                ("tracing off (OTEL_SDK_DISABLED=true)", off),
            )
        ],
    )  # fmt: skip
    t = load_summary["total_ms"]
    body = f"""## Tail latency under open-loop load, explained by traces

Command: `make bench` (runs `python -m bench.tail_latency --rate {args.rate:g} --duration {args.duration:g}`).
Mesh: Triton's replay model serving the gsm8k pool (41 recorded models) with its **simulated** latency
really waited (time scale {args.time_scale:g}: size-class time to first token and per-token time, seeded
log-normal tail); the classifier, the trained router and the fusion service run too, and dispatch, the
classifier and fusion export OTLP to `constellation traces collect`. Load: `constellation load`, Poisson
arrivals at {args.rate:g} requests/s for {args.duration:g} s, gsm8k test prompts with no model named: each
request is classified, planned by the `quality` profile (a cascade for numbers: cheap models first,
the strongest three if they disagree), fanned out, and voted by the fusion service. Machine:
{platform.machine()}, {os.cpu_count()} cpus.

Load: {load_summary["scheduled"]} requests offered, {load_summary["completed"]} completed, errors
{load_summary["errors"] or "none"}; end-to-end at the client from the scheduled arrival: p50
{t.get("p50", float("nan")):.0f} ms, p99 {t.get("p99", float("nan")):.0f} ms, max {t.get("max", float("nan")):.0f} ms.

From the collected traces (`constellation traces analyze`):

{report}

### What tracing costs

Same run, the same {args.overhead_requests} routed requests (classify, plan, fan-out, fusion) sent to each
of two dispatch processes sharing one Triton, classifier and fusion service, at once (16 in flight per side),
one dispatch tracing and one with the SDK disabled; CPU time of each process from the OS. Dispatch's
tracing adds **{ratio * 100:+.1f}%** to dispatch's own CPU time per request, and
**{mesh_ratio * 100:+.1f}%** to the mesh's CPU time per request (dispatch plus its share of Triton,
classifier and fusion: {shared_ms:.1f} ms per request; those services trace on both sides, so their own
tracing cost is not in this difference). Target: under 5% of mesh CPU time.

{overhead_table}
"""
    write_section("tail-latency", body)
    print(body)


if __name__ == "__main__":
    main()
