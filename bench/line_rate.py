"""A routed Ask at line rate: the mesh's own cost of a named model, the ``balanced`` and the ``quality`` profile.

Starts one mesh (Triton's replay model serving the gsm8k pool with model latency not waited, time scale
0; the classifier; fusion; ranking when the router plans ranked fan-outs; dispatch with the trained router)
and offers open-loop Poisson load at increasing rates to three lanes side by side: a named single model
(no classification, no routing), requests with the ``balanced`` profile and with the ``quality`` profile.
At each rate the three lanes run one after another, so all see the same machine. A lane stops climbing
once it saturates (completed rate under 80% of offered, or p99 over 10x its low-load p99).

Per step: client latency from the scheduled arrival (p50, p99), achieved rate, errors, and the CPU time
of every mesh process (Triton and its backend stubs, dispatch, classifier, fusion, ranking) read from
``/proc/<pid>/stat`` (utime + stime) before and after, divided by completed requests. The knee of a lane
is the highest offered rate whose p99 stays under twice the lane's lowest-rate p99 with nothing failed.
Also: classification with the embedding, one prompt at a time against the idle classifier (p50, p99).

Writes ``docs/bench/line_rate.{json,png}``. Run: ``python -m bench.line_rate`` (the classifier on the int8
ONNX encoder; ``--encoder-runtime torch`` for the service's default; ``--dispatch-env OPENBLAS_NUM_THREADS=1``
to keep OpenBLAS's worker thread in dispatch from spinning after the router's one matrix-vector product).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from apps.eval_run import MAX_TOKENS_LIMIT, REPLAY_MODEL, catalog_for, plans_ranked_fanouts, trained_router
from apps.load import arrival_times
from apps.mesh import Mesh, MeshPorts
from bench.report import DOCS
from constellation.client import DispatchClient, ask_request
from constellation.errors import ConstellationError
from constellation.net import free_port
from constellation.pools import pool_models, read_pool
from constellation.v1 import common_pb2, dispatch_pb2
from services.classifier.client import ClassifierClient

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
POOL = DATA / "gsm8k.jsonl.gz"
TICK = os.sysconf("SC_CLK_TCK")
LANES = {"single": None, "balanced": common_pb2.PROFILE_BALANCED, "quality": common_pb2.PROFILE_QUALITY}


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from ``/proc/<pid>/stat`` in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5), after pid and comm


async def idle_cpu(roots: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU milliseconds per second each mesh process spends with no request in flight (polls, health, GC)."""
    pids = mesh_pids(roots)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    await asyncio.sleep(seconds)
    rates: dict[str, float] = {}
    for name, pid in pids.items():
        root = name.split("/")[0]
        rates[root] = rates.get(root, 0.0) + (cpu_seconds(pid) - before[name]) * 1000 / seconds
    return rates


def mesh_pids(roots: dict[str, int]) -> dict[str, int]:
    """Every process of the mesh: each named root and its descendants (Triton's Python backend stubs)."""
    pids: dict[str, int] = {}
    for name, pid in roots.items():
        pids[name] = pid
        for child in psutil.Process(pid).children(recursive=True):
            pids[f"{name}/{child.pid}"] = child.pid
    return pids


@dataclass
class Step:
    """One lane at one offered rate."""

    lane: str
    offered_rate: float
    scheduled: int
    completed: int
    errors: dict[str, int]
    achieved_rate: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float
    cpu_ms_by_process: dict[str, float]
    busy_cpu_ms_per_request: float = 0.0
    """CPU per request less what the mesh burns idle over the same wall time."""


async def offer(
    client: DispatchClient, make: Callable[[int], dispatch_pb2.AskRequest], rate: float, duration_s: float, seed: int
) -> tuple[list[float], Counter[str], float]:
    """Poisson arrivals at ``rate`` for ``duration_s``; latencies (ms, from the scheduled arrival), errors, wall."""
    schedule = arrival_times(rate, duration_s, int(rate * duration_s * 3) + 10, poisson=True, seed=seed)
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def one(due: float, request: dispatch_pb2.AskRequest) -> None:
        try:
            async with aclosing(client.ask(request, timeout_s=60.0)) as events:
                async for _ in events:
                    pass
            latencies.append((time.perf_counter() - due) * 1000)
        except ConstellationError as error:
            errors[error.code.name] += 1

    start = time.perf_counter()
    tasks = []
    for i, offset in enumerate(schedule):
        due = start + offset
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due, make(i))))
    await asyncio.gather(*tasks)
    return latencies, errors, time.perf_counter() - start


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def step(
    client: DispatchClient,
    lane: str,
    make: Callable[[int], dispatch_pb2.AskRequest],
    rate: float,
    args: argparse.Namespace,
    roots: dict[str, int],
    idle: dict[str, float],
) -> Step:
    """Runs one lane at one rate and reads every mesh process's CPU time around it."""
    pids = mesh_pids(roots)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    latencies, errors, wall = await offer(client, make, rate, args.duration, seed=int(rate * 1000))
    used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    done = max(1, len(latencies))
    by_process: dict[str, float] = {}
    for name, seconds in used.items():
        root = name.split("/")[0]
        by_process[root] = by_process.get(root, 0.0) + seconds * 1000 / done
    return Step(
        lane=lane,
        offered_rate=rate,
        scheduled=len(latencies) + sum(errors.values()),
        completed=len(latencies),
        errors=dict(errors),
        achieved_rate=len(latencies) / wall,
        p50_ms=quantile(latencies, 0.5),
        p99_ms=quantile(latencies, 0.99),
        cpu_ms_per_request=sum(by_process.values()),
        cpu_ms_by_process=dict(by_process),
        busy_cpu_ms_per_request=sum(by_process.values()) - sum(idle.values()) * wall / done,
    )


def knee(steps: Sequence[Step]) -> float:
    """Highest offered rate whose p99 stays under twice the lowest-rate p99, with no errors."""
    if not steps:
        return 0.0
    base = steps[0].p99_ms
    good = [s.offered_rate for s in steps if s.p99_ms < 2 * base and not s.errors]
    return max(good, default=0.0)


def saturated(steps: Sequence[Step]) -> bool:
    last = steps[-1]
    return last.achieved_rate < 0.8 * last.offered_rate or last.p99_ms > 10 * steps[0].p99_ms or bool(last.errors)


async def classify_latency(address: str, prompts: Sequence[str], n: int) -> dict[str, float]:
    """Classification with the embedding, one prompt at a time (ms): the encoder's latency on this machine."""
    times: list[float] = []
    async with ClassifierClient(address, traced=False) as client:
        for prompt in [*prompts[:5], *prompts[:n]]:  # the first five warm the encoder and are dropped
            start = time.perf_counter()
            await client.classify(prompt, timeout_s=30.0)
            times.append((time.perf_counter() - start) * 1000)
    del times[:5]
    return {"n": len(times), "p50_ms": statistics.median(times), "p99_ms": quantile(times, 0.99)}


def build_mesh(
    run_dir: Path, router: Path, models: list[str], encoder_runtime: str, dispatch_env: dict[str, str]
) -> Mesh:
    """The eval's mesh (replay at time scale 0, classifier, router) plus fusion, with the named encoder."""
    models_file = run_dir / "models.json"
    models_file.write_text(json.dumps(catalog_for(POOL, models)))
    replay = {"pool_paths": str(POOL.resolve()), "time_scale": "0", "tokens_per_chunk": "64"}
    return Mesh(
        MeshPorts(*(free_port() for _ in range(9))),
        models=[REPLAY_MODEL],
        run_dir=run_dir,
        model_parameters={REPLAY_MODEL: replay},
        dispatch_args=[
            "--models-file", str(models_file), "--max-tokens-limit", str(MAX_TOKENS_LIMIT),
            "--router-artifact", str(router), "--classify-timeout", "30", "--no-hedging",
        ],
        classifier=True,
        ranking=plans_ranked_fanouts(router),
        fusion=True,
        dispatch_env=dispatch_env or None,
        service_env={"CONSTELLATION_CLASSIFIER_ENCODER_RUNTIME": encoder_runtime},
    )  # fmt: skip


def roots_of(mesh: Mesh) -> dict[str, int]:
    assert mesh.triton.pid is not None and mesh.dispatch.process is not None
    roots = {"triton": mesh.triton.pid, "dispatch": mesh.dispatch.process.pid}
    for process, _ in mesh.supporting:
        assert process.process is not None
        roots[process.name] = process.process.pid
    return roots


async def ladder(mesh: Mesh, prompts: list[str], single: str, args: argparse.Namespace) -> dict[str, list[Step]]:
    """Doubles the offered rate of each lane until it saturates; the three lanes alternate at each level."""
    roots = roots_of(mesh)
    steps: dict[str, list[Step]] = {lane: [] for lane in LANES}
    starts = {lane: args.start_single if lane == "single" else args.start_routed for lane in LANES}

    def maker(lane: str) -> Callable[[int], dispatch_pb2.AskRequest]:
        profile = LANES[lane]
        if profile is None:
            return lambda i: ask_request(prompts[i % len(prompts)], model=single)
        return lambda i: ask_request(prompts[i % len(prompts)], profile=profile)

    async with DispatchClient(mesh.dispatch_address, traced=False) as client:
        for lane in LANES:  # warm every path (connections, encoder, first plans) outside the measurement
            await offer(client, maker(lane), 5.0, 2.0, seed=7)
        await asyncio.sleep(1.0)
        idle = await idle_cpu(roots, args.idle_s)
        print(f"idle mesh CPU, ms per second: {idle}", flush=True)
        for level in range(args.steps):
            for lane in LANES:
                if steps[lane] and saturated(steps[lane]):
                    continue
                rate = starts[lane] * 2**level
                result = await step(client, lane, maker(lane), rate, args, roots, idle)
                steps[lane].append(result)
                print(
                    f"{lane:9s} {rate:7.1f}/s offered {result.achieved_rate:7.1f}/s done  p50 {result.p50_ms:7.1f} ms"
                    f"  p99 {result.p99_ms:7.1f} ms  cpu {result.cpu_ms_per_request:6.2f} ms/req"
                    f" (busy {result.busy_cpu_ms_per_request:6.2f})  {result.errors or ''}",
                    flush=True,
                )
    return steps


def plot(steps: dict[str, list[Step]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for lane, rows in steps.items():
        rates = [s.offered_rate for s in rows]
        left.plot(rates, [s.p99_ms for s in rows], marker="o", label=f"{lane} (knee {knee(rows):g}/s)")
        right.plot(rates, [s.cpu_ms_per_request for s in rows], marker="o", label=lane)
    left.set(xscale="log", yscale="log", xlabel="offered rate (requests/s)", ylabel="p99 latency (ms)")
    right.set(xscale="log", xlabel="offered rate (requests/s)", ylabel="mesh CPU per request (ms)")
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(steps: dict[str, list[Step]]) -> dict[str, dict[str, Any]]:
    """Per lane: the knee, and the CPU per request at the lowest rate and at the knee."""
    out: dict[str, dict[str, Any]] = {}
    for lane, rows in steps.items():
        at_knee = [s for s in rows if s.offered_rate == knee(rows)] or rows[:1]
        out[lane] = {
            "knee_rate_per_s": knee(rows),
            "max_achieved_rate_per_s": max(s.achieved_rate for s in rows),
            "cpu_ms_per_request_low_rate": rows[0].cpu_ms_per_request,
            "cpu_ms_per_request_at_knee": at_knee[0].cpu_ms_per_request,
            "busy_cpu_ms_per_request_at_knee": at_knee[0].busy_cpu_ms_per_request,
            "cpu_ms_by_process_at_knee": at_knee[0].cpu_ms_by_process,
            "p99_ms_low_rate": rows[0].p99_ms,
        }
    single = out["single"]["knee_rate_per_s"] or 1.0
    for lane in out:
        out[lane]["knee_vs_single"] = out[lane]["knee_rate_per_s"] / single
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of arrivals per step (default 6)")
    parser.add_argument("--steps", type=int, default=7, help="rate doublings per lane (default 7)")
    parser.add_argument("--start-single", type=float, default=10.0, help="lowest rate of the named model")
    parser.add_argument("--start-routed", type=float, default=4.0, help="lowest rate of the profiles")
    parser.add_argument("--idle-s", type=float, default=5.0, help="seconds of idle CPU measured (default 5)")
    parser.add_argument("--classify-n", type=int, default=100, help="prompts for the classification latency")
    parser.add_argument(
        "--encoder-runtime", default="onnx-int8", choices=["onnx-int8", "onnx", "torch"], help="the classifier's"
    )
    parser.add_argument(
        "--dispatch-env", action="append", default=[], metavar="KEY=VALUE", help="extra environment of dispatch"
    )
    parser.add_argument("--out", type=Path, default=DOCS / "bench" / "line_rate")
    args = parser.parse_args(argv)
    router = trained_router(None)
    if router is None or not POOL.is_file():
        raise SystemExit(f"needs a trained router (`constellation train router`) and the recorded pool {POOL}")
    prompts = [r.prompt for r in read_pool(POOL, split="test")]
    models = pool_models(POOL)
    single = sorted(models)[0]
    dispatch_env = dict(item.split("=", 1) for item in args.dispatch_env)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="constellation-line-rate-") as tmp:
        mesh = build_mesh(Path(tmp), router, models, args.encoder_runtime, dispatch_env)
        try:
            mesh.start()
            assert mesh.classifier is not None
            classify = asyncio.run(classify_latency(f"127.0.0.1:{mesh.ports.classifier}", prompts, args.classify_n))
            print(f"classification with the embedding: {classify}", flush=True)
            steps = asyncio.run(ladder(mesh, prompts, single, args))
        finally:
            mesh.stop()
    report = {
        "command": "python -m bench.line_rate " + " ".join(argv if argv is not None else sys.argv[1:]),
        "encoder_runtime": args.encoder_runtime,
        "dispatch_env": dispatch_env,
        "single_model": single,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "random_seed_note": "Poisson arrivals seeded by the rate",
        "classification_with_embedding": classify,
        "summary": summary(steps),
        "steps": {lane: [asdict(s) for s in rows] for lane, rows in steps.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    title = f"line rate, encoder {args.encoder_runtime}, load avg {load_before[0]:.1f} on {os.cpu_count()} cpus"
    plot(steps, args.out.with_suffix(".png"), title)
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
