"""Quorum (early termination) against waiting for every member, side by side in one run.

One mesh: Triton's replay model serving gsm8k with its simulated heavy-tailed latency really waited
(``--time-scale`` of it), the classifier, and two dispatch processes on the same Triton with the same
router: one ends a fan-out wave as soon as its vote is settled and cancels the stragglers inside
Triton, the other (``--no-early-stop``) waits for every member. The router is the trained one
(``constellation train router``) with its ``quality`` profile for numbers set to a 7-model vote, so
both processes plan the same constellation for every prompt. Each test prompt goes to both, in
alternating order, with bounded concurrency.

Reports accuracy (recorded correctness of the answer returned), mean cost, and p50/p95/p99 of the
simulated latency (the model time the answer waited for) and of the real wall time. Writes
``docs/bench/quorum.json``, ``docs/bench/quorum_cdf.png`` and the "quorum" section of
``docs/BENCHMARKS.md``. Run: ``python -m bench.quorum [--limit 200] [--time-scale 0.05]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

from tqdm import tqdm

from apps.eval_run import REPLAY_MODEL, catalog_for
from apps.evaluation import Call, Judge, percentiles
from apps.mesh import Mesh, MeshPorts, ServiceProcess, wait_serving
from bench.report import DOCS, markdown_table, write_section
from constellation import artifacts
from constellation.client import DispatchClient, ask_request
from constellation.errors import ConstellationError
from constellation.net import free_port
from constellation.pools import read_pool
from constellation.v1 import common_pb2
from services.dispatch.routing import ARTIFACT_KIND, TRAIN_COMMAND, ProfileSettings, Weights

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SIDES = ("quorum", "wait-all")


def voting_router(root: Path, size: int, quorum: int) -> Path:
    """The trained router with ``quality`` on numbers set to a ``size``-model vote (a copy under ``root``)."""
    trained = artifacts.load(artifacts.default_root(), ARTIFACT_KIND, train_command=TRAIN_COMMAND)
    manifest = {k: v for k, v in trained.manifest.items() if k not in ("kind", "content_hash", "created_at")}
    manifest["profiles"] = {
        **manifest.get("profiles", {}),
        "quality/number": ProfileSettings(Weights(1, 0, 0), vote_size=size, quorum=quorum).to_json(),
    }
    return artifacts.save(ARTIFACT_KIND, trained.arrays, manifest, root)


async def one(client: DispatchClient, prompt: str, record_id: str, time_scale: float) -> tuple[Call, float, int]:
    started = time.perf_counter()
    text, cost, simulated, finished, error = "", 0.0, 0.0, 0, ""
    models: tuple[str, ...] = ()
    request = ask_request(prompt, profile=common_pb2.PROFILE_QUALITY, max_tokens=65536)
    try:
        async with aclosing(client.ask(request, timeout_s=300)) as events:
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "candidate" and event.candidate.phase == event.candidate.PHASE_FINISHED:
                    finished += 1
                elif kind == "final":
                    text, cost, models = event.final.text, event.final.usage.cost_usd, tuple(event.final.models)
                    simulated = sum(s.milliseconds for s in event.final.stages if s.simulated)
    except ConstellationError as exc:  # counted and reported, never hidden
        error = str(exc)
    wall = (time.perf_counter() - started) * 1000
    call = Call(record_id, "profile:quality", text, cost, simulated, simulated, wall, error, models)
    return call, wall, finished


async def drive(addresses: dict[str, str], records: list[Any], concurrency: int, time_scale: float) -> dict:
    limit = asyncio.Semaphore(concurrency)
    out: dict[str, list[tuple[Call, float, int]]] = {side: [] for side in SIDES}
    bar = tqdm(total=2 * len(records), desc="asks (quorum and wait-all)", unit="ask")
    clients = {side: DispatchClient(address, traced=False) for side, address in addresses.items()}

    async def pair(index: int, record: Any) -> None:
        order = SIDES if index % 2 == 0 else SIDES[::-1]
        for side in order:
            async with limit:
                out[side].append(await one(clients[side], record.prompt, record.id, time_scale))
            bar.update(1)

    try:
        await asyncio.gather(*(pair(i, r) for i, r in enumerate(records)))
    finally:
        for client in clients.values():
            await client.close()
        bar.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, default=DATA / "gsm8k.jsonl.gz")
    parser.add_argument("--limit", type=int, default=200, help="test prompts (default 200)")
    parser.add_argument("--vote", type=int, default=7, help="models per vote (default 7)")
    parser.add_argument("--quorum", type=int, default=3, help="agreeing answers ending a vote (0: majority)")
    parser.add_argument("--time-scale", type=float, default=0.05, help="share of simulated latency waited")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    records = list(read_pool(args.pool))
    test = [r for r in records if r.split == "test"][: args.limit]
    judge = Judge(test, [r for r in records if r.split == "train"])
    with tempfile.TemporaryDirectory(prefix="constellation-quorum-") as tmp:
        run_dir = Path(tmp)
        router = voting_router(run_dir / "artifacts", args.vote, args.quorum)
        catalog = run_dir / "models.json"
        catalog.write_text(json.dumps(catalog_for(args.pool, judge.models)))
        ports = MeshPorts(free_port(), free_port(), free_port(), free_port(), free_port(), free_port())
        common = ["--models-file", str(catalog), "--router-artifact", str(router), "--no-hedging"]
        common += ["--classify-timeout", "30", "--max-tokens-limit", "65536"]
        mesh = Mesh(
            ports,
            models=[REPLAY_MODEL],
            run_dir=run_dir,
            model_parameters={
                REPLAY_MODEL: {
                    "pool_paths": str(args.pool.resolve()),
                    "time_scale": str(args.time_scale),
                    "tokens_per_chunk": "64",
                }
            },
            dispatch_args=common,
            classifier=True,
        )
        wait_all_port = free_port()
        wait_all = ServiceProcess(
            "dispatch-wait-all",
            "services.dispatch.main",
            ["--port", str(wait_all_port), "--triton-url", f"127.0.0.1:{ports.triton_grpc}", "--metrics-port", "-1",
             "--classifier-url", f"127.0.0.1:{ports.classifier}", *common, "--no-early-stop"],
            run_dir / "dispatch-wait-all.log",
        )  # fmt: skip
        try:
            mesh.start()
            wait_all.start()
            wait_serving(f"127.0.0.1:{wait_all_port}", 60, alive=wait_all.alive)
            started = time.perf_counter()
            raw = asyncio.run(
                drive(
                    {"quorum": mesh.dispatch_address, "wait-all": f"127.0.0.1:{wait_all_port}"},
                    test,
                    args.concurrency,
                    args.time_scale,
                )
            )
            wall = time.perf_counter() - started
        finally:
            wait_all.stop()
            mesh.stop()
    by_id = {r.id: r for r in test}
    summary: dict[str, dict[str, Any]] = {}
    for side in SIDES:
        outcomes = [judge.routed_outcome(by_id[call.record_id], call) for call, _, _ in raw[side]]
        summary[side] = {
            "n": len(outcomes),
            "accuracy": sum(o.quality for o in outcomes) / len(outcomes),
            "mean_cost_usd": sum(o.cost_usd for o in outcomes) / len(outcomes),
            "failures": sum(o.failed for o in outcomes),
            "simulated_ms": percentiles([call.simulated_ms for call, _, _ in raw[side]]),
            "wall_ms": percentiles([w for _, w, _ in raw[side]]),
            "mean_finished_members": sum(f for _, _, f in raw[side]) / len(outcomes),
        }
    quorum, everyone = summary["quorum"], summary["wait-all"]
    ratio = quorum["simulated_ms"]["p99"] / everyone["simulated_ms"]["p99"]
    lost = (everyone["accuracy"] - quorum["accuracy"]) * 100
    rows = [
        [
            side,
            f"{s['accuracy'] * 100:.2f}",
            f"{s['mean_cost_usd']:.5f}",
            " / ".join(f"{s['simulated_ms'][p]:.0f}" for p in ("p50", "p95", "p99")),
            " / ".join(f"{s['wall_ms'][p]:.0f}" for p in ("p50", "p95", "p99")),
            f"{s['mean_finished_members']:.2f}",
            str(s["failures"]),
        ]
        for side, s in summary.items()
    ]
    table = markdown_table(
        ["policy", "accuracy %", "mean cost $", "simulated ms p50 / p95 / p99", "real ms p50 / p95 / p99",
         "members finished", "failures"],
        rows,
    )  # fmt: skip
    out = DOCS / "bench"
    out.mkdir(parents=True, exist_ok=True)
    recorded_args = {k: str(v) for k, v in vars(args).items()}
    recorded_args["pool"] = args.pool.name  # the file, not where it lies on this machine
    (out / "quorum.json").write_text(
        json.dumps({"args": recorded_args, "summary": summary, "p99_ratio": ratio}, indent=2)
    )
    plot(raw, out / "quorum_cdf.png")
    body = (
        "## Quorum vs waiting for every member\n\n"
        f"Command: `python -m bench.quorum --limit {args.limit} --vote {args.vote} --quorum {args.quorum} "
        f"--time-scale {args.time_scale}`. {len(test)} gsm8k test prompts, each planned as a {args.vote}-model vote "
        f"(quorum {args.quorum or args.vote // 2 + 1} agreeing answers) by the `quality` profile, sent "
        "to two dispatch processes on one Triton in the same run: one stops a wave once its vote is settled "
        "and cancels the stragglers in Triton, one waits for all. Replay latency (size class + seeded "
        f"log-normal tail) is really waited at {args.time_scale:g}x; the simulated figures are the model time "
        f"each answer waited for. Machine: {platform.machine()}, run took {wall:.0f} s.\n\n"
        f"{table}\n\n"
        f"p99 of quorum / p99 of wait-all (simulated): **{ratio:.2f}** (target <= 0.6); accuracy lost: "
        f"**{lost:+.2f} points** (target <= 0.5).\n\n![latency CDF](bench/quorum_cdf.png)\n"
    )
    write_section("quorum", body)
    print(body)


def plot(raw: dict[str, list[tuple[Call, float, int]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side in SIDES:
        values = sorted(call.simulated_ms / 1000 for call, _, _ in raw[side])
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=side)
    ax.set_xscale("log")
    ax.set_xlabel("simulated latency of the answer (s, log scale)")
    ax.set_ylabel("share of requests")
    ax.set_title("7-model vote on gsm8k: quorum vs wait for all")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
