"""Server bootstrap shared by every service.

:func:`create_server` builds an aio server with the stock health service, server reflection, the
OpenTelemetry and metrics interceptors, and binds it; tests call it with port 0 and get the port back.
:func:`serving` holds one for the length of an ``async with`` block (registered in Consul when
configured); :func:`run_until_stopped` runs a service's lifespan until SIGINT/SIGTERM.

Shutdown after a signal drains in three steps: health turns NOT_SERVING at once while calls are
still accepted for ``shutdown_notice_s`` (so a balancer sees it and stops sending), then new calls are
refused and in-flight ones get ``shutdown_grace_s`` (sized for LLM streams) to finish; a response stream
still running just before that window ends gets a last message with an UNAVAILABLE status
(:mod:`constellation.drain`). Every server also answers undecodable request bytes with INVALID_ARGUMENT
(:mod:`constellation.wire`). :mod:`constellation.service` builds a service's ``main`` from these.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from constellation import consul, telemetry, tls
from constellation.auth import Authenticator, AuthInterceptor, SqliteKeys, keys_db_path
from constellation.config import LOOPBACK_HOSTS, ServiceConfig
from constellation.drain import CutMessage, StreamEndInterceptor
from constellation.errors import FailedPrecondition
from constellation.metrics import RpcMetricsInterceptor, start_metrics_server
from constellation.wire import UndecodableRequestInterceptor

log = logging.getLogger(__name__)

T = TypeVar("T")

# Largest message a service accepts or sends (a prompt plus candidates fits well inside).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


@dataclass
class Registration:
    """One servicer to mount: ``add(servicer, server)`` is the generated ``add_*_to_server``.

    ``cut_messages`` maps a response-streaming method's name (``Ask``) to the last message a stream
    cut by shutdown gets; a stream without one ends with a rich UNAVAILABLE status instead.
    ``endless`` names streams that never end by themselves (watches): they are cut when the drain
    starts instead of holding it to its end.
    """

    servicer: object
    add: Callable[[object, grpc.aio.Server], None]
    service_full_name: str
    cut_messages: dict[str, CutMessage] = field(default_factory=dict)
    endless: frozenset[str] = frozenset()

    def cut_methods(self) -> dict[str, CutMessage]:
        """``cut_messages`` keyed by full method path (``/pkg.Service/Method``), as interceptors see it."""
        return {f"/{self.service_full_name}/{name}": build for name, build in self.cut_messages.items()}

    def endless_methods(self) -> frozenset[str]:
        return frozenset(f"/{self.service_full_name}/{name}" for name in self.endless)


@dataclass
class RunningServer:
    """A bound, started server and what belongs to it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    services: list[str] = field(default_factory=list)
    metrics_port: int | None = None
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    """Set just before the drain window ends: response streams still running get their last message."""
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the drain window starts (new calls refused): endless streams end then."""

    async def announce_shutdown(self, notice_s: float) -> None:
        """Turns health NOT_SERVING, then keeps accepting calls for ``notice_s`` seconds (balancers look)."""
        await self.health.enter_graceful_shutdown()
        if notice_s > 0:
            await asyncio.sleep(notice_s)

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING, new calls refused, in-flight ones get ``grace`` seconds, then the rest is cut.

        Response streams are cut (a last message or UNAVAILABLE, :mod:`constellation.drain`) a moment
        before ``grace`` ends, so that the cut reaches callers before grpc cancels the calls.
        """
        await self.health.enter_graceful_shutdown()
        self.draining.set()
        margin = min(1.0, grace / 10)
        cutter = asyncio.create_task(self._cut_after(max(0.0, grace - margin)))
        try:
            await self.server.stop(grace)
        finally:
            cutter.cancel()

    async def _cut_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self.cut.set()


def check_exposure(config: ServiceConfig) -> None:
    """Refuses a non-loopback bind without authentication unless ``security.insecure`` says so."""
    security = config.security
    if config.host not in LOOPBACK_HOSTS and not security.auth and not security.insecure:
        raise FailedPrecondition(
            f"{config.service_name}: binding {config.host} without authentication would let anyone who reaches "
            "the port own the mesh; turn on security.auth (API keys), or pass --insecure to do it anyway",
            reason="INSECURE_BIND",
        )


def auth_interceptors(config: ServiceConfig, authenticator: Authenticator | None) -> list[grpc.aio.ServerInterceptor]:
    """The key-checking interceptor when ``security.auth`` is on (keys read from ``security.keys_db``)."""
    if not config.security.auth:
        return []
    if authenticator is None:
        authenticator = Authenticator(SqliteKeys(keys_db_path(config.security.keys_db)))
    return [AuthInterceptor(authenticator, config.service_name)]


def bind(server: grpc.aio.Server, config: ServiceConfig) -> int:
    """Binds ``config.address``, over TLS when a certificate is configured; returns the port."""
    security = config.security
    if not security.tls_cert:
        return server.add_insecure_port(config.address)
    credentials = tls.server_credentials(
        security.tls_cert, security.tls_key, security.tls_ca, require_client_auth=security.mtls
    )
    return server.add_secure_port(config.address, credentials)


async def create_server(
    registrations: Sequence[Registration],
    config: ServiceConfig,
    *,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    authenticator: Authenticator | None = None,
) -> RunningServer:
    """Builds, binds and starts a server for ``registrations``.

    Args:
        registrations: The servicers to mount. Each is reported SERVING on the health service, by
            its full name and as the overall ("") status.
        config: Bind address, metrics port and tracing settings.
        interceptors: Extra interceptors, run after the stream-end, tracing, metrics and key-checking ones
            and before the undecodable-request one (innermost).
        authenticator: Verifies keys when ``config.security.auth`` is on; None reads ``security.keys_db``.

    Returns:
        The started server with its bound port (useful when ``config.port`` is 0).

    Raises:
        FailedPrecondition: a non-loopback bind without authentication and without ``--insecure``.
    """
    check_exposure(config)
    telemetry.configure_tracing(config.service_name, traces_file=config.traces_file or None)
    cut, draining = asyncio.Event(), asyncio.Event()
    cut_messages = {path: build for r in registrations for path, build in r.cut_methods().items()}
    endless = frozenset(path for r in registrations for path in r.endless_methods())
    server = grpc.aio.server(
        interceptors=[
            StreamEndInterceptor(cut, cut_messages, config.service_name, draining=draining, endless=endless),
            *telemetry.server_interceptors(),
            RpcMetricsInterceptor(),
            *auth_interceptors(config, authenticator),
            *interceptors,
            UndecodableRequestInterceptor(),
        ],
        options=SERVER_OPTIONS,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [r.service_full_name for r in registrations]
    for registration in registrations:
        registration.add(registration.servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = bind(server, config)
    if port == 0:
        raise OSError(f"could not bind {config.address}: is another process using the port?")
    await server.start()
    for name in [*names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_port = None
    if config.metrics_port >= 0:
        metrics_port = start_metrics_server(config.metrics_port, config.host)
    log.info("%s listening on %s:%d (metrics %s)", config.service_name, config.host, port, metrics_port)
    return RunningServer(server, port, health_servicer, names, metrics_port, cut, draining)


@asynccontextmanager
async def serving(
    registrations: Sequence[Registration],
    config: ServiceConfig,
    *,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    authenticator: Authenticator | None = None,
) -> AsyncIterator[RunningServer]:
    """A server for the lifetime of the ``async with`` block: what every service's lifespan ends in.

    Starts the server (:func:`create_server`); with ``consul_http_addr`` set, registers the instance in
    Consul (``constellation-<service>``, with a gRPC health check) while the block runs and deregisters
    it first on the way out. On exit, health turns NOT_SERVING, then in-flight calls get
    ``config.shutdown_grace_s`` seconds before they are cancelled.
    """
    running = await create_server(registrations, config, interceptors=interceptors, authenticator=authenticator)
    _SERVING.append((running, config.shutdown_notice_s))
    try:
        if config.consul_http_addr:
            name = consul.service_name(config.service_name)
            async with consul.registered_in_consul(config.consul_http_addr, name, config.advertised_host, running.port):
                yield running
        else:
            yield running
    finally:
        _SERVING[:] = [entry for entry in _SERVING if entry[0] is not running]
        log.info("%s shutting down (drain %.1fs)", config.service_name, config.shutdown_grace_s)
        await running.stop(config.shutdown_grace_s)


_SERVING: list[tuple[RunningServer, float]] = []
"""Servers held by :func:`serving` in this process, with their shutdown notice (seconds)."""


async def announce_shutdown() -> None:
    """Turns every held server NOT_SERVING and waits out the longest notice (after a stop signal)."""
    if not _SERVING:
        return
    await asyncio.gather(*(running.announce_shutdown(notice) for running, notice in list(_SERVING)))


async def wait_for_stop_signal() -> None:
    """Returns at the first SIGINT or SIGTERM; the handlers are removed again on the way out."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_until_stopped(
    lifespan: AbstractAsyncContextManager[T], on_started: Callable[[T], None] | None = None
) -> None:
    """Enters ``lifespan`` (a server and what it depends on), runs until SIGINT/SIGTERM, then leaves it.

    Leaving the lifespan closes its parts in reverse order of opening (the server first, then the clients
    and background tasks it used). The spans still buffered are exported before this returns.
    """
    try:
        async with lifespan as running:
            if on_started is not None:
                on_started(running)
            await wait_for_stop_signal()
            await announce_shutdown()
    finally:
        # A flush, not a shutdown: the provider is process-wide, and a server run in-process (tests)
        # must leave it usable.
        provider = trace.get_tracer_provider()
        if isinstance(provider, TracerProvider):
            await asyncio.to_thread(provider.force_flush)


async def serve(
    registrations: Sequence[Registration],
    config: ServiceConfig,
    *,
    on_started: Callable[[RunningServer], None] | None = None,
) -> None:
    """Runs a server for ``registrations`` until SIGINT or SIGTERM, then shuts it down gracefully.

    With ``consul_http_addr`` set, the instance is registered in Consul while it serves (see :func:`serving`).
    """
    await run_until_stopped(serving(registrations, config), on_started)
