"""Scale to zero and back on the real Triton with SmolLM2, through the scaler's Triton actuator.

Runs on the session's Triton (explicit model control): the model is unloaded after its idle time, a request
that arrives while it is unloaded waits for one shared load (``EnsureReady``) and is answered, and two
replicas are two model instances (a load with a config override). The model is left as it was found: loaded
with its repository's one instance. The policy runs on a fake clock; rounds are run by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from constellation.errors import NotFound
from constellation.triton import Sampling, TritonClient
from constellation.v1 import scaler_pb2
from services.inference.launcher import MODEL_REPOSITORY, TritonServer
from services.scaler.actuators import TritonActuator
from services.scaler.client import ScalerClient
from services.scaler.config import ScalerConfig
from services.scaler.main import RunningScaler, running_scaler
from services.scaler.policy import Knobs

MODEL = "smollm2"
KNOBS = Knobs(concurrency=1, max_replicas=2, window_s=10, idle_to_zero_s=60, up_cooldown_s=0, default_latency_s=1.0)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def wait_ready_state(triton: TritonClient, ready: bool, timeout_s: float = 60.0) -> None:
    """Polls Triton until the model's readiness is ``ready`` (an unload finishes in the background)."""
    async with asyncio.timeout(timeout_s):
        while await triton.model_ready(MODEL) != ready:  # noqa: ASYNC110 - Triton has no readiness event
            await asyncio.sleep(0.2)


@pytest.fixture
async def scaled(triton: TritonServer) -> AsyncIterator[tuple[RunningScaler, TritonActuator, FakeClock]]:
    clock = FakeClock()
    actuator = TritonActuator(triton.grpc_url, model_repository=MODEL_REPOSITORY, load_timeout_s=240)
    config = ScalerConfig(port=0, metrics_port=-1, models=[MODEL], model_knobs={MODEL: KNOBS})
    try:
        async with running_scaler(config, actuator=actuator, loop=False, clock=clock) as running:
            yield running, actuator, clock
    finally:
        restore = TritonActuator(triton.grpc_url, model_repository=MODEL_REPOSITORY, load_timeout_s=240)
        try:
            if await restore.replicas(MODEL) != 1:
                await restore.scale(MODEL, 1)  # other tests expect the repository's one instance
        finally:
            await restore.close()


async def test_scale_to_zero_and_back_answers_the_waiting_requests(
    scaled: tuple[RunningScaler, TritonActuator, FakeClock], triton: TritonServer
) -> None:
    running, actuator, clock = scaled
    address = f"127.0.0.1:{running.port}"
    async with TritonClient(triton.grpc_url) as inference, ScalerClient(address, traced=False) as scaler:
        [first] = await running.scaler.tick()
        assert (first.action, first.current) == ("hold", 1)

        clock.now += 61
        [idle] = await running.scaler.tick()
        assert (idle.action, idle.target) == ("scale_to_zero", 0)
        await wait_ready_state(inference, False)
        assert await actuator.replicas(MODEL) == 0
        with pytest.raises(NotFound):  # sent straight to Triton, a request for an unloaded model fails ...
            await inference.complete(MODEL, "Hi", Sampling(max_tokens=2), timeout_s=30)

        # ... so a burst of three requests first waits for the model: one load serves them all.
        loads_before = actuator.loads
        readiness = await asyncio.gather(*(scaler.ensure_ready(MODEL) for _ in range(3)))
        assert actuator.loads == loads_before + 1
        assert all(r.replicas == 1 for r in readiness) and any(r.cold_start for r in readiness)
        answers = await asyncio.gather(
            *(
                inference.complete(
                    MODEL, "What is the capital of France?", Sampling(max_tokens=8, seed=1), timeout_s=120
                )
                for _ in readiness
            )
        )
        assert all(a.text.strip() and a.output_tokens > 0 for a in answers)
        status = await scaler.status()
        assert status.models[0].replicas == 1
        assert status.models[0].last_decision.action == scaler_pb2.SCALING_ACTION_SCALE_FROM_ZERO

        # 17 more requests, 20 in the 10 s window at 1 s each: 2 in flight, so 2 replicas = 2 Triton instances.
        await scaler.record_arrivals({MODEL: 17})
        [up] = await running.scaler.tick()
        assert (up.action, up.target) == ("scale_up", 2)
        assert await actuator.replicas(MODEL) == 2
        answer = await inference.complete(MODEL, "Say hello.", Sampling(max_tokens=4), timeout_s=120)
        assert answer.output_tokens > 0
