"""Consul integration over its HTTP API, used only when ``CONSUL_HTTP_ADDR`` (or the config field) is set.

Three pieces:

* :func:`registered_in_consul`: a service instance registers itself with the local agent
  (``PUT /v1/agent/service/register``) with a gRPC health check (``Check.GRPC`` dialled every
  ``Check.Interval`` against the stock ``grpc.health.v1`` service every Constellation server runs),
  and deregisters on exit (``PUT /v1/agent/service/deregister/<id>``).
* :class:`ModelMirror`: the registry mirrors each model record to the KV store as JSON under
  ``constellation/models/<name>`` (``PUT`` / ``DELETE /v1/kv/...``), so tools that read Consul see the
  pool without speaking gRPC.
* :func:`discover`: healthy endpoints of a service (``GET /v1/health/service/<name>?passing=true``),
  for dispatch to find its peers.

Every call has a deadline (``timeout_s``); failures raise ``Unavailable`` and never stop a service:
the mirror retries with backoff and logs, registration failures are logged by the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from google.protobuf import json_format

from constellation.errors import Unavailable
from constellation.v1 import registry_pb2

log = logging.getLogger(__name__)

KV_PREFIX = "constellation/models/"


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


def record_json(record: registry_pb2.ModelRecord) -> bytes:
    """The KV value of a record: its protobuf JSON mapping (camelCase names, enums by name)."""
    return json.dumps(json_format.MessageToDict(record), sort_keys=True).encode()


class ModelMirror:
    """Mirrors registry changes to Consul KV in a background task.

    :meth:`changed` is a ``Registry`` change listener: it never blocks; the latest state per model is
    kept until written (older versions of the same model are skipped). Failed writes are retried
    with exponential backoff up to ``max_backoff_s``.

    Args:
        agent: The Consul agent to write to (owned by the caller).
        prefix: KV key prefix; the model name follows it.
    """

    def __init__(self, agent: ConsulAgent, *, prefix: str = KV_PREFIX, max_backoff_s: float = 10.0):
        self.agent = agent
        self.prefix = prefix
        self.max_backoff_s = max_backoff_s
        self._pending: dict[str, registry_pb2.ModelRecord | None] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.failures = 0

    def changed(self, change: int, record: registry_pb2.ModelRecord) -> None:
        removed = change == registry_pb2.WatchModelsResponse.CHANGE_REMOVED
        self._pending[record.name] = None if removed else record
        self._idle.clear()
        self._wake.set()

    def sync(self, records: list[registry_pb2.ModelRecord]) -> None:
        """Queues every current record (at start, so Consul catches up with changes made without it)."""
        for record in records:
            self._pending[record.name] = record
        self._idle.clear()
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="consul-mirror")

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Waits until everything queued has been written, or ``timeout_s`` passes."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _write(self, name: str, record: registry_pb2.ModelRecord | None) -> None:
        key = self.prefix + name
        if record is None:
            await self.agent.delete_kv(key)
        else:
            await self.agent.put_kv(key, record_json(record))

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                name = next(iter(self._pending))
                record = self._pending.pop(name)
                try:
                    await self._write(name, record)
                    self.written += 1
                    backoff = 0.1
                except Unavailable as exc:
                    self.failures += 1
                    self._pending.setdefault(name, record)
                    log.warning("Consul KV mirror of %s failed (%s); retrying in %.1fs", name, exc.message, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
            self._idle.set()
