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

from google.protobuf import json_format

from constellation.consul import ConsulAgent, Endpoint, discover, instance_id, registered_in_consul
from constellation.errors import Unavailable
from constellation.tasks import BackgroundTask
from constellation.v1 import registry_pb2

__all__ = [
    "KV_PREFIX",
    "ConsulAgent",
    "Endpoint",
    "ModelMirror",
    "discover",
    "instance_id",
    "record_json",
    "registered_in_consul",
]

log = logging.getLogger(__name__)

KV_PREFIX = "constellation/models/"


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
        self._task = BackgroundTask("consul-mirror")
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
        """Starts the writer task on the running loop; idempotent."""
        self._task.start(self._run())

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Waits until everything queued has been written, or ``timeout_s`` passes."""
        if not self._task.running:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def stop(self) -> None:
        """Stops the writer task; what it had not written yet stays unwritten (``drain`` first)."""
        await self._task.stop()

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
