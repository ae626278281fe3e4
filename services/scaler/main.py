"""Runs the scaler service: ``python -m services.scaler.main``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from constellation.keda import externalscaler_pb2_grpc
from constellation.server import Registration, RunningServer, serving
from constellation.service import Flag, ServiceMain
from constellation.v1 import scaler_pb2_grpc
from services.registry.client import RegistryClient, RegistryView
from services.scaler.actuators import Actuator, KedaActuator, TargetBoard, TritonActuator
from services.scaler.config import ScalerConfig
from services.scaler.policy import Clock, LatencySource, ScalingPolicy
from services.scaler.reporting import RegistryStates, StateReporter
from services.scaler.scaler import Scaler
from services.scaler.servicer import EXTERNAL_SCALER_NAME, SERVICE_NAME, ExternalScalerServicer, ScalerServicer
from services.scaler.sources import ArrivalWindow, FixedLatency, RecordLatency

log = logging.getLogger(__name__)


@dataclass
class RunningScaler:
    """A started scaler server and the parts tests look at."""

    server: RunningServer
    scaler: Scaler
    board: TargetBoard

    @property
    def port(self) -> int:
        return self.server.port


def build_actuator(config: ScalerConfig, board: TargetBoard) -> Actuator:
    if config.actuator == "keda":
        return KedaActuator(board)
    repository = Path(config.model_repository) if config.model_repository else None
    return TritonActuator(config.triton_url, model_repository=repository, load_timeout_s=config.load_timeout_s)


def registrations(config: ScalerConfig, scaler: Scaler, board: TargetBoard, wall_offset_s: float) -> list[Registration]:
    """ScalerService always; KEDA's ExternalScaler with the ``keda`` actuator (the one that publishes)."""
    mounted = [
        Registration(
            ScalerServicer(scaler, wall_offset_s),
            scaler_pb2_grpc.add_ScalerServiceServicer_to_server,  # type: ignore[arg-type]
            SERVICE_NAME,
        )
    ]
    if config.actuator == "keda":
        mounted.append(
            Registration(
                ExternalScalerServicer(board, config.keda_metric_prefix),
                externalscaler_pb2_grpc.add_ExternalScalerServicer_to_server,  # type: ignore[arg-type]
                EXTERNAL_SCALER_NAME,
            )
        )
    return mounted


@asynccontextmanager
async def running_scaler(
    config: ScalerConfig, *, actuator: Actuator | None = None, loop: bool = True, clock: Clock = time.monotonic
) -> AsyncIterator[RunningScaler]:
    """Starts the scaler (port 0 picks a free one) with its decision loop; stops both on exit.

    Args:
        config: Service settings.
        actuator: Replaces the one ``config`` names (tests).
        loop: Run decisions every ``interval_s``; false leaves rounds to the caller (``scaler.tick()``).
        clock: Monotonic seconds for the policy (tests move a fake one).
    """
    board = TargetBoard()
    async with AsyncExitStack() as stack:
        latency: LatencySource = FixedLatency({})
        states: StateReporter | None = None
        if config.registry_address:
            view = await stack.enter_async_context(RegistryView(config.registry_address))
            latency = RecordLatency(lambda: view.models, config.output_tokens)
            states = RegistryStates(await stack.enter_async_context(RegistryClient(config.registry_address)))
        arrivals = ArrivalWindow(clock)
        policy = ScalingPolicy(
            demand=arrivals,
            latency=latency,
            clock=clock,
            tiers=config.tiers,
            model_tiers=config.model_tiers,
            model_knobs=config.model_knobs,
        )
        scaler = Scaler(
            policy,
            actuator or build_actuator(config, board),
            arrivals,
            config.models,
            interval_s=config.interval_s,
            dry_run=config.dry_run,
            states=states,
        )
        stack.push_async_callback(scaler.close)
        server = await stack.enter_async_context(
            serving(registrations(config, scaler, board, time.time() - clock()), config)
        )
        if loop:
            task = asyncio.create_task(scaler.run(), name="scaler-loop")
            stack.push_async_callback(_cancel, task)
        yield RunningScaler(server, scaler, board)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _details(running: RunningScaler) -> str:
    return f"actuator {running.scaler.actuator.name}, {len(running.scaler.capacity)} models"


SERVICE = ServiceMain(
    name="scaler",
    config=ScalerConfig,
    description="Run the scaler service (ScalerService, and KEDA's ExternalScaler with --actuator keda): "
    "replicas per model from Little's law, warm floors, scale-to-zero. Settings come from the [scaler] "
    "table of the config file and CONSTELLATION_SCALER_* variables; flags override both.",
    lifespan=running_scaler,
    flags=(
        Flag("--actuator", choices=["triton", "keda"], help="what carries decisions out"),
        Flag("--triton-url", help="Triton gRPC host:port (triton actuator)"),
        Flag("--registry-address", help="registry host:port for live latency (and load times)"),
        Flag("--model", action="append", dest="models", help="model to manage (repeatable)"),
        Flag("--dry-run", action="store_const", const=True, default=None, help="decide and report, never apply"),
    ),
    details=_details,
)


def main(argv: list[str] | None = None) -> None:
    SERVICE.main(argv)


if __name__ == "__main__":
    main()
