"""Runs the registry service: ``python -m services.registry.main`` (or ``constellation serve registry``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from constellation.auth import Authenticator
from constellation.server import Registration, RunningServer, serving
from constellation.service import Flag, ServiceMain, disable
from constellation.v1 import registry_pb2_grpc
from services.registry.allowlist import AllowList, allowed_probe
from services.registry.config import RegistryConfig
from services.registry.consul import ConsulAgent, ModelMirror
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
    """The registry's lifespan: opens the store, loads the seed file, starts the health prober, with
    Consul configured the KV mirror, and the server (port 0 picks a free one; registered in Consul when
    configured); closes all of them in reverse on exit.

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
                allowed_probe(readiness, AllowList([*config.probe_allow, config.triton_url])),
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
        registration = Registration(
            RegistryServicer(registry, config),
            registry_pb2_grpc.add_RegistryServiceServicer_to_server,  # type: ignore[arg-type]
            SERVICE_NAME,
            endless=frozenset({"WatchModels"}),  # ends when the drain starts; watchers reconnect
        )
        server = await stack.enter_async_context(
            serving([registration], config, authenticator=Authenticator(store, cache_s=0.0))
        )
        yield RunningRegistry(server, registry, prober, mirror)


SERVICE = ServiceMain(
    name="registry",
    config=RegistryConfig,
    description="Run the registry service (RegistryService): the model pool with live latency, error and "
    "quality statistics, health, and a watch stream for dispatch. Settings come from the [registry] table "
    "of the config file and CONSTELLATION_REGISTRY_* variables (CONSUL_HTTP_ADDR enables Consul); flags "
    "override both.",
    lifespan=running_registry,
    flags=(
        Flag("--db", help="SQLite file (default ~/.cache/constellation/registry.sqlite)"),
        Flag("--seed-file", help="pool file (TOML or JSON) upserted at start"),
        disable("--no-probes", "probes", "do not probe Triton for model readiness"),
    ),
    details=lambda running: f"{len(running.registry.records)} models, store {running.registry.store.path}",
)


def main(argv: list[str] | None = None) -> None:
    SERVICE.main(argv)


if __name__ == "__main__":
    main()
