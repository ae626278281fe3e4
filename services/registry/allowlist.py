"""Which backend endpoints the registry's prober may dial.

A registered record names an endpoint; without a check, anyone who can register a model could make
the registry dial any address (an SSRF). The prober therefore probes only endpoints whose host (or
``host:port``) is on an allow-list: by default loopback and Triton's configured address. Others are
reported "cannot tell" (never dialled), and logged once per endpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from constellation.v1 import registry_pb2
from services.registry.health import Probe

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def split_host(endpoint: str) -> tuple[str, str]:
    """``(host, port)`` of ``host:port`` / ``[v6]:port`` (port empty when absent); a scheme is dropped."""
    rest = endpoint.split("://", 1)[-1].split("/", 1)[0]
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        return host.lower(), tail.removeprefix(":")
    host, _, port = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
    return host.lower(), port


class AllowList:
    """Hosts (any port) and ``host:port`` pairs the prober may dial.

    Args:
        entries: ``host`` or ``host:port`` strings.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.hosts: set[str] = set()
        self.pairs: set[tuple[str, str]] = set()
        for entry in entries:
            host, port = split_host(entry.strip())
            if port:
                self.pairs.add((host, port))
            elif host:
                self.hosts.add(host)

    def allows(self, endpoint: str) -> bool:
        host, port = split_host(endpoint)
        return host in self.hosts or (host, port) in self.pairs


def allowed_probe(probe: Probe, allow: AllowList) -> Probe:
    """``probe`` for endpoints on ``allow``; None ("cannot tell") without dialling for the others."""
    warned: set[str] = set()

    async def guarded(record: registry_pb2.ModelRecord) -> bool | None:
        endpoint = record.backend.endpoint
        if endpoint and not allow.allows(endpoint):
            if endpoint not in warned:
                warned.add(endpoint)
                log.warning("registry: not probing %s at %s: not on probe_allow", record.name, endpoint)
            return None
        return await probe(record)

    return guarded
