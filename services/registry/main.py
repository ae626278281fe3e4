"""Runs the registry service: ``python -m services.registry.main`` (or ``constellation serve registry``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from constellation import consul
from constellation.config import load_config
from constellation.server import Registration, RunningServer, create_server
from constellation.v1 import registry_pb2_grpc
from services.registry.config import RegistryConfig
from services.registry.consul import ConsulAgent, ModelMirror, registered_in_consul
from services.registry.health import HealthPolicy, Probe, Prober, TritonReadiness
from services.registry.registry import Registry, RegistrySettings
from services.registry.seed import load_pool_file
from services.registry.servicer import SERVICE_NAME, RegistryServicer
from services.registry.stats import StatsSettings
from services.registry.store import ModelStore

log = logging.getLogger(__name__)


def settings_from(config: RegistryConfig) -> RegistrySettings:
    return RegistrySettings(
        stats=StatsSettings(
            ewma_alpha=config.ewma_alpha, window=config.latency_window, error_window=config.error_window
        ),
        health=HealthPolicy(
            error_rate_threshold=config.error_rate_threshold,
            min_calls=config.min_calls,
            max_consecutive_failures=config.max_consecutive_failures,
        ),
        coalesce_s=config.watch_coalesce_s,
        watch_queue_max=config.watch_queue_max,
        min_unhealthy_s=config.min_unhealthy_s,
    )


@dataclass
class RunningRegistry:
    """A started registry server and the parts tests and tools look at."""

    server: RunningServer
    registry: Registry
    prober: Prober | None
    mirror: ModelMirror | None

    @property
    def port(self) -> int:
        return self.server.port


@asynccontextmanager
async def running_registry(config: RegistryConfig, *, probe: Probe | None = None) -> AsyncIterator[RunningRegistry]:
    """Opens the store, loads the seed file, starts the server (port 0 picks a free one), the health
    prober and, with Consul configured, the instance registration and KV mirror; stops all on exit.

    Args:
        config: Service settings.
        probe: Readiness check of one model; Triton's ``ModelReady`` when None.
    """
    store = ModelStore(config.db_path)
    if store.migrated_from != store.schema_version:
        log.info("registry: migrated %s from schema %d to %d", store.path, store.migrated_from, store.schema_version)
    registry = Registry(store, settings_from(config))
    async with AsyncExitStack() as stack:
        stack.push_async_callback(registry.close)
        if config.seed_file:
            for record in load_pool_file(config.seed_file):
                registry.register(record)
            log.info("registry: upserted %s", config.seed_file)
        registry.start()
        prober = None
        if config.probes:
            readiness: Probe
            if probe is None:
                triton = TritonReadiness(config.probe_timeout_s)
                stack.push_async_callback(triton.close)
                readiness = triton
            else:
                readiness = probe
            prober = Prober(
                readiness,
                lambda: list(registry.records.values()),
                registry.apply_probe,
                interval_s=config.probe_interval_s,
                unhealthy_interval_s=config.unhealthy_probe_interval_s,
            )
            prober.start()
            stack.push_async_callback(prober.stop)
        mirror = None
        if config.consul_http_addr:
            agent = await stack.enter_async_context(ConsulAgent(config.consul_http_addr))
            mirror = ModelMirror(agent)
            registry.add_listener(mirror.changed)
            mirror.sync(list(registry.records.values()))
            mirror.start()
            stack.push_async_callback(mirror.stop)
            stack.push_async_callback(mirror.drain, 2.0)
        server = await create_server(
            [
                Registration(
                    RegistryServicer(registry, config),
                    registry_pb2_grpc.add_RegistryServiceServicer_to_server,  # type: ignore[arg-type]
                    SERVICE_NAME,
                )
            ],
            config,
        )
        stack.push_async_callback(server.stop, config.shutdown_grace_s)
        if config.consul_http_addr:
            await stack.enter_async_context(
                registered_in_consul(
                    config.consul_http_addr, consul.service_name("registry"), config.advertised_host, server.port
                )
            )
        yield RunningRegistry(server, registry, prober, mirror)


async def _main(config: RegistryConfig) -> None:
    import signal

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    async with running_registry(config) as running:
        print(
            f"registry listening on {config.host}:{running.port} ({len(running.registry.records)} models, "
            f"store {running.registry.store.path})",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("registry shutting down (grace %.1fs)", config.shutdown_grace_s)
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        await asyncio.to_thread(provider.shutdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="constellation serve registry",
        description="Run the registry service (RegistryService): the model pool with live latency, error and "
        "quality statistics, health, and a watch stream for dispatch. Settings come from the [registry] table "
        "of the config file and CONSTELLATION_REGISTRY_* variables (CONSUL_HTTP_ADDR enables Consul); flags "
        "override both.",
    )
    parser.add_argument("--config", help="TOML config file (default: ./constellation.toml if present)")
    parser.add_argument("--port", type=int, help="gRPC port (default 50053; 0 picks a free one)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (-1 disables)")
    parser.add_argument("--db", help="SQLite file (default ~/.cache/constellation/registry.sqlite)")
    parser.add_argument("--seed-file", help="pool file (TOML or JSON) upserted at start")
    parser.add_argument("--no-probes", action="store_true", help="do not probe Triton for model readiness")
    args = parser.parse_args(argv)
    overrides = {
        "port": args.port,
        "metrics_port": args.metrics_port,
        "db": args.db,
        "seed_file": args.seed_file,
        "probes": False if args.no_probes else None,
    }
    config = load_config(RegistryConfig, args.config, **overrides)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_main(config))


if __name__ == "__main__":
    main()
