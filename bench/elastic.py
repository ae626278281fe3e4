"""Elastic capacity through the full routed mesh: static peak sizing vs mean sizing vs the autoscaler.

``python -m bench.elastic`` (in ``make bench``) starts, per scenario, a fresh mesh (Triton with the replay
model over a recorded pool, registry, dispatch with routing, and for the autoscaler the scaler service
pointed at Triton's model control) and drives one bursty open-loop trace through dispatch's ``Ask``:
idle at the base rate, a ramp, a burst of ten times the base rate, idle again (compressed to minutes).
Arrivals are scheduled in advance and sent at their times whatever the mesh does (no coordinated omission).

Scenarios, side by side on the same trace:
  (a) ``peak``: replicas sized for the burst, all the time;
  (b) ``mean``: replicas sized for the mean rate, all the time;
  (c) ``autoscaler``: the scaler (Little's law over a window, warm floor of one, cooldowns, hysteresis).

A *replica* is one Triton instance of the replay model that serves at most ``concurrency`` requests at once
and queues the rest, so latency grows with load; loading instances takes a SIMULATED load time. Replicas are
sampled from Triton every half second; replica-seconds per answered query is the GPU-cost proxy. In the
middle of the autoscaler's burst one replica is taken away behind the scaler's back: the recovery time is from
then until Triton reports as many replicas again (a static deployment has nothing that would restore it, so the
static scenarios are left whole).

All model latency is SIMULATED (replay model, scaled by ``--time-scale``); the mesh, the queueing, the
loads and the scaling are real. Writes ``docs/bench/elastic.json`` and ``docs/bench/elastic.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from apps.mesh import Mesh, MeshPorts
from constellation.client import DispatchClient, ask_request
from constellation.errors import ConstellationError
from constellation.net import free_port
from constellation.pools import model_cards_for, read_pool
from constellation.v1 import common_pb2, registry_pb2
from services.registry.client import RegistryClient
from services.scaler.actuators import TritonActuator

REPLAY = "replay"
DEFAULT_POOL = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k.jsonl.gz"
MODELS = ("Meta-Llama-3.1-8B-Instruct", "Meta-Llama-3-8B-Instruct", "Meta-Llama-3.1-70B-Instruct")
OUT = Path("docs/bench")


@dataclass(frozen=True)
class Phase:
    """A stretch of the trace: the arrival rate goes linearly from ``start_rate`` to ``end_rate`` (req/s)."""

    name: str
    seconds: float
    start_rate: float
    end_rate: float


def phases(base_rate: float, scale: float) -> list[Phase]:
    """Idle, ramp, a burst of 10x base, idle; each stretch ``scale`` times its nominal length."""
    return [
        Phase("idle", 20 * scale, base_rate, base_rate),
        Phase("ramp", 30 * scale, base_rate, 10 * base_rate),
        Phase("burst", 30 * scale, 10 * base_rate, 10 * base_rate),
        Phase("idle2", 40 * scale, base_rate, base_rate),
    ]


def arrivals(trace: list[Phase], seed: int) -> list[tuple[float, str]]:
    """Poisson arrival times (seconds from the start) with the phases' piecewise-linear rate, by thinning."""
    rng = random.Random(seed)
    peak = max(max(p.start_rate, p.end_rate) for p in trace)
    out: list[tuple[float, str]] = []
    start = 0.0
    for phase in trace:
        t = start
        while True:
            t += rng.expovariate(peak)
            if t >= start + phase.seconds:
                break
            rate = phase.start_rate + (phase.end_rate - phase.start_rate) * (t - start) / phase.seconds
            if rng.random() < rate / peak:
                out.append((t, phase.name))
        start += phase.seconds
    return out


@dataclass
class Call:
    """One Ask of the trace."""

    sent_at: float
    phase: str
    ttft_ms: float | None = None
    ok: bool = False
    cost_usd: float = 0.0
    error: str = ""


@dataclass
class Scenario:
    """One run of the trace."""

    name: str
    static_replicas: int | None
    calls: list[Call] = field(default_factory=list)
    replicas: list[tuple[float, int]] = field(default_factory=list)
    kill_at: float | None = None
    recovered_at: float | None = None
    scaler: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    triton_exit: int | None = None


async def ask(client: DispatchClient, prompt: str, call: Call, started: float, timeout_s: float) -> None:
    """One Ask; fills ``call`` with its time to first token (from its scheduled send time) and outcome."""
    try:
        request = ask_request(prompt, max_tokens=256)
        async with aclosing(client.ask(request, timeout_s=timeout_s)) as events:
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "delta" and call.ttft_ms is None:
                    call.ttft_ms = (time.perf_counter() - started - call.sent_at) * 1000
                elif kind == "final":
                    call.ok = event.final.status.code == 0 if event.final.HasField("status") else True
                    call.cost_usd = event.final.usage.cost_usd
    except ConstellationError as error:
        call.error = f"{type(error).__name__}: {error.message}"


async def sample_replicas(actuator: TritonActuator, scenario: Scenario, started: float, stop: asyncio.Event) -> None:
    """Triton's instances of the replay model every half second (0 while it is unloaded or reloading)."""
    while not stop.is_set():
        try:
            count = await actuator.replicas(REPLAY)
        except ConstellationError:
            count = 0
        scenario.replicas.append((time.perf_counter() - started, count))
        await asyncio.sleep(0.5)


async def remove_one_replica(actuator: TritonActuator, scenario: Scenario, at_s: float, started: float) -> None:
    """At ``at_s`` into the trace, takes one replica away behind the scaler's back (Triton reloads the model
    with one instance less; the old instances serve until then), then notes when the replicas Triton reports
    are back where they were: never for a static deployment, the scaler's next rounds for the autoscaler.

    (A SIGKILL of one instance's process would be the truer fault, but it leaves the Python backend's
    decoupled streams hanging here, which measures Triton rather than the scaler.)
    """
    await asyncio.sleep(max(0.0, at_s - (time.perf_counter() - started)))
    before = await actuator.replicas(REPLAY)
    if before < 2:
        return
    scenario.kill_at = time.perf_counter() - started
    try:
        await actuator.scale(REPLAY, before - 1)
    except ConstellationError as error:
        scenario.failures.append(f"removing a replica failed: {error}")
        return
    while time.perf_counter() - started < scenario.kill_at + 60:
        await asyncio.sleep(0.25)
        try:
            now = await actuator.replicas(REPLAY)
        except ConstellationError:
            continue
        if now >= before:
            scenario.recovered_at = time.perf_counter() - started
            return


def recovery(scenario: Scenario) -> float | None:
    """Seconds from the replica's removal until Triton had as many replicas again (None: never, or no removal)."""
    if scenario.kill_at is None or scenario.recovered_at is None:
        return None
    return scenario.recovered_at - scenario.kill_at


async def drive(
    mesh: Mesh, scenario: Scenario, trace: list[tuple[float, str]], prompts: list[str], args: argparse.Namespace
) -> None:
    """Sends the trace through dispatch while sampling replicas; kills a replica mid-burst."""
    actuator = TritonActuator(mesh.triton.grpc_url, model_repository=mesh.triton.served_model_repository)
    try:
        if scenario.static_replicas is not None:
            await actuator.scale(REPLAY, scenario.static_replicas)
        stop = asyncio.Event()
        started = time.perf_counter()
        burst_mid = sum(p.seconds for p in phases(args.base_rate, args.scale)[:2]) + 15 * args.scale
        sampler = asyncio.create_task(sample_replicas(actuator, scenario, started, stop))
        killer = asyncio.create_task(
            remove_one_replica(actuator, scenario, burst_mid, started)
            if scenario.static_replicas is None and args.remove_replica
            else asyncio.sleep(0)
        )
        async with DispatchClient(mesh.dispatch_address, traced=False) as client:
            tasks = []
            for i, (at, phase) in enumerate(trace):
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - started)))
                call = Call(at, phase)
                scenario.calls.append(call)
                tasks.append(asyncio.create_task(ask(client, prompts[i % len(prompts)], call, started, args.timeout)))
            await asyncio.gather(*tasks)
        await killer
        stop.set()
        await sampler
    finally:
        await actuator.close()


def mesh_for(run_dir: Path, pool: Path, autoscaler: bool, args: argparse.Namespace) -> Mesh:
    """Triton (replay over ``pool``), registry, dispatch with routing, and the scaler for the autoscaler."""
    catalog = {
        m: {"triton_model": REPLAY, "parameters": {"recorded_model": m}, "params_b": 8.0 if "8B" in m else 70.0}
        for m in MODELS
    }
    models_file = run_dir / "models.json"
    models_file.write_text(json.dumps(catalog))
    scaler_config = run_dir / "constellation.toml"
    scaler_config.write_text(
        "[scaler]\n"
        f"interval_s = {args.interval}\n"
        "[scaler.tiers.default]\n"
        f"concurrency = {args.concurrency}\nmin_replicas = 1\nmax_replicas = {args.peak_replicas}\n"
        f"window_s = {10 * args.scale:g}\nup_cooldown_s = {2 * args.scale:g}\n"
        f"down_cooldown_s = {10 * args.scale:g}\ndown_stabilization_s = {10 * args.scale:g}\n"
        f"hysteresis = 0.1\ndefault_latency_s = {args.service_s}\n"
    )
    ports = MeshPorts(*(free_port() for _ in range(9)))
    ports.scaler = free_port()
    load_s = {"small": args.load_s, "medium": args.load_s, "large": args.load_s, "xl": args.load_s}
    return Mesh(
        ports,
        models=[REPLAY],
        run_dir=run_dir,
        say=lambda line: None,
        model_parameters={
            REPLAY: {
                "pool_paths": str(pool.resolve()),
                "time_scale": str(args.time_scale),
                "max_concurrency": str(args.concurrency),
                "load_time_s": json.dumps(load_s),
                "load_time_scale": "1",
                "latency_profile": json.dumps({"ttft_sigma": 0.2, "per_token_sigma": 0.1}),
            }
        },
        dispatch_args=["--models-file", str(models_file), "--no-hedging", "--max-tokens-limit", "4096"],
        registry=True,
        registry_args=["--no-probes", "--db", str(run_dir / "registry.sqlite")],
        scaler=autoscaler,
        scaler_args=["--config", str(scaler_config)],
    )


async def register_pool(mesh: Mesh) -> None:
    """The pool models in the registry, each served by the replay model (what dispatch routes over)."""
    async with RegistryClient(f"127.0.0.1:{mesh.ports.registry}") as registry:
        for model in MODELS:
            backend = common_pb2.Backend(
                endpoint=mesh.triton.grpc_url, model_name=REPLAY, parameters={"recorded_model": model}
            )
            await registry.register(registry_pb2.ModelRecord(name=model, backend=backend, simulated=True))


def run_scenario(
    scenario: Scenario, pool: Path, trace: list[tuple[float, str]], prompts: list[str], args: argparse.Namespace
) -> None:
    with tempfile.TemporaryDirectory(prefix=f"constellation-elastic-{scenario.name}-") as tmp:
        mesh = mesh_for(Path(tmp), pool, scenario.static_replicas is None, args)
        try:
            mesh.start()
            asyncio.run(register_pool(mesh))
            asyncio.run(drive(mesh, scenario, trace, prompts, args))
        except (ConstellationError, RuntimeError, TimeoutError) as error:
            scenario.failures.append(f"{type(error).__name__}: {error}")
        finally:
            if mesh.scaler is not None:
                scenario.scaler = scaler_counts(Path(tmp) / "scaler.log")
            crash = [line for line in mesh.triton.log_tail().splitlines() if "Signal (" in line or "malloc" in line]
            scenario.failures += [f"triton: {line.strip()}" for line in crash]
            mesh.stop()
            scenario.triton_exit = mesh.triton.returncode


def scaler_counts(log: Path) -> dict[str, Any]:
    """Scale events and cold starts, from the scaler's log lines."""
    text = log.read_text(errors="replace") if log.exists() else ""
    events = [line.split("scaler: ", 1)[1] for line in text.splitlines() if " scaler: replay scale" in line]
    return {"scale_events": len(events), "cold_starts": text.count("is at zero and a request waits"), "events": events}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def replica_seconds(samples: list[tuple[float, int]]) -> float:
    """The area under the replicas-over-time step function (each sample holds until the next)."""
    return sum(count * (samples[i + 1][0] - at) for i, (at, count) in enumerate(samples[:-1]))


def summary(scenario: Scenario, phase_names: list[str]) -> dict[str, Any]:
    answered = [c for c in scenario.calls if c.ok]
    rs = replica_seconds(scenario.replicas)
    per_phase = {}
    for name in phase_names:
        ttfts = [c.ttft_ms for c in answered if c.phase == name and c.ttft_ms is not None]
        per_phase[name] = {"n": len(ttfts), "ttft_p50_ms": percentile(ttfts, 50), "ttft_p99_ms": percentile(ttfts, 99)}
    all_ttft = [c.ttft_ms for c in answered if c.ttft_ms is not None]
    return {
        "scenario": scenario.name,
        "static_replicas": scenario.static_replicas,
        "requests": len(scenario.calls),
        "answered": len(answered),
        "lost": len(scenario.calls) - len(answered),
        "errors": sorted({c.error for c in scenario.calls if c.error})[:5],
        "replica_seconds": rs,
        "replica_seconds_per_query": rs / max(1, len(answered)),
        "cost_per_query_usd": sum(c.cost_usd for c in answered) / max(1, len(answered)),
        "ttft_p50_ms": percentile(all_ttft, 50),
        "ttft_p99_ms": percentile(all_ttft, 99),
        "phases": per_phase,
        "kill_at_s": scenario.kill_at,
        "recovery_s": recovery(scenario),
        "scale_events": scenario.scaler.get("scale_events", 0),
        "cold_starts": scenario.scaler.get("cold_starts", 0),
        "scaler_events": scenario.scaler.get("events", []),
        "failures": scenario.failures,
        "triton_exit": scenario.triton_exit,
        "replicas_over_time": scenario.replicas,
    }


def table(results: list[dict[str, Any]], phase_names: list[str]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    head = "| scenario | answered/sent | lost | replica-s/query | cost/query $ | TTFT p50/p99 ms | "
    head += " | ".join(f"{p} p50/p99" for p in phase_names) + " | scale events | cold starts | recovery s |"
    lines = [head, "|" + "---|" * (9 + len(phase_names))]
    for r in results:
        phases_cells = " | ".join(
            f"{ms(r['phases'][p]['ttft_p50_ms'])}/{ms(r['phases'][p]['ttft_p99_ms'])}" for p in phase_names
        )
        recovered = "-" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}"
        lines.append(
            f"| {r['scenario']} | {r['answered']}/{r['requests']} | {r['lost']} | "
            f"{r['replica_seconds_per_query']:.2f} | "
            f"{r['cost_per_query_usd']:.6f} | {ms(r['ttft_p50_ms'])}/{ms(r['ttft_p99_ms'])} | {phases_cells} | "
            f"{r['scale_events']} | {r['cold_starts']} | {recovered} |"
        )
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, checked: (c) vs (a) on replica-seconds and p99, nothing lost, (c) vs (b) in the burst."""
    by = {r["scenario"]: r for r in results}
    peak, mean, auto = by.get("peak"), by.get("mean"), by.get("autoscaler")
    if not (peak and mean and auto):
        return {}
    saving = 1 - auto["replica_seconds_per_query"] / peak["replica_seconds_per_query"]
    p99_ratio = (auto["ttft_p99_ms"] or math.inf) / (peak["ttft_p99_ms"] or math.inf)
    burst_auto = auto["phases"]["burst"]["ttft_p99_ms"] or math.inf
    burst_mean = mean["phases"]["burst"]["ttft_p99_ms"] or math.inf
    return {
        "replica_seconds_saving_vs_peak": saving,
        "p99_ratio_vs_peak": p99_ratio,
        "burst_p99_autoscaler_ms": burst_auto,
        "burst_p99_mean_ms": burst_mean,
        "met_saving_33pct": saving >= 0.33,
        "met_p99_within_1_2x": p99_ratio <= 1.2,
        "met_nothing_lost": all(r["lost"] == 0 for r in results),
        "met_burst_p99_better_than_mean": burst_auto < burst_mean,
    }


def plot(results: list[dict[str, Any]], trace: list[tuple[float, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (load_ax, rep_ax) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    end = max(t for t, _ in trace) if trace else 1.0
    bins = [i * 2.0 for i in range(int(end / 2) + 2)]
    load_ax.hist([t for t, _ in trace], bins=bins, weights=[0.5] * len(trace), color="grey")
    load_ax.set_ylabel("offered load (req/s)")
    load_ax.set_title("bench.elastic: load and replicas over time (model latency SIMULATED)")
    for r in results:
        samples = r["replicas_over_time"]
        rep_ax.step([s[0] for s in samples], [s[1] for s in samples], where="post", label=r["scenario"])
        if r["kill_at_s"] is not None:
            rep_ax.axvline(r["kill_at_s"], color="red", linestyle=":", linewidth=0.8)
    rep_ax.set_ylabel("replicas (Triton instances)")
    rep_ax.set_xlabel("seconds into the trace (red: a replica killed)")
    rep_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.elastic", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--pool", default=str(DEFAULT_POOL), help="recorded pool (default ../shared/data/gsm8k)")
    parser.add_argument("--base-rate", type=float, default=0.6, help="idle arrival rate, req/s (burst: 10x)")
    parser.add_argument("--scale", type=float, default=1.0, help="phase length factor (1: 2 min per scenario)")
    parser.add_argument("--time-scale", type=float, default=0.25, help="fraction of simulated latency waited")
    parser.add_argument("--concurrency", type=int, default=2, help="requests one replica serves at once")
    parser.add_argument("--service-s", type=float, default=1.0, help="expected real seconds per request")
    parser.add_argument("--peak-replicas", type=int, default=4, help="(a)'s replicas and (c)'s maximum")
    parser.add_argument("--mean-replicas", type=int, default=2, help="(b)'s replicas")
    parser.add_argument("--load-s", type=float, default=2.0, help="SIMULATED seconds to load an instance")
    parser.add_argument("--interval", type=float, default=1.0, help="scaler decision interval, s")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of one Ask, s")
    parser.add_argument("--scenarios", default="peak,mean,autoscaler")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--no-remove-replica",
        dest="remove_replica",
        action="store_false",
        help="do not take a replica away mid-burst in the autoscaler scenario (no recovery figure)",
    )
    parser.add_argument("--out", default=str(OUT))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    pool = Path(args.pool)
    cards = model_cards_for(pool)
    missing = [m for m in MODELS if m not in cards]
    if missing:
        raise SystemExit(f"{pool} lacks the models {missing}")
    prompts = [r.prompt for r in read_pool(pool) if r.split == "test" and all(m in r.responses for m in MODELS)][:400]
    trace_phases = phases(args.base_rate, args.scale)
    trace = arrivals(trace_phases, args.seed)
    names = [p.name for p in trace_phases]
    sizes = {"peak": args.peak_replicas, "mean": args.mean_replicas, "autoscaler": None}
    results = []
    for name in args.scenarios.split(","):
        scenario = Scenario(name, sizes[name])
        print(f"{name}: {len(trace)} requests over {sum(p.seconds for p in trace_phases):.0f} s ...", flush=True)
        run_scenario(scenario, pool, trace, prompts, args)
        results.append(summary(scenario, names))
        write_report(results, trace, trace_phases, args, argv)
    report = write_report(results, trace, trace_phases, args, argv)
    print(table(results, names))
    print(json.dumps(report["verdict"], indent=2))


def write_report(
    results: list[dict[str, Any]],
    trace: list[tuple[float, str]],
    trace_phases: list[Phase],
    args: argparse.Namespace,
    argv: list[str] | None,
) -> dict[str, Any]:
    """Writes ``elastic.json`` and ``elastic.png`` for the scenarios run so far (after each one: a crash
    of a later scenario keeps the earlier ones)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python -m bench.elastic " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items()},
        "phases": [asdict(p) for p in trace_phases],
        "simulated": "model latency and load times are SIMULATED by the replay model; mesh, queueing, loads are real",
        "results": results,
        "verdict": verdict(results),
    }
    (out / "elastic.json").write_text(json.dumps(report, indent=2))
    plot(results, trace, out / "elastic.png")
    return report


if __name__ == "__main__":
    main()
