"""The local supervisor keeps the mesh up: a killed service comes back, a SIGKILLed Triton leaves nothing.

Real Triton (replay model, a one-prompt pool), real classifier and dispatch as child processes of a
:class:`Mesh`; the test drives :meth:`Mesh.supervise` as ``constellation up`` does. Also checks that
Triton listens on loopback only (its sockets in ``/proc/net/tcp``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import psutil
import pytest

from apps.mesh import Backoff, Mesh, MeshPorts, supervisor_file, wait_serving
from constellation.client import DispatchClient, ask_request
from constellation.errors import Unavailable
from constellation.net import free_port
from tests.e2e.processes import process_group_alive
from tests.e2e.test_constellation import PROMPT, write_pool


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("supervised")
    pool = write_pool(tmp)
    catalog = {"fast-a": {"triton_model": "replay", "parameters": {"recorded_model": "fast-a"}}}
    (tmp / "catalog.json").write_text(json.dumps(catalog))
    ports = MeshPorts(free_port(), free_port(), free_port(), free_port(), free_port(), free_port())
    mesh = Mesh(
        ports,
        models=["replay"],
        run_dir=tmp,
        say=lambda _: None,
        model_parameters={"replay": {"pool_paths": str(pool), "time_scale": "0.01"}},
        dispatch_args=["--models-file", str(tmp / "catalog.json")],
        classifier=True,
        backoff=Backoff(initial_s=0.2, max_s=2.0, stable_s=60.0),
    )
    mesh.start(timeout_s=180)
    yield mesh
    mesh.stop()
    assert mesh.leftovers() == []


def _supervise_until(mesh: Mesh, done: str, timeout_s: float = 60.0) -> list[str]:
    """Runs supervision steps until an event containing ``done`` appears; returns all events seen."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while not any(done in event for event in seen):
        assert time.monotonic() < deadline, f"no {done!r} within {timeout_s} s; events: {seen}"
        seen += mesh.supervise()
        time.sleep(0.05)
    return seen


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) with a socket listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_triton_listens_on_loopback_only(mesh: Mesh) -> None:
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, and as IPv4-mapped IPv6
    for port in (mesh.ports.triton_grpc, mesh.ports.triton_http, mesh.ports.triton_metrics):
        found = _listening(port)
        assert found and found <= loopback, f"port {port} listens on {found}"
    assert "--grpc-address=127.0.0.1" in mesh.triton.command()


def test_a_killed_classifier_is_restarted_and_shown_in_the_status_file(mesh: Mesh) -> None:
    classifier = mesh.classifier
    assert classifier is not None and classifier.pid is not None
    old = classifier.pid
    os.kill(old, signal.SIGKILL)
    events = _supervise_until(mesh, "classifier restarted")
    assert any("classifier exited (status -9)" in event for event in events)
    assert classifier.pid != old and mesh.dispatch.alive() and mesh.triton.is_running()
    wait_serving(f"127.0.0.1:{mesh.ports.classifier}", 60, alive=classifier.alive)
    rows = {row["name"]: row for row in json.loads(supervisor_file(mesh.run_dir).read_text())["children"]}
    assert rows["classifier"]["restarts"] == 1 and rows["classifier"]["state"] == "running"


async def test_a_sigkilled_triton_leaves_no_stub_or_shm_and_comes_back(mesh: Mesh) -> None:
    pgid = mesh.triton.pid
    assert pgid is not None
    stubs = [p for p in psutil.process_iter() if p.pid != pgid and _group(p.pid) == pgid]
    assert stubs, "no python-backend stub in Triton's process group (the check would be vacuous)"
    assert mesh.triton.shm_leftovers(), "no shared-memory region with Triton's prefix"
    os.kill(pgid, signal.SIGKILL)  # only the server; its stubs are orphaned
    _supervise_until(mesh, "triton exited")
    assert not process_group_alive(pgid), "python-backend stubs survived Triton"
    assert mesh.triton.shm_leftovers() == []
    _supervise_until(mesh, "triton restarted")
    mesh.triton.wait_ready(120)
    # Dispatch notices Triton is back at its next liveness check (every 2 s) and says UNAVAILABLE ("retry
    # later") until then, so a caller retries as the status tells it to, within a bound.
    retry_until = time.monotonic() + 30
    async with DispatchClient(mesh.dispatch_address) as client:
        while True:
            request = ask_request(PROMPT, model="fast-a", max_tokens=16)
            try:
                async with aclosing(client.ask(request, timeout_s=30)) as stream:
                    events = [event async for event in stream]
                break
            except Unavailable:
                assert time.monotonic() < retry_until, "dispatch did not serve again after Triton came back"
                await asyncio.sleep(0.5)
    assert events[-1].final.text


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
