"""Runs the dispatch service: ``python -m services.dispatch.main`` (or ``constellation serve dispatch``)."""

from __future__ import annotations

import os

# Before numpy loads: the router's one matrix-vector product per request (train embeddings x query) takes
# 0.5 ms on one thread, while OpenBLAS's default worker threads spin after it for ~50 ms of CPU
# (bench.line_rate: dispatch's CPU per balanced request 61.7 -> 9.7 ms). An operator's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from aiohttp.typedefs import Middleware
from grpc_health.v1 import health_pb2

from constellation import consul
from constellation.auth import Authenticator, SqliteKeys, http_middleware, keys_db_path
from constellation.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from constellation.server import Registration, RunningServer, serving
from constellation.service import Flag, ServiceMain, disable
from constellation.tasks import cancel_and_wait
from constellation.triton import TritonClient
from constellation.v1 import dispatch_pb2_grpc
from services.classifier.client import ClassifierClient
from services.dispatch.bounds import BoundedPlanner
from services.dispatch.bounds import try_load as try_load_bounds
from services.dispatch.budget import TenantBudgets
from services.dispatch.capacity import any_warm, scaler_capacity
from services.dispatch.config import DispatchConfig
from services.dispatch.health import TritonWatch
from services.dispatch.http import SemanticCache, create_http_app, running_http
from services.dispatch.http.app import error_response
from services.dispatch.pipeline import Dispatcher
from services.dispatch.routing import Router, try_load_router
from services.dispatch.servicer import SERVICE_NAME, DispatchServicer, cut_response
from services.fusion.client import FusionClient
from services.ranking.client import RankingClient
from services.registry.client import OutcomeReporter, RegistryView

log = logging.getLogger(__name__)


def registrations(dispatcher: Dispatcher) -> list[Registration]:
    return [
        Registration(
            DispatchServicer(dispatcher),
            dispatch_pb2_grpc.add_DispatchServiceServicer_to_server,  # type: ignore[arg-type]
            SERVICE_NAME,
            cut_messages={"Ask": cut_response},
        )
    ]


def load_routing(config: DispatchConfig) -> Router | None:
    """The router dispatch uses: the trained artifact when there is one, else an untrained one (cost and
    latency decide, every model's quality is assumed 0.5), or None when routing is off."""
    if not config.routing:
        return None
    router, why = try_load_router(config.router_artifact or None)
    if why:
        if config.router_artifact:
            raise FailedPrecondition(why)
        log.warning("routing without a trained quality predictor: %s", why)
    elif router.predictor is not None:
        predictor = router.predictor
        log.info("router loaded: %d train prompts, %d models", len(predictor.embeddings), len(predictor.models))
    return router


PEERS = (
    ("classifier_url", "classifier"),
    ("registry_url", "registry"),
    ("ranking_url", "ranking"),
    ("fusion_url", "fusion"),
)


async def discover_peers(config: DispatchConfig) -> DispatchConfig:
    """``config`` with the address of each peer service it has none for, from Consul (when configured).

    A peer with no healthy instance stays unset (dispatch runs without it); Consul being unreachable
    is logged and changes nothing.
    """
    if not config.consul_http_addr:
        return config
    found: dict[str, str] = {}
    for field_name, component in PEERS:
        if getattr(config, field_name):
            continue
        try:
            endpoints = await consul.discover(config.consul_http_addr, consul.service_name(component))
        except Unavailable as exc:
            log.warning("Consul discovery failed, using the static configuration: %s", exc.message)
            return config
        if endpoints:
            found[field_name] = endpoints[0]
            log.info("discovered %s at %s through Consul", component, endpoints[0])
    return config.model_copy(update=found) if found else config


@asynccontextmanager
async def dispatcher_for(config: DispatchConfig) -> AsyncIterator[Dispatcher]:
    """A Dispatcher with its Triton client and, when configured (or found in Consul), its classifier,
    registry, ranking and fusion clients."""
    config = await discover_peers(config)
    async with AsyncExitStack() as stack:
        triton = await stack.enter_async_context(TritonClient(config.triton_url))
        classifier = None
        if config.classifier_url:
            classifier = await stack.enter_async_context(ClassifierClient(config.classifier_url))
        registry = reporter = None
        if config.registry_url:
            registry = await stack.enter_async_context(RegistryView(config.registry_url))
            reporter = await stack.enter_async_context(OutcomeReporter(config.registry_url))
            try:
                await registry.ready(config.registry_wait_s)
            except DeadlineExceeded:
                log.warning("registry at %s not reachable yet; routing on the catalog until it is", config.registry_url)
        ranking = fusion = None
        if config.ranking_url:
            ranking = await stack.enter_async_context(RankingClient(config.ranking_url))
        if config.fusion_url:
            fusion = await stack.enter_async_context(FusionClient(config.fusion_url))
        dispatcher = Dispatcher(
            config,
            triton,
            classifier,
            router=load_routing(config),
            registry=registry,
            reporter=reporter,
            ranking=ranking,
            fusion=fusion,
            budgets=TenantBudgets(config.budgets, SqliteKeys(keys_db_path(config.security.keys_db)).tenants),
            bounds=load_bounds(config),
        )
        if config.scaler_url:
            view = registry
            records = (lambda: view.models) if view is not None else None
            warm = any_warm(dispatcher.pool)
            capacity = scaler_capacity(config.scaler_url, records, warm, queue_max=config.cold_queue_max)
            dispatcher.tools.caller.capacity = await stack.enter_async_context(capacity)
        yield dispatcher


def http_auth(config: DispatchConfig) -> list[Middleware]:
    """The HTTP API's key check when ``security.auth`` is on (the same key table as gRPC)."""
    if not config.security.auth:
        return []
    authenticator = Authenticator(SqliteKeys(keys_db_path(config.security.keys_db)))
    return [http_middleware(authenticator, error_response)]


def load_bounds(config: DispatchConfig) -> BoundedPlanner | None:
    """The planner of error-bounded queries over the confusion artifact, or None when there is none
    (a configured artifact that cannot be loaded stops startup)."""
    kinds, why = try_load_bounds(config.confusion_artifact or None)
    if why:
        if config.confusion_artifact:
            raise FailedPrecondition(why)
        log.info("error-bounded queries are refused: %s", why)
        return None
    log.info("confusion matrices loaded: %s", ", ".join(f"{k.name} ({len(k.matrices)} models)" for k in kinds.values()))
    return BoundedPlanner(kinds)


@asynccontextmanager
async def running_dispatch(config: DispatchConfig) -> AsyncIterator[RunningServer]:
    """Dispatch's lifespan: its clients (:func:`dispatcher_for`), the gRPC server (port 0 picks a free one)
    and, when ``http_port`` is not -1, the OpenAI-compatible HTTP API on the same event loop (no extra hop)."""
    async with (
        dispatcher_for(config) as dispatcher,
        serving(registrations(dispatcher), config) as running,
        watching_triton(dispatcher, running),
    ):
        if config.http_port < 0:
            yield running
            return
        app = create_http_app(dispatcher, cache=SemanticCache(None), middlewares=http_auth(config))
        async with running_http(app, config.host, config.http_port) as http:
            log.info("dispatch HTTP API (OpenAI-compatible) on http://%s:%d/v1", config.host, http.port)
            yield running


@asynccontextmanager
async def watching_triton(dispatcher: Dispatcher, running: RunningServer) -> AsyncIterator[None]:
    """While the block runs, dispatch's health (overall and DispatchService) follows Triton's liveness
    (:class:`TritonWatch`, every ``triton_check_s``; 0 leaves it SERVING)."""
    interval = dispatcher.config.triton_check_s
    if interval <= 0:
        yield
        return

    async def follow(ready: bool) -> None:
        dispatcher.triton_up = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in [*running.services, ""]:
            await running.health.set(name, status)

    task = asyncio.create_task(TritonWatch(dispatcher.triton, follow, interval_s=interval).run())
    try:
        yield
    finally:
        await cancel_and_wait([task])


SERVICE = ServiceMain(
    name="dispatch",
    config=DispatchConfig,
    description="Run the dispatch service (DispatchService/Ask and Plan). Settings come from the "
    "[dispatch] table of the config file and CONSTELLATION_DISPATCH_* variables; flags override both.",
    lifespan=running_dispatch,
    flags=(
        Flag("--http-port", type=int, help="OpenAI-compatible HTTP API port (-1: none, the default; 0: any free)"),
        Flag("--triton-url", help="Triton gRPC endpoint host:port (default 127.0.0.1:8001)"),
        Flag("--models-file", help="JSON file of pool models: name -> {triton_model, parameters, prices}"),
        Flag("--classifier-url", help="ClassifierService host:port (default: none, no classification)"),
        Flag("--max-tokens-limit", type=int, help="largest sampling.max_tokens accepted (default 2048)"),
        Flag(
            "--router-artifact", help="trained router (`constellation train router`); default: the CURRENT one if any"
        ),
        Flag(
            "--confusion-artifact",
            help="confusion matrices (`constellation train confusion`) for error-bounded queries; default: CURRENT",
        ),
        disable("--no-routing", "routing", "send requests that name no model to --default-model"),
        Flag("--default-model", help="model asked when routing is off or the pool is empty (smollm2)"),
        Flag("--default-profile", choices=["quality", "balanced", "cost", "speed"]),
        disable("--no-early-stop", "early_stop", "fan-outs wait for every member"),
        disable("--no-hedging", "hedging", "never send backup requests to slow models"),
        Flag("--hedge-after-ms", type=float, help="hedge delay while a model's p95 is unknown (0: none)"),
        Flag("--ranking-url", help="RankingService host:port (orders open-answer fan-outs)"),
        Flag("--fusion-url", help="FusionService host:port (calibrated votes, generated answers)"),
        Flag(
            "--classify-timeout",
            dest="classify_timeout_s",
            type=float,
            help="seconds to wait for the classifier (default 0.5)",
        ),
        Flag("--registry-url", help="RegistryService host:port: live health/latency, outcomes reported"),
        Flag(
            "--triton-check",
            dest="triton_check_s",
            type=float,
            help="seconds between Triton liveness checks that health follows (default 2; 0: never)",
        ),
        Flag("--scaler-url", help="ScalerService host:port: arrivals reported, cold models loaded on demand"),
    ),
)


def main(argv: list[str] | None = None) -> None:
    SERVICE.main(argv)


if __name__ == "__main__":
    main()
