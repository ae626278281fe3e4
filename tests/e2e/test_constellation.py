"""Fan-out, quorum, fallback and hedging end to end: real Triton (replay), real classifier, real dispatch.

The replay model serves a pool this file writes, with a fixed (tail-free) simulated latency per model,
really waited (time scale 1): `fast-a` and `fast-b` answer in about 30 ms, `slow` in 5 s. A router
artifact written here makes the `quality` profile ask the three best models at once and vote; `ghost`
is in the catalog but its Triton model (`replay-ghost`, a copy of replay made by a test) is not loaded,
so it fails with NOT_FOUND, except while one test loads it and then unloads it mid-run.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import urllib.request
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from apps.mesh import Mesh, MeshPorts
from constellation.client import DispatchClient, ask_request
from constellation.net import free_port
from constellation.triton import TritonClient
from constellation.v1 import common_pb2, dispatch_pb2
from services.dispatch.routing import ProfileSettings, Weights
from tests.e2e import router_artifacts
from tests.e2e.triton_metrics import generations, in_flight, scrape

PROMPT = "Solve: 2 + 4 = ? Give the final number."
MODELS = {  # name: (quality the router believes, price per Mtok, simulated ttft ms, Triton model)
    "ghost": (0.95, 0.5, 30, "replay-ghost"),
    "fast-a": (0.90, 0.02, 30, "replay"),
    "fast-b": (0.85, 1.0, 40, "replay"),
    "slow": (0.80, 0.01, 5000, "replay"),
    "backup": (0.50, 2.0, 30, "replay"),
}
PHASE = dispatch_pb2.CandidateEvent.Phase


def write_pool(directory: Path) -> Path:
    responses = {
        name: {"text": f"{name}: the answer is 6", "answer": "6", "correct": 1, "score": 1.0,
               "input_tokens": 12, "output_tokens": 8, "cost_usd": None}
        for name in MODELS
    }  # fmt: skip
    record = {"id": "fan/0", "task": "fan", "split": "test", "prompt": PROMPT, "reference": "6",
              "answer_kind": "number", "responses": responses}  # fmt: skip
    path = directory / "fan.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(record) + "\n").encode()))
    (directory / "models.json").write_text(json.dumps({m: {"params_b": 7.0} for m in MODELS}))
    return path


def write_router(root: Path) -> Path:
    """A one-prompt router: every model's quality as in MODELS; `quality` on numbers votes over three."""
    quality = {name: believed for name, (believed, _, _, _) in MODELS.items()}
    return router_artifacts.write_router(
        root, quality, {"quality/number": ProfileSettings(Weights(1, 0, 0), vote_size=3)}
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("constellation")
    pool = write_pool(tmp)
    catalog = {
        name: {
            "triton_model": triton_model,
            "parameters": {"recorded_model": name},
            "price_in_per_mtok": price,
            "price_out_per_mtok": price,
        }
        for name, (_, price, _, triton_model) in MODELS.items()
    }
    (tmp / "catalog.json").write_text(json.dumps(catalog))
    profile = {
        "ttft_sigma": 0.0,
        "per_token_sigma": 0.0,
        "models": {name: {"ttft_ms": ttft, "per_token_ms": 1.0} for name, (_, _, ttft, _) in MODELS.items()},
    }
    ports = MeshPorts(free_port(), free_port(), free_port(), free_port(), free_port(), free_port())
    mesh = Mesh(
        ports,
        models=["replay"],
        run_dir=tmp,
        say=lambda _: None,
        model_parameters={
            "replay": {
                "pool_paths": str(pool),
                "time_scale": "1",
                "tokens_per_chunk": "4",
                "latency_profile": json.dumps(profile),
            }
        },
        dispatch_args=[
            "--models-file",
            str(tmp / "catalog.json"),
            "--router-artifact",
            str(write_router(tmp / "artifacts")),
            "--hedge-after-ms",
            "100",
            "--classify-timeout",
            "10",
        ],
        classifier=True,
    )
    mesh.files = {"catalog": tmp / "catalog.json", "router": tmp / "artifacts"}  # type: ignore[attr-defined]
    mesh.start(timeout_s=180)
    yield mesh
    mesh.stop()
    assert mesh.leftovers() == []


async def ask(mesh: Mesh, request: dispatch_pb2.AskRequest) -> tuple[list[dispatch_pb2.AskResponse], float]:
    started = time.perf_counter()
    async with DispatchClient(mesh.dispatch_address) as client:
        async with aclosing(client.ask(request, timeout_s=30)) as stream:
            events = [event async for event in stream]
    return events, time.perf_counter() - started


def phases(events: list[dispatch_pb2.AskResponse]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for event in events:
        if event.WhichOneof("event") == "candidate":
            out.setdefault(event.candidate.model, []).append(event.candidate.phase)
    return out


def dispatch_counter(mesh: Mesh, name: str, labels: dict[str, str]) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.ports.dispatch_metrics}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_idle(mesh: Mesh) -> dict[Any, float]:
    deadline = time.monotonic() + 10
    while (metrics := scrape(mesh.triton)) and in_flight(metrics, "replay") > 0:
        assert time.monotonic() < deadline, "replay requests still open in Triton"
        time.sleep(0.05)
    return metrics


def test_vote_stops_at_quorum_cancels_the_straggler_in_triton_and_replaces_a_failed_member(mesh: Mesh) -> None:
    cancelled_before = generations(scrape(mesh.triton), "cancelled", "replay")
    request = ask_request(PROMPT, profile=common_pb2.PROFILE_QUALITY)
    events, elapsed = asyncio.run(ask(mesh, request))
    plan = next(e.plan.plan for e in events if e.WhichOneof("event") == "plan")
    assert plan.policy == "vote"
    assert [c.model for c in plan.candidates if c.chosen] == ["ghost", "fast-a", "fast-b"]
    seen = phases(events)
    assert PHASE.PHASE_FAILED in seen["ghost"]  # not loaded in Triton: NOT_FOUND
    assert PHASE.PHASE_STARTED in seen["slow"]  # the next-best model replaced it
    assert PHASE.PHASE_FINISHED in seen["fast-a"] and PHASE.PHASE_FINISHED in seen["fast-b"]
    assert seen["slow"][-1] == PHASE.PHASE_CANCELLED  # two agreeing answers outweigh what it could say
    final = events[-1].final
    assert final.text == "fast-a: the answer is 6" and final.models[0] == "fast-a"
    assert final.status.code == 5 and "ghost" in final.status.message  # survived NOT_FOUND, reported
    assert 0.5 < final.confidence <= 1.0 and not final.uncertain
    assert elapsed < 3.0  # did not wait for the 5 s straggler
    metrics = wait_idle(mesh)
    assert generations(metrics, "cancelled", "replay") == cancelled_before + 1
    assert dispatch_counter(mesh, "constellation_early_terminations_total", {"policy": "vote"}) >= 1
    assert dispatch_counter(mesh, "constellation_fallbacks_total", {"model": "ghost"}) >= 1


def add_ghost_model(mesh: Mesh) -> Path:
    """Puts `replay-ghost` (replay's versions and configuration under a new name) in Triton's repository."""
    repository = mesh.triton.served_model_repository
    ghost = repository / MODELS["ghost"][3]
    ghost.mkdir()
    (ghost / "1").symlink_to((repository / "replay" / "1").resolve())
    config = (repository / "replay" / "config.pbtxt").read_text()
    (ghost / "config.pbtxt").write_text(config.replace('name: "replay"', f'name: "{ghost.name}"', 1))
    return ghost


def test_a_member_whose_triton_model_is_unloaded_mid_run_is_replaced_and_no_request_is_lost(mesh: Mesh) -> None:
    """Eight quality Asks in a row; after the second, ghost's Triton model is unloaded under them."""
    ghost_dir = add_ghost_model(mesh)
    triton_model = ghost_dir.name

    async def run() -> tuple[list[list[dispatch_pb2.AskResponse]], int]:
        triton = TritonClient(mesh.triton.grpc_url)
        await triton.load(triton_model)
        try:
            answered: list[list[dispatch_pb2.AskResponse]] = []
            unloaded_after = -1
            for i in range(8):
                events, _ = await ask(mesh, ask_request(PROMPT, profile=common_pb2.PROFILE_QUALITY))
                answered.append(events)
                if i == 1:
                    await triton.unload(triton_model)
                    assert not await triton.model_ready(triton_model)
                    unloaded_after = i
            return answered, unloaded_after
        finally:
            if await triton.model_ready(triton_model):
                await triton.unload(triton_model)
            await triton.close()

    try:
        answered, unloaded_after = asyncio.run(run())
    finally:
        for entry in ghost_dir.iterdir():
            entry.unlink()
        ghost_dir.rmdir()
    assert len(answered) == 8
    for i, events in enumerate(answered):
        final = events[-1].final
        assert final.text.endswith("the answer is 6"), f"Ask {i} lost its answer"
        seen = phases(events)
        if i <= unloaded_after:  # ghost loaded: it takes part and nothing fails
            assert PHASE.PHASE_FAILED not in seen["ghost"] and PHASE.PHASE_STARTED in seen["ghost"]
            assert final.status.code == 0 and "slow" not in seen
        else:  # ghost gone from Triton: NOT_FOUND, replaced by the next-best model, and said so
            assert seen["ghost"][-1] == PHASE.PHASE_FAILED
            assert PHASE.PHASE_STARTED in seen["slow"]
            assert final.status.code == 5 and "ghost" in final.status.message
    wait_idle(mesh)


def test_a_slow_first_token_is_hedged_and_the_loser_cancelled(mesh: Mesh) -> None:
    cancelled_before = generations(scrape(mesh.triton), "cancelled", "replay")
    cheapest = common_pb2.ObjectiveWeights(quality=0.0, cost=1.0, latency=0.0)
    events, elapsed = asyncio.run(ask(mesh, ask_request(PROMPT, weights=cheapest)))
    plan = next(e.plan.plan for e in events if e.WhichOneof("event") == "plan")
    assert [c.model for c in plan.candidates if c.chosen] == ["slow"]  # the cheapest
    final = events[-1].final
    assert final.models[0] == "fast-a" and final.text == "fast-a: the answer is 6"  # the hedge won
    assert phases(events)["slow"][-1] == PHASE.PHASE_CANCELLED
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    assert {d.source for d in deltas} == {"fast-a"}  # only the winner streamed
    assert elapsed < 3.0
    metrics = wait_idle(mesh)
    assert generations(metrics, "cancelled", "replay") == cancelled_before + 1
    assert dispatch_counter(mesh, "constellation_hedges_total", {"model": "slow"}) >= 1


async def test_every_member_call_is_a_span_of_the_requests_trace(
    mesh: Mesh, dispatch_factory: Any, spans: InMemorySpanExporter
) -> None:
    """An in-process dispatch on the same Triton and classifier, so its spans land in the test's exporter."""
    address = await dispatch_factory(
        triton_url=f"127.0.0.1:{mesh.ports.triton_grpc}",
        classifier_url=f"127.0.0.1:{mesh.ports.classifier}",
        classify_timeout_s=10.0,
        models_file=str(mesh.files["catalog"]),  # type: ignore[attr-defined]
        router_artifact=str(mesh.files["router"]),  # type: ignore[attr-defined]
        metrics_port=-1,
    )
    async with DispatchClient(address) as client:
        request = ask_request(PROMPT, profile=common_pb2.PROFILE_QUALITY)
        async with aclosing(client.ask(request, timeout_s=30)) as stream:
            events = [event async for event in stream]
    final = events[-1].final
    finished = spans.get_finished_spans()
    in_trace = [s for s in finished if format(s.context.trace_id, "032x") == final.trace_id]
    names = {s.name for s in in_trace}
    assert "/constellation.v1.DispatchService/Ask" in names
    assert "/constellation.v1.ClassifierService/Classify" in names  # the classifier hop, same trace
    members = {s.attributes["constellation.model"]: s for s in in_trace if s.name == "model.generate"}
    assert set(members) == {"ghost", "fast-a", "fast-b", "slow"}
    fast = members["fast-a"].attributes
    assert fast["constellation.output_tokens"] > 0 and fast["constellation.cost_usd"] >= 0
    assert fast["constellation.time_to_first_token_ms"] > 0 and not fast["constellation.cancelled"]
    slow = members["slow"].attributes
    assert slow["constellation.fallback"] and slow["constellation.cancelled_by_quorum"]
    assert members["ghost"].status.status_code.name == "ERROR"
