"""Routing with a live registry, end to end: real Triton (replay), real registry, real dispatch, real Asks.

An unhealthy model receives no traffic until the registry's probe of Triton brings it back, and every
model call dispatch makes is reported to the registry.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing

import pytest

from apps.eval_run import REPLAY_MODEL, catalog_for
from apps.mesh import Mesh, MeshPorts
from constellation.client import DispatchClient, ask_request
from constellation.net import free_port
from constellation.v1 import common_pb2, registry_pb2
from services.registry.client import RegistryClient
from tests.pool_fixtures import write_pool

MODELS = ("cheap", "mid", "strong")
CHEAPEST_FIRST = common_pb2.ObjectiveWeights(quality=0.0, cost=1.0, latency=0.0)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    tmp = tmp_path_factory.mktemp("routing-registry")
    pool = write_pool(tmp / "tiny.jsonl.gz")
    models_file = tmp / "models.json"
    models_file.write_text(json.dumps(catalog_for(pool, list(MODELS))))
    ports = MeshPorts(free_port(), free_port(), free_port(), free_port(), free_port(), free_port(), free_port())
    prices = {"cheap": (0.1, 0.1), "mid": (1.0, 1.0), "strong": (10.0, 30.0)}
    seed = {
        "models": [
            {
                "name": name,
                "family": "toy",
                "price_in_per_mtok": prices[name][0],
                "price_out_per_mtok": prices[name][1],
                "simulated": True,
                "backend": {
                    "endpoint": f"127.0.0.1:{ports.triton_grpc}",
                    "model_name": REPLAY_MODEL,
                    "parameters": {"recorded_model": name},
                },
            }
            for name in MODELS
        ]
    }
    seed_file = tmp / "seed.json"
    seed_file.write_text(json.dumps(seed))
    mesh = Mesh(
        ports,
        models=[REPLAY_MODEL],
        run_dir=tmp,
        say=lambda _: None,
        model_parameters={REPLAY_MODEL: {"pool_paths": str(pool), "time_scale": "0", "tokens_per_chunk": "64"}},
        dispatch_args=["--models-file", str(models_file)],
        registry=True,
        registry_args=["--db", str(tmp / "registry.sqlite"), "--seed-file", str(seed_file)],
    )
    mesh.start(timeout_s=120)
    yield mesh
    mesh.stop()
    assert mesh.leftovers() == []


async def chosen(client: DispatchClient) -> tuple[str, str]:
    """The model the cheapest-first plan chooses, and the reason given for `cheap`."""
    request = ask_request("Question 2: what is the number?", weights=CHEAPEST_FIRST)
    reply = await client.plan(request, timeout_s=5)
    picked = next(c.model for c in reply.plan.candidates if c.chosen)
    return picked, next(c.reason for c in reply.plan.candidates if c.model == "cheap")


async def ask(client: DispatchClient) -> list[str]:
    request = ask_request("Question 3: what is the number?", weights=CHEAPEST_FIRST)
    async with aclosing(client.ask(request, timeout_s=10)) as events:
        async for event in events:
            if event.WhichOneof("event") == "final":
                return list(event.final.models)
    raise AssertionError("no final event")


async def wait_for_choice(client: DispatchClient, predicate: object, timeout_s: float) -> tuple[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        picked, reason = await chosen(client)
        if predicate(picked):  # type: ignore[operator]
            return picked, reason
        if time.monotonic() > deadline:
            raise AssertionError(f"still choosing {picked} after {timeout_s} s ({reason})")
        await asyncio.sleep(0.1)


def test_an_unhealthy_model_gets_no_traffic_until_the_probe_recovers_it(mesh: Mesh) -> None:
    registry_address = f"127.0.0.1:{mesh.ports.registry}"

    async def scenario() -> None:
        async with DispatchClient(mesh.dispatch_address) as client, RegistryClient(registry_address) as registry:
            await wait_for_choice(client, lambda m: m == "cheap", 10)  # the seeded pool reached dispatch
            assert (await ask(client))[0] == "cheap"
            failures = [registry_pb2.Outcome(model="cheap", success=False, error_code="UNAVAILABLE")] * 6
            await registry.report(failures)
            started = time.monotonic()
            picked, reason = await wait_for_choice(client, lambda m: m != "cheap", 5)
            assert picked == "mid" and "unhealthy" in reason
            assert time.monotonic() - started < 2.0  # the watch stream carried the change
            answered = [await ask(client) for _ in range(8)]
            assert all("cheap" not in models for models in answered)
            # Triton still serves the replay model: the registry's probe brings `cheap` back.
            await wait_for_choice(client, lambda m: m == "cheap", 20)
            assert (await ask(client))[0] == "cheap"
            # Dispatch reported its calls: the registry has live latency for `mid`.
            deadline = time.monotonic() + 5
            while (record := await registry.get("mid")).stats.time_to_first_token.ewma_ms <= 0:
                assert time.monotonic() < deadline, "no outcome for `mid` reached the registry"
                await asyncio.sleep(0.1)
            assert record.stats.error_rate == 0.0

    asyncio.run(scenario())
