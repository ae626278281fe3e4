"""Runs the scaler service: ``python -m services.scaler.main``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from constellation.config import load_config
from constellation.keda import externalscaler_pb2_grpc
from constellation.server import Registration, RunningServer, create_server
from constellation.v1 import scaler_pb2_grpc
from services.registry.client import RegistryView
from services.scaler.actuators import Actuator, KedaActuator, TargetBoard, TritonActuator
from services.scaler.config import ScalerConfig
from services.scaler.policy import Clock, LatencySource, ScalingPolicy
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
        if config.registry_address:
            view = await stack.enter_async_context(RegistryView(config.registry_address))
            latency = RecordLatency(lambda: view.models, config.output_tokens)
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
        )
        stack.push_async_callback(scaler.close)
        server = await create_server(registrations(config, scaler, board, time.time() - clock()), config)
        stack.push_async_callback(server.stop, config.shutdown_grace_s)
        if loop:
            task = asyncio.create_task(scaler.run(), name="scaler-loop")
            stack.push_async_callback(_cancel, task)
        yield RunningScaler(server, scaler, board)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _main(config: ScalerConfig) -> None:
    import signal

    async with running_scaler(config) as running:
        print(f"scaler listening on {config.host}:{running.port} (actuator {config.actuator})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("scaler shutting down (grace %.1fs)", config.shutdown_grace_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.scaler.main",
        description="Run the scaler service (ScalerService, and KEDA's ExternalScaler with --actuator keda): "
        "replicas per model from Little's law, warm floors, scale-to-zero. Settings come from the [scaler] "
        "table of the config file and CONSTELLATION_SCALER_* variables; flags override both.",
    )
    parser.add_argument("--config", help="TOML config file (default: ./constellation.toml if present)")
    parser.add_argument("--port", type=int, help="gRPC port (default 50056; 0 picks a free one)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (-1 disables)")
    parser.add_argument("--actuator", choices=["triton", "keda"], help="what carries decisions out")
    parser.add_argument("--triton-url", help="Triton gRPC host:port (triton actuator)")
    parser.add_argument("--model", action="append", dest="models", help="model to manage (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="decide and report, never apply")
    args = parser.parse_args(argv)
    overrides = {
        "port": args.port,
        "metrics_port": args.metrics_port,
        "actuator": args.actuator,
        "triton_url": args.triton_url,
        "models": args.models,
        "dry_run": True if args.dry_run else None,
    }
    config = load_config(ScalerConfig, args.config, **overrides)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_main(config))


if __name__ == "__main__":
    main()
