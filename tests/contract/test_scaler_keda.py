"""The scaler over real gRPC on loopback: KEDA's four external scaler RPCs, called by a client built from the
contract, and ScalerService (arrivals, status, dry-run). The KEDA actuator publishes the targets; the policy
runs on a fake clock that the test moves, and rounds are run by hand (``scaler.tick()``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from constellation.errors import InvalidArgument
from constellation.keda import externalscaler_pb2, externalscaler_pb2_grpc
from constellation.v1 import scaler_pb2
from services.scaler.client import ScalerClient
from services.scaler.config import ScalerConfig
from services.scaler.main import RunningScaler, running_scaler
from services.scaler.policy import Knobs
from services.scaler.servicer import EXTERNAL_SCALER_NAME, SERVICE_NAME
from tests.grpc_checks import SERVING, serving


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


KNOBS = Knobs(concurrency=1, max_replicas=5, window_s=10, idle_to_zero_s=60, default_latency_s=2.0, up_cooldown_s=0)


@pytest.fixture
async def scaler_server() -> AsyncIterator[tuple[RunningScaler, FakeClock]]:
    clock = FakeClock()
    config = ScalerConfig(port=0, metrics_port=-1, actuator="keda", models=["llama"], model_knobs={"llama": KNOBS})
    async with running_scaler(config, loop=False, clock=clock) as running:
        yield running, clock


def ref(name: str = "triton-llama", model: str = "llama") -> externalscaler_pb2.ScaledObjectRef:
    return externalscaler_pb2.ScaledObjectRef(name=name, namespace="models", scalerMetadata={"model": model})


async def test_keda_client_follows_the_targets(scaler_server: tuple[RunningScaler, FakeClock]) -> None:
    running, clock = scaler_server
    address = f"127.0.0.1:{running.port}"
    assert await serving(address, (SERVICE_NAME, EXTERNAL_SCALER_NAME)) == [SERVING, SERVING]
    async with grpc.aio.insecure_channel(address) as channel, ScalerClient(address, traced=False) as client:
        keda = externalscaler_pb2_grpc.ExternalScalerStub(channel)
        spec = await keda.GetMetricSpec(ref(), timeout=5)
        assert [(s.metricName, s.targetSize, s.targetSizeFloat) for s in spec.metricSpecs] == [
            ("constellation-replicas-llama", 1, 1.0)
        ]
        assert (await keda.IsActive(ref(), timeout=5)).result is False  # nothing published yet
        stream = keda.StreamIsActive(ref(), timeout=30)
        assert (await stream.read()).result is False

        # 20 requests in the 10 s window at 2 s each: 4 in flight, 1 per replica -> 4 replicas.
        assert await client.record_arrivals({"llama": 20}) == 20
        clock.now += 1
        [decision] = await running.scaler.tick()
        assert (decision.action, decision.target) == ("scale_up", 4)
        assert (await stream.read()).result is True
        assert (await keda.IsActive(ref(), timeout=5)).result is True
        metrics = await keda.GetMetrics(
            externalscaler_pb2.GetMetricsRequest(scaledObjectRef=ref(), metricName="s0-constellation-replicas-llama"),
            timeout=5,
        )
        assert [(v.metricName, v.metricValue, v.metricValueFloat) for v in metrics.metricValues] == [
            ("s0-constellation-replicas-llama", 4, 4.0)
        ]

        status = await client.status()
        [model] = status.models
        assert (status.actuator, status.dry_run) == ("keda", False)
        assert (model.model, model.replicas, model.target_replicas) == ("llama", 4, 4)
        assert model.last_decision.action == scaler_pb2.SCALING_ACTION_SCALE_UP
        assert model.last_decision.applied and "2 req/s x 2 s = 4 in flight" in model.last_decision.reason

        clock.now += 61  # idle past the timeout: to zero, and KEDA sees the model inactive
        [decision] = await running.scaler.tick()
        assert decision.action == "scale_to_zero"
        assert (await stream.read()).result is False
        assert (await keda.IsActive(ref(), timeout=5)).result is False
        metrics = await keda.GetMetrics(externalscaler_pb2.GetMetricsRequest(scaledObjectRef=ref()), timeout=5)
        assert metrics.metricValues[0].metricValueFloat == 0.0
        stream.cancel()


async def test_dry_run_decides_but_publishes_nothing(scaler_server: tuple[RunningScaler, FakeClock]) -> None:
    running, _ = scaler_server
    address = f"127.0.0.1:{running.port}"
    async with grpc.aio.insecure_channel(address) as channel, ScalerClient(address, traced=False) as client:
        keda = externalscaler_pb2_grpc.ExternalScalerStub(channel)

        async def published() -> float:
            request = externalscaler_pb2.GetMetricsRequest(scaledObjectRef=ref())
            return (await keda.GetMetrics(request, timeout=5)).metricValues[0].metricValueFloat

        assert await client.set_dry_run(True) is True
        await client.record_arrivals(["llama"] * 10)
        [decision] = await running.scaler.tick()
        assert (decision.action, decision.target) == ("scale_up", 2)
        assert await published() == 1.0  # the model's starting replicas, not the decision
        status = await client.status()
        assert status.dry_run and not status.models[0].last_decision.applied
        assert await client.set_dry_run(False) is False
        await running.scaler.tick()
        assert await published() == 2.0


async def test_a_scaled_object_without_metadata_is_its_model_and_bad_arrivals_are_rejected(
    scaler_server: tuple[RunningScaler, FakeClock],
) -> None:
    running, _ = scaler_server
    address = f"127.0.0.1:{running.port}"
    async with grpc.aio.insecure_channel(address) as channel, ScalerClient(address, traced=False) as client:
        keda = externalscaler_pb2_grpc.ExternalScalerStub(channel)
        bare = externalscaler_pb2.ScaledObjectRef(name="mistral", namespace="models")
        spec = await keda.GetMetricSpec(bare, timeout=5)
        assert spec.metricSpecs[0].metricName == "constellation-replicas-mistral"
        with pytest.raises(InvalidArgument):
            await client.record_arrivals({"": 1})
        ready = await asyncio.wait_for(client.ensure_ready("llama"), 10)
        assert ready.replicas >= 1
