"""The scaler tells the registry what capacity it made: COLD before scaling to zero, LOADING then READY with
the measured load time around a load from zero. Real registry and scaler servers on port 0, real stubs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from constellation.v1 import common_pb2, registry_pb2
from services.registry.client import RegistryClient
from services.registry.config import RegistryConfig
from services.registry.main import running_registry
from services.scaler.client import ScalerClient
from services.scaler.config import ScalerConfig
from services.scaler.main import running_scaler
from services.scaler.policy import Knobs

KNOBS = Knobs(concurrency=1, max_replicas=4, window_s=10, idle_to_zero_s=60, default_latency_s=2.0, up_cooldown_s=0)


class FakeClock:
    """The policy's clock, moved by hand (idle timeouts without waiting)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_scale_to_zero_and_back_is_recorded_in_the_registry(tmp_path: Path) -> None:
    registry_config = RegistryConfig(
        port=0, metrics_port=-1, db=str(tmp_path / "r.sqlite"), probes=False, shutdown_grace_s=0.5
    )
    async with running_registry(registry_config) as registry_server:
        address = f"127.0.0.1:{registry_server.port}"
        async with RegistryClient(address) as registry:
            await registry.register(registry_pb2.ModelRecord(name="llama", params_b=8.0))
            clock = FakeClock()
            config = ScalerConfig(
                port=0,
                metrics_port=-1,
                actuator="keda",
                registry_address=address,
                models=["llama"],
                model_knobs={"llama": KNOBS},
            )
            async with running_scaler(config, loop=False, clock=clock) as scaler_server:
                await scaler_server.scaler.tick()  # publishes the starting replica
                clock.now += 61
                [decision] = await scaler_server.scaler.tick()
                assert decision.action == "scale_to_zero"
                record = await registry.get("llama")
                assert (record.state, record.replicas) == (common_pb2.MODEL_STATE_COLD, 0)

                async with ScalerClient(f"127.0.0.1:{scaler_server.port}", traced=False) as scaler:
                    ready = await asyncio.wait_for(scaler.ensure_ready("llama"), 10)
                assert ready.cold_start and ready.replicas >= 1
                record = await registry.get("llama")
                assert record.state == common_pb2.MODEL_STATE_READY
                assert record.loads_measured == 1 and record.load_time_ms > 0
                assert record.replicas == ready.replicas
