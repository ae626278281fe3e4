"""Consul: service registration with a gRPC health check, discovery, and the KV store, through the
maintained ``py-consul`` client (imported as ``consul``; its ``consul.aio`` flavour runs on aiohttp).

Used only when ``CONSUL_HTTP_ADDR`` (or a service's ``consul_http_addr`` setting) is set. Every call has
a deadline; failures raise :class:`~constellation.errors.Unavailable` and never stop a service (a failed
registration is logged, discovery falls back to static configuration).

* :func:`registered_in_consul`: an instance registers itself with the local agent
  (``PUT /v1/agent/service/register``) with a gRPC health check (against the stock ``grpc.health.v1``
  service every Constellation server runs), and deregisters on exit
  (``PUT /v1/agent/service/deregister/<id>``).
* :func:`discover`: healthy endpoints of a service (``GET /v1/health/service/<name>?passing=1``).
* :class:`ConsulAgent` also writes the KV store (the registry mirrors model records there).

py-consul itself reads ``CONSUL_HTTP_TOKEN`` (over the ``token`` argument), ``CONSUL_HTTP_SSL`` and
``CONSUL_HTTP_SSL_VERIFY``, the standard Consul variables, as the Consul CLI does.
"""

from __future__ import annotations

import logging
import socket
import warnings
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import consul
import consul.aio

from constellation.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


def service_name(component: str) -> str:
    """The Consul service name of a Constellation component: ``constellation-<component>``."""
    return f"constellation-{component}"


@dataclass(frozen=True)
class Endpoint:
    """One healthy instance of a service."""

    service_id: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ConsulAgent:
    """A client of one Consul agent (py-consul's asyncio client). An async context manager; safe for
    concurrent calls.

    Args:
        address: The agent's HTTP address, ``http://host:8500`` (a bare ``host:port`` gets ``http://``).
        timeout_s: Deadline of each HTTP call, in seconds.
        token: ACL token sent as ``X-Consul-Token``, when the agent needs one.
    """

    def __init__(self, address: str, *, timeout_s: float = 3.0, token: str = ""):
        self.base = (address if "://" in address else f"http://{address}").rstrip("/")
        parts = urlsplit(self.base)
        with warnings.catch_warnings():
            # py-consul 1.8 hands aiohttp its deprecated ssl_context/verify_ssl arguments; nothing to act on here.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"consul\.aio")
            self._client = consul.aio.Consul(
                host=parts.hostname or "127.0.0.1",
                port=parts.port or 8500,
                scheme=parts.scheme,
                token=token or None,
                connections_timeout=timeout_s,
            )

    async def __aenter__(self) -> ConsulAgent:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        """Awaits one py-consul call; its failures become :class:`Unavailable` (the one mapping point)."""
        try:
            return await call
        except consul.ConsulException as exc:
            raise Unavailable(f"Consul {what} failed: {exc}", reason="CONSUL_ERROR") from exc
        except (aiohttp.ClientError, TimeoutError, consul.Timeout) as exc:
            raise Unavailable(f"Consul at {self.base} cannot be reached: {exc!r}", reason="CONSUL_UNREACHABLE") from exc

    async def register_service(
        self,
        name: str,
        service_id: str,
        host: str,
        port: int,
        *,
        check_interval_s: float = 10.0,
        deregister_after_s: float = 60.0,
        tags: tuple[str, ...] = (),
    ) -> None:
        """Registers an instance with a gRPC health check against ``host:port`` (no TLS).

        Args:
            check_interval_s: How often the agent dials the health service, in seconds.
            deregister_after_s: The agent removes the instance after its check has been critical this
                long, in seconds (covers a process that died without deregistering).
        """
        check: dict[str, Any] = consul.Check.grpc(
            f"{host}:{port}",
            f"{check_interval_s:g}s",
            use_tls=False,
            timeout="2s",
            deregister=f"{deregister_after_s:g}s",
        )
        check["Name"] = f"{name} gRPC health"
        register = self._client.agent.service.register(
            name, service_id=service_id, address=host, port=port, tags=list(tags), check=check
        )
        await self._confirm(f"register of {service_id}", register)

    async def deregister_service(self, service_id: str) -> None:
        await self._confirm(f"deregister of {service_id}", self._client.agent.service.deregister(service_id))

    async def _confirm(self, what: str, call: Awaitable[bool]) -> None:
        """Agent calls answer a bool: py-consul returns False (no exception) for a 404 such as an unknown id."""
        if not await self._call(what, call):
            raise Unavailable(f"Consul {what} failed: the agent does not know it (404)", reason="CONSUL_ERROR")

    async def put_kv(self, key: str, value: bytes) -> None:
        await self._call(f"put of {key}", self._client.kv.put(key, value))

    async def delete_kv(self, key: str) -> None:
        await self._call(f"delete of {key}", self._client.kv.delete(key))

    async def healthy(self, service: str) -> list[Endpoint]:
        """Instances of ``service`` whose checks all pass, in Consul's order."""
        _, entries = await self._call(f"health of {service}", self._client.health.service(service, passing=True))
        endpoints = []
        for entry in entries or []:
            svc = entry.get("Service") or {}
            host = svc.get("Address") or (entry.get("Node") or {}).get("Address", "")
            if host and svc.get("Port"):
                endpoints.append(Endpoint(str(svc.get("ID", "")), str(host), int(svc["Port"])))
        return endpoints


async def discover(consul_address: str, service: str, *, timeout_s: float = 3.0) -> list[str]:
    """``host:port`` of every healthy instance of ``service``.

    Raises:
        Unavailable: Consul cannot be reached or answered with an error.
    """
    async with ConsulAgent(consul_address, timeout_s=timeout_s) as agent:
        return [e.address for e in await agent.healthy(service)]


def instance_id(service: str, host: str, port: int) -> str:
    """A stable id for one instance: ``<service>-<hostname>-<host>-<port>``."""
    return f"{service}-{socket.gethostname()}-{host}-{port}"


@asynccontextmanager
async def registered_in_consul(
    consul_address: str, service: str, host: str, port: int, *, check_interval_s: float = 10.0
) -> AsyncIterator[str]:
    """Keeps one service instance registered in Consul while the block runs; yields its id.

    A failed registration is logged and the service runs on without Consul; deregistration on exit is
    attempted even when the block raised.
    """
    service_id = instance_id(service, host, port)
    async with ConsulAgent(consul_address) as agent:
        try:
            await agent.register_service(service, service_id, host, port, check_interval_s=check_interval_s)
            log.info("registered %s in Consul at %s as %s", service, agent.base, service_id)
        except Unavailable as exc:
            log.warning("could not register %s in Consul: %s", service, exc.message)
        try:
            yield service_id
        finally:
            try:
                await agent.deregister_service(service_id)
            except Unavailable as exc:
                log.warning("could not deregister %s from Consul: %s", service_id, exc.message)
