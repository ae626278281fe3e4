"""Consul over its HTTP API: service registration with a gRPC health check, and discovery.

Used only when ``CONSUL_HTTP_ADDR`` (or a service's ``consul_http_addr`` setting) is set. Every call has
a deadline; failures raise :class:`~constellation.errors.Unavailable` and never stop a service (a failed
registration is logged, discovery falls back to static configuration).

* :func:`registered_in_consul`: an instance registers itself with the local agent
  (``PUT /v1/agent/service/register``) with a gRPC health check (``Check.GRPC`` against the stock
  ``grpc.health.v1`` service every Constellation server runs), and deregisters on exit
  (``PUT /v1/agent/service/deregister/<id>``).
* :func:`discover`: healthy endpoints of a service (``GET /v1/health/service/<name>?passing=true``).
* :class:`ConsulAgent` also writes the KV store (the registry mirrors model records there).
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from constellation.errors import Unavailable

log = logging.getLogger(__name__)


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
    """An HTTP client of one Consul agent. An async context manager; safe for concurrent calls.

    Args:
        address: The agent's HTTP address, ``http://host:8500`` (a bare ``host:port`` gets ``http://``).
        timeout_s: Deadline of each HTTP call, in seconds.
        token: ACL token sent as ``X-Consul-Token``, when the agent needs one.
    """

    def __init__(self, address: str, *, timeout_s: float = 3.0, token: str = ""):
        self.base = (address if "://" in address else f"http://{address}").rstrip("/")
        headers = {"X-Consul-Token": token} if token else {}
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s), headers=headers)

    async def __aenter__(self) -> ConsulAgent:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        url = f"{self.base}{path}"
        try:
            async with self._session.request(method, url, **kwargs) as response:
                body = await response.read()
                if response.status >= 400:
                    raise Unavailable(
                        f"Consul {method} {path} answered {response.status}: {body[:200].decode(errors='replace')}",
                        reason="CONSUL_ERROR",
                    )
                if body and response.content_type == "application/json":
                    return json.loads(body)
                return None
        except (aiohttp.ClientError, TimeoutError) as exc:
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
        body = {
            "ID": service_id,
            "Name": name,
            "Address": host,
            "Port": port,
            "Tags": list(tags),
            "Check": {
                "Name": f"{name} gRPC health",
                "GRPC": f"{host}:{port}",
                "GRPCUseTLS": False,
                "Interval": f"{check_interval_s:g}s",
                "Timeout": "2s",
                "DeregisterCriticalServiceAfter": f"{deregister_after_s:g}s",
            },
        }
        await self._call("PUT", "/v1/agent/service/register", json=body)

    async def deregister_service(self, service_id: str) -> None:
        await self._call("PUT", f"/v1/agent/service/deregister/{quote(service_id, safe='')}")

    async def put_kv(self, key: str, value: bytes) -> None:
        await self._call("PUT", f"/v1/kv/{quote(key, safe='/')}", data=value)

    async def delete_kv(self, key: str) -> None:
        await self._call("DELETE", f"/v1/kv/{quote(key, safe='/')}")

    async def healthy(self, service: str) -> list[Endpoint]:
        """Instances of ``service`` whose checks all pass, in Consul's order."""
        entries = await self._call("GET", f"/v1/health/service/{quote(service, safe='')}", params={"passing": "true"})
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
