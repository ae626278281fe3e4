"""A/B of dispatch's time-to-first-token overhead: another revision against this working tree, one run.

The mesh-overhead target is a fraction of a millisecond on a noisy shared machine, so two runs of
``bench.mesh_overhead`` cannot tell a 0.2 ms change from noise. This script checks the revision
``--base`` out into a temporary git worktree (with this tree's generated stubs), starts one Triton
(the replay model, no simulated waiting, one token per message) and two dispatch processes, one from each
tree, and sends rounds of three requests: straight to Triton, through the base dispatch, through this
tree's dispatch, the order rotating. It prints each dispatch's paired median added time to first token.

Run: ``python -m bench.dispatch_ab --base HEAD~1 --rounds 400`` (about a minute; prints only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tritonclient.grpc.aio as aioclient
from tqdm import tqdm

from apps.mesh import Mesh, MeshPorts, ServiceProcess, wait_serving
from bench.mesh_overhead import REPLAY_POOL, Target, direct, targets, through_mesh
from bench.report import markdown_table
from constellation.client import DispatchClient
from constellation.net import free_port

ROOT = Path(__file__).resolve().parent.parent
STUBS = Path("libs/constellation/constellation/v1")


@dataclass
class ReplayRun:
    """One Triton serving the replay model (no simulated waiting, one token per message) in a scratch
    directory, and the ``DispatchService`` servers started beside it."""

    target: Target
    mesh: Mesh
    run_dir: Path
    models_file: Path
    """Dispatch's ``--models-file``: the target's name mapped to the replay model and its parameters."""
    processes: list[ServiceProcess] = field(default_factory=list)

    def serve(self, process: ServiceProcess, address: str) -> str:
        """Starts ``process`` and waits until it serves health at ``address``; returns the address."""
        process.start()
        self.processes.append(process)
        wait_serving(address, 120.0, alive=process.alive)
        return address

    def stop_servers(self) -> None:
        for process in self.processes:
            process.stop()
        self.processes.clear()


@contextmanager
def replay_run(prefix: str) -> Iterator[ReplayRun]:
    """A started :class:`ReplayRun`; its servers and Triton are stopped on leaving."""
    chosen = [t for t in targets() if t.triton_model == "replay"]
    if not chosen:
        raise SystemExit(f"needs the recorded pool {REPLAY_POOL} for the replay model")
    target = chosen[0]
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        run_dir = Path(tmp)
        models_file = run_dir / "models.json"
        models_file.write_text(json.dumps({target.name: {"triton_model": "replay", "parameters": target.parameters}}))
        mesh = Mesh(
            MeshPorts(free_port(), free_port(), free_port(), free_port(), free_port()),
            models=["replay"],
            run_dir=run_dir,
            model_parameters={"replay": {"pool_paths": str(REPLAY_POOL), "time_scale": "0", "tokens_per_chunk": "1"}},
        )
        run = ReplayRun(target, mesh, run_dir, models_file)
        try:
            mesh.triton.start()
            mesh.triton.wait_ready(120)
            yield run
        finally:
            run.stop_servers()
            mesh.stop()


def worktree(revision: str, into: Path) -> Path:
    """Checks ``revision`` out at ``into`` (detached) and copies this tree's generated stubs there."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(into), revision], check=True)
    shutil.copytree(ROOT / STUBS, into / STUBS, dirs_exist_ok=True)
    return into


def dispatch_from(
    tree: Path, name: str, triton_url: str, models_file: Path, log_dir: Path
) -> tuple[ServiceProcess, str]:
    """A dispatch process running the code of ``tree``, on a free port."""
    port = free_port()
    process = ServiceProcess(
        name,
        "services.dispatch.main",
        ["--port", str(port), "--triton-url", triton_url, "--metrics-port", "-1", "--models-file", str(models_file)],
        log_dir / f"{name}.log",
        env={"PYTHONPATH": os.pathsep.join([str(tree), str(tree / "libs" / "constellation")])},
        cwd=tree,
    )
    return process, f"127.0.0.1:{port}"


async def rounds(
    target: Target, triton_url: str, addresses: dict[str, str], count: int, warmup: int
) -> dict[str, list[float]]:
    async with aioclient.InferenceServerClient(triton_url) as triton:
        clients = {name: DispatchClient(address, traced=False) for name, address in addresses.items()}
        for client in clients.values():
            await client.__aenter__()
        try:

            def via(client: DispatchClient) -> Callable[[], Awaitable[tuple[float, float]]]:
                return lambda: through_mesh(client, target, 16)

            calls: dict[str, Callable[[], Awaitable[tuple[float, float]]]] = {
                "direct": lambda: direct(triton, target, 16),
                **{name: via(client) for name, client in clients.items()},
            }
            names = list(calls)
            ttft: dict[str, list[float]] = {name: [] for name in names}
            for i in tqdm(range(warmup + count), desc="rounds", unit="round"):
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    value, _ = await calls[name]()
                    if i >= warmup:
                        ttft[name].append(value)
        finally:
            for client in clients.values():
                await client.__aexit__(None, None, None)
    return ttft


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="git revision to compare this working tree with (default HEAD)")
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args(argv)
    with replay_run("constellation-ab-") as run:
        base_tree = worktree(args.base, run.run_dir / "base")
        try:
            addresses = {}
            for name, tree in ((f"base ({args.base})", base_tree), ("working tree", ROOT)):
                process, address = dispatch_from(
                    tree, name.split()[0], run.mesh.triton.grpc_url, run.models_file, run.run_dir
                )
                addresses[name] = run.serve(process, address)
            ttft = asyncio.run(rounds(run.target, run.mesh.triton.grpc_url, addresses, args.rounds, args.warmup))
        finally:
            run.stop_servers()
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    rows = [["direct tritonclient", f"{statistics.median(ttft['direct']):.3f}", ""]]
    for name in addresses:
        added = statistics.median(m - d for m, d in zip(ttft[name], ttft["direct"], strict=True))
        rows.append([f"Ask, dispatch of {name}", f"{statistics.median(ttft[name]):.3f}", f"{added:+.3f}"])
    print(markdown_table(["path", "TTFT p50 ms", "paired added ms"], rows))


if __name__ == "__main__":
    main()
