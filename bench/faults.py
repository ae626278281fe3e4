"""Fault suite: kill each part of the real mesh mid-stream under open-loop load and count what callers got.

``python -m bench.faults`` (in ``make bench``). Starts the mesh under the local supervisor (Triton with
the replay model serving a recorded pool from ``../shared/data``, classifier, registry, fusion and
dispatch; a 3-model vote for numeric questions, so fusion is on the path), sends Asks at a fixed rate
(Poisson arrivals, open loop: a slow answer does not slow the sender), and SIGKILLs Triton, the
classifier, the registry and fusion one at a time, each for a fault window, waiting for the supervisor to
bring the mesh back before the next. Every request is counted once:

- ``answered``: a final event with an OK status;
- ``fallback``: a final event whose status names a problem the request survived;
- ``clear status``: the call ended with a specific gRPC code (UNAVAILABLE, DEADLINE_EXCEEDED, ...);
- ``lost``: the stream ended without a final event, or with UNKNOWN/INTERNAL;
- ``hung``: no end 5 s after the call's deadline.

Lost and hung must be 0. Writes a table to ``docs/BENCHMARKS.md`` (section ``faults``) and
``docs/bench/faults.json``; latency percentiles are real wall time around each Ask (the replay model's
latency is simulated and scaled by ``--time-scale``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apps.eval_run import REPLAY_MODEL, catalog_for
from apps.evaluation import Judge
from apps.mesh import Backoff, Mesh, MeshPorts, wait_serving
from bench.quorum import DATA, voting_router
from bench.report import DOCS, markdown_table, percentiles, write_section
from constellation.client import DispatchClient, ask_request
from constellation.errors import ConstellationError
from constellation.net import free_port
from constellation.pools import PoolRecord, read_pool
from constellation.v1 import common_pb2
from services.inference.launcher import TritonError

TARGETS = ("triton", "classifier", "registry", "fusion")
HANG_MARGIN_S = 5.0
VAGUE_CODES = {"UNKNOWN", "INTERNAL"}


@dataclass
class Outcome:
    """One Ask as the caller saw it."""

    phase: str
    kind: str  # answered | fallback | clear status | lost | hung
    wall_ms: float
    code: str = "OK"
    message: str = ""


@dataclass
class Phase:
    name: str
    started: float
    ended: float = 0.0
    recovered_s: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)


async def ask_once(client: DispatchClient, prompt: str, phase: str, deadline_s: float) -> Outcome:
    """Sends one Ask and classifies how it ended (see the module doc)."""
    started = time.perf_counter()
    request = ask_request(prompt, profile=common_pb2.PROFILE_QUALITY, max_tokens=512)

    async def run() -> tuple[str, str, str]:
        final = None
        async with aclosing(client.ask(request, timeout_s=deadline_s)) as events:
            async for event in events:
                if event.WhichOneof("event") == "final":
                    final = event.final
        if final is None:
            return "lost", "NO_FINAL_EVENT", "the stream ended without a final event"
        if final.status.code == 0:
            return "answered", "OK", ""
        return "fallback", f"final:{final.status.code}", final.status.message

    message = ""
    try:
        kind, code, message = await asyncio.wait_for(run(), deadline_s + HANG_MARGIN_S)
    except TimeoutError:
        kind, code = "hung", "HUNG"
    except ConstellationError as error:
        code, message = error.code.name, error.message
        kind = "lost" if code in VAGUE_CODES else "clear status"
    return Outcome(phase, kind, (time.perf_counter() - started) * 1000, code, message[:200])


class Load:
    """Open-loop Asks at ``rate`` per second, tagged with the phase current when each was sent."""

    def __init__(self, address: str, prompts: list[str], rate: float, deadline_s: float, seed: int = 7):
        self.client = DispatchClient(address, traced=False)
        self.prompts = prompts
        self.rate = rate
        self.deadline_s = deadline_s
        self.random = random.Random(seed)
        self.phase: Phase | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.sent = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.random.expovariate(self.rate))
            phase = self.phase
            if phase is None:
                continue
            prompt = self.prompts[self.sent % len(self.prompts)]
            self.sent += 1
            self.tasks.append(asyncio.create_task(self._one(prompt, phase)))

    async def _one(self, prompt: str, phase: Phase) -> None:
        phase.outcomes.append(await ask_once(self.client, prompt, phase.name, self.deadline_s))

    async def drain(self) -> None:
        await asyncio.gather(*self.tasks)
        await self.client.close()


@contextmanager
def supervised(mesh: Mesh) -> Iterator[list[str]]:
    """Runs :meth:`Mesh.supervise` every 0.1 s in a thread for the block; yields the events seen."""
    events: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            events.extend(f"{time.monotonic():.1f} {e}" for e in mesh.supervise())
            stop.wait(0.1)

    thread = threading.Thread(target=loop, name="supervisor", daemon=True)
    thread.start()
    try:
        yield events
    finally:
        stop.set()
        thread.join(10)


def pid_of(mesh: Mesh, target: str) -> int:
    if target == "triton":
        pid = mesh.triton.pid
    else:
        process = getattr(mesh, target)
        pid = process.pid if process is not None else None
    if pid is None:
        raise RuntimeError(f"{target} is not running")
    return pid


async def recovered(mesh: Mesh, timeout_s: float) -> float:
    """Seconds until every child runs again and Triton and the services answer health checks."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if all(s.state == "running" for s in mesh.status.values()):
            try:
                await asyncio.to_thread(mesh.triton.wait_ready, max(1.0, timeout_s - (time.monotonic() - started)))
                for process, port in [*mesh.supporting, (mesh.dispatch, mesh.ports.dispatch)]:
                    await asyncio.to_thread(wait_serving, f"127.0.0.1:{port}", 30.0, alive=process.alive)
                return time.monotonic() - started
            except (TritonError, TimeoutError, RuntimeError):  # a child died again while we waited
                pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the mesh did not recover within {timeout_s:.0f} s")


async def scenario(mesh: Mesh, load: Load, steady_s: float, fault_s: float) -> list[Phase]:
    """Steady state, then each target killed for ``fault_s`` seconds, with recovery between."""
    phases = [Phase("steady", time.monotonic())]
    stop = asyncio.Event()
    load.phase = phases[0]
    sender = asyncio.create_task(load.run(stop))
    await asyncio.sleep(steady_s)
    for target in TARGETS:
        phase = Phase(f"kill {target}", time.monotonic())
        phases[-1].ended = phase.started
        phases.append(phase)
        load.phase = phase
        os.kill(pid_of(mesh, target), signal.SIGKILL)
        await asyncio.sleep(fault_s)
        load.phase = None  # no traffic is counted while the mesh recovers
        phase.ended = time.monotonic()
        phase.recovered_s = await recovered(mesh, 120.0)
        load.phase = Phase(f"after {target}", time.monotonic())  # a short settle, not reported
        await asyncio.sleep(1.0)
    load.phase = None
    stop.set()
    await sender
    await load.drain()
    return phases


def summarize(phases: list[Phase]) -> list[dict[str, Any]]:
    rows = []
    for phase in phases:
        kinds = Counter(o.kind for o in phase.outcomes)
        answered = [o.wall_ms for o in phase.outcomes if o.kind in ("answered", "fallback")]
        rows.append(
            {
                "phase": phase.name,
                "sent": len(phase.outcomes),
                **{k: kinds.get(k, 0) for k in ("answered", "fallback", "clear status", "lost", "hung")},
                "codes": dict(Counter(o.code for o in phase.outcomes if o.kind != "answered")),
                "examples": sorted({f"{o.code}: {o.message}" for o in phase.outcomes if o.kind != "answered"})[:5],
                "wall_ms": percentiles(answered),
                "recovery_s": round(phase.recovered_s, 1),
            }
        )
    return rows


def build_mesh(run_dir: Path, pool: Path, time_scale: float, *, ranking: bool = False) -> Mesh:
    """The supervised mesh the fault, fuzz and soak benches drive (3-model votes on numbers)."""
    records = list(read_pool(pool))
    judge = Judge([r for r in records if r.split == "test"], [r for r in records if r.split == "train"])
    catalog = run_dir / "models.json"
    catalog.write_text(json.dumps(catalog_for(pool, judge.models)))
    router = voting_router(run_dir / "artifacts", 3, 2)
    ports = MeshPorts(*(free_port() for _ in range(9)))
    dispatch_args = ["--models-file", str(catalog), "--router-artifact", str(router)]
    dispatch_args += ["--classify-timeout", "5", "--max-tokens-limit", "65536"]
    return Mesh(
        ports,
        models=[REPLAY_MODEL],
        run_dir=run_dir,
        model_parameters={
            REPLAY_MODEL: {"pool_paths": str(pool.resolve()), "time_scale": str(time_scale), "tokens_per_chunk": "16"}
        },
        dispatch_args=dispatch_args,
        classifier=True,
        registry=True,
        fusion=True,
        ranking=ranking,
        backoff=Backoff(initial_s=0.5, max_s=5.0, stable_s=30.0),
    )


def log_findings(run_dir: Path) -> dict[str, int]:
    """Counts of known noise in the children's logs (OTel context detach failures, tracebacks)."""
    found: dict[str, int] = {}
    for log_path in run_dir.glob("*.log"):
        text = log_path.read_text(errors="replace")
        found[log_path.stem] = text.count("Failed to detach context")
    return found


def test_prompts(pool: Path, limit: int) -> list[str]:
    records: list[PoolRecord] = [r for r in read_pool(pool) if r.split == "test"]
    return [r.prompt for r in records[:limit]]


def report(rows: list[dict[str, Any]], args: argparse.Namespace, extra: dict[str, Any]) -> str:
    header = ["phase", "sent", "answered", "fallback", "clear status", "lost", "hung", "codes (not OK)",
              "p50 / p99 ms", "recovery s"]  # fmt: skip
    table = markdown_table(
        header,
        [
            [r["phase"], r["sent"], r["answered"], r["fallback"], r["clear status"], r["lost"], r["hung"],
             ", ".join(f"{c} {n}" for c, n in sorted(r["codes"].items())) or "-",
             f"{r['wall_ms']['p50']:.0f} / {r['wall_ms']['p99']:.0f}",
             "-" if r["phase"] == "steady" else r["recovery_s"]]
            for r in rows
        ],
    )  # fmt: skip
    body = (
        "## Fault suite: kills mid-stream under open-loop load\n\n"
        f"`python -m bench.faults --rate {args.rate} --fault-s {args.fault_s}` on {platform.machine()}, "
        f"{os.cpu_count()} cores: the mesh under its supervisor (Triton replay of `{args.pool.name}` at time "
        f"scale {args.time_scale}, classifier, registry, fusion, dispatch), `quality` profile (3-model votes "
        "on numbers), each process SIGKILLed in turn for the fault window, then restarted by the supervisor. "
        "Latency is real wall time of the answered Asks; the models' latency is simulated (replay). "
        "Recovery: seconds from the end of the window until every process runs and answers health again. "
        "A request counts in the phase in which it was sent (so a few sent just before a kill fail in the "
        "phase before it).\n\n"
        f"{table}\n\n"
        f"Triton exit status at the end: {extra['triton_exit']}; 'Failed to detach context' lines in the logs: "
        f"{extra['detach_lines']}.\n"
    )
    return body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, default=DATA / "gsm8k.jsonl.gz")
    parser.add_argument("--rate", type=float, default=4.0, help="Asks per second (open loop)")
    parser.add_argument("--steady-s", type=float, default=20.0)
    parser.add_argument("--fault-s", type=float, default=15.0, help="seconds of load after each kill")
    parser.add_argument("--deadline-s", type=float, default=20.0, help="each Ask's deadline")
    parser.add_argument("--time-scale", type=float, default=0.05, help="share of simulated latency waited")
    parser.add_argument("--run-dir", type=Path, help="keep the logs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="constellation-faults-") as tmp:
        run_dir = args.run_dir or Path(tmp)
        run_dir.mkdir(parents=True, exist_ok=True)
        mesh = build_mesh(run_dir, args.pool, args.time_scale)
        try:
            mesh.start()
            prompts = test_prompts(args.pool, 200)

            async def run() -> list[Phase]:  # the client belongs to the loop asyncio.run makes
                load = Load(mesh.dispatch_address, prompts, args.rate, args.deadline_s)
                return await scenario(mesh, load, args.steady_s, args.fault_s)

            with supervised(mesh) as events:
                phases = asyncio.run(run())
        finally:
            mesh.stop()
        extra = {"triton_exit": mesh.triton.returncode, "detach_lines": log_findings(run_dir), "events": events}
        if mesh.triton.returncode:  # why Triton did not exit cleanly: its shutdown countdown
            lines = mesh.triton.log_tail(20000).splitlines()
            extra["triton_shutdown_log"] = [line for line in lines if "Timeout" in line or "E1" in line][-12:]
    rows = summarize(phases)
    out = DOCS / "bench"
    out.mkdir(parents=True, exist_ok=True)
    recorded = {k: str(v) for k, v in vars(args).items() if k != "run_dir"} | {"pool": args.pool.name}
    (out / "faults.json").write_text(json.dumps({"args": recorded, "phases": rows, **extra}, indent=2))
    body = report(rows, args, extra)
    write_section("faults", body)
    print(body)
    bad = sum(r["lost"] + r["hung"] for r in rows)
    if bad:
        raise SystemExit(f"{bad} requests were lost or hung")


if __name__ == "__main__":
    main()
