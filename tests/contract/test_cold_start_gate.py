"""The wait for a cold model, against a real scaler server on port 0 (real ScalerClient, real stubs).

Only the actuator is a fake: :class:`SlowLoads` stands where Triton's model control stands and takes a
fixed time to load, so that a burst can arrive while one load runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from constellation.errors import Unavailable
from services.dispatch.capacity import ArrivalReporter, CallCapacity, ColdStartGate
from services.dispatch.events import Finished
from services.scaler.actuators import KedaActuator, TargetBoard
from services.scaler.client import ScalerClient
from services.scaler.config import ScalerConfig
from services.scaler.main import RunningScaler, running_scaler
from tests.unit.dispatch_fakes import FakeGenerator, Script, config, plan, planned, run_plan

LOAD_S = 0.3


class SlowLoads(KedaActuator):
    """A fake actuator: models start at zero replicas and a load from zero takes ``LOAD_S``."""

    name = "slow-loads"

    def __init__(self) -> None:
        super().__init__(TargetBoard(), initial=0)
        self.loads = 0

    async def scale(self, model: str, replicas: int) -> None:
        if replicas > 0 and (self.board.get(model) or 0) == 0:
            self.loads += 1
            await asyncio.sleep(LOAD_S)
        await super().scale(model, replicas)


@dataclass
class Mesh:
    running: RunningScaler
    actuator: SlowLoads
    client: ScalerClient
    cold: dict[str, float]
    """Expected cold start per model, in seconds (what the registry would say)."""

    def expected(self, model: str) -> float:
        capacity = self.running.scaler.capacity.get(model)
        return 0.0 if capacity is not None and capacity.replicas > 0 else self.cold.get(model, 0.0)


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    actuator = SlowLoads()
    config = ScalerConfig(port=0, metrics_port=-1, actuator="keda", shutdown_grace_s=0.5)
    async with running_scaler(config, actuator=actuator, loop=False) as running:
        async with ScalerClient(f"127.0.0.1:{running.port}", traced=False) as client:
            yield Mesh(running, actuator, client, {"big": LOAD_S})


def _far() -> float:
    return time.perf_counter() + 30.0


async def test_a_burst_for_a_cold_model_waits_for_one_load(mesh: Mesh) -> None:
    gate = ColdStartGate(mesh.client, mesh.expected, lambda: False)
    started = time.perf_counter()
    await asyncio.gather(*(gate.admit("big", _far()) for _ in range(20)))
    assert time.perf_counter() - started >= LOAD_S
    assert mesh.actuator.loads == 1
    assert mesh.running.scaler.capacity["big"].replicas >= 1
    await gate.admit("big", _far())  # warm now: no wait, no load
    assert mesh.actuator.loads == 1


async def test_the_queue_is_bounded_while_a_warm_model_could_answer(mesh: Mesh) -> None:
    gate = ColdStartGate(mesh.client, mesh.expected, lambda: True, queue_max=3)
    outcomes = await asyncio.gather(*(gate.admit("big", _far()) for _ in range(10)), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, Unavailable)]
    assert len(refused) == 7 and {e.reason for e in refused} == {"COLD_QUEUE_FULL"}
    assert outcomes.count(None) == 3
    assert mesh.actuator.loads == 1


async def test_a_deadline_shorter_than_the_load_is_turned_away_without_a_load(mesh: Mesh) -> None:
    gate = ColdStartGate(mesh.client, mesh.expected, lambda: True)
    with pytest.raises(Unavailable) as error:
        await gate.admit("big", time.perf_counter() + LOAD_S / 3)
    assert error.value.reason == "COLD_START_TOO_LONG"
    assert mesh.actuator.loads == 0


async def test_a_turned_away_call_is_answered_by_the_warm_reserve(mesh: Mesh) -> None:
    mesh.cold["big"] = 60.0  # a load that outlasts the request's 10 s
    gate = ColdStartGate(mesh.client, mesh.expected, lambda: True)
    fake = FakeGenerator({"big": Script("big answer"), "small": Script("small answer")})
    made = plan("single", [planned("big")], [planned("small", chosen=False)])
    events = await run_plan(made, fake, config(), capacity=CallCapacity(None, gate))
    done = events[-1]
    assert isinstance(done, Finished) and done.text == "small answer"
    assert list(fake.started) == ["small"]  # the cold model was never called
    assert [e.reason for e in done.problems] == ["COLD_START_TOO_LONG"]


async def test_with_nothing_warm_the_call_waits_for_the_load_and_is_answered(mesh: Mesh) -> None:
    arrivals = ArrivalReporter(mesh.client)
    gate = ColdStartGate(mesh.client, mesh.expected, lambda: False, queue_max=1)
    fake = FakeGenerator({"big": Script("big answer")})
    events = await run_plan(plan("single", [planned("big")]), fake, config(), capacity=CallCapacity(arrivals, gate))
    done = events[-1]
    assert isinstance(done, Finished) and done.text == "big answer" and not done.problems
    assert mesh.actuator.loads == 1
    assert arrivals.pending == {"big": 1}
    await arrivals.flush()
    # One arrival from the load's EnsureReady, one from the reporter's RecordArrivals.
    assert mesh.running.scaler.arrivals.rate("big", 60.0, time.monotonic()) * 60.0 == pytest.approx(2.0)


async def test_a_burst_over_pool_models_of_one_deployment_loads_it_once(mesh: Mesh) -> None:
    # "a" and "b" are recorded models that one Triton model ("big") serves: its load makes both warm.
    gate = ColdStartGate(mesh.client, lambda model: mesh.expected("big"), lambda: False)
    await asyncio.gather(*(gate.admit(model, _far(), deployment="big") for model in ["a", "b"] * 5))
    assert mesh.actuator.loads == 1
    assert set(mesh.running.scaler.capacity) == {"big"}
