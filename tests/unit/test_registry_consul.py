"""The Consul adapter against FakeConsul: instance registration with a gRPC check, the KV mirror of model
records, discovery of healthy endpoints, deregistration on stop."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from constellation.config import load_config
from constellation.errors import Unavailable
from constellation.v1 import common_pb2, registry_pb2
from services.registry.client import RegistryClient
from services.registry.config import RegistryConfig
from services.registry.consul import ConsulAgent, discover
from services.registry.main import running_registry

_FIELDS = {
    name.lower(): name
    for name in (
        *("ID", "Name", "Address", "Port", "Tags", "Meta", "Check", "Checks"),
        *("GRPC", "GRPCUseTLS", "Interval", "Timeout", "DeregisterCriticalServiceAfter"),
    )
}


def _canonical(body: dict[str, Any]) -> dict[str, Any]:
    """A register body as Consul reads it: field names in any case or snake_case (``grpc_use_tls``), a
    single ``Check`` or a ``Checks`` list; returned with Consul's names and every check under ``Checks``."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        name = _FIELDS.get(key.replace("_", "").lower(), key)
        out[name] = [_canonical(c) for c in value] if name == "Checks" and isinstance(value, list) else value
    checks = list(out.pop("Checks", None) or [])
    if isinstance(out.get("Check"), dict):
        checks.insert(0, _canonical(out.pop("Check")))
    out["Checks"] = checks
    return out


class FakeConsul:
    """A fake Consul agent: an aiohttp server implementing only the documented endpoints the adapter uses
    (agent service register/deregister, KV put/delete, health service with ``passing``). It is a fake because
    no Consul server can be installed from the package registries this project builds from. Every
    registered check is reported passing unless its id is in ``critical``. Like Consul, it reads register bodies
    in any case of field names (py-consul sends ``name``, ``checks``, ``grpc``...)."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, Any]] = {}
        self.kv: dict[str, bytes] = {}
        self.critical: set[str] = set()
        self.deregistered: list[str] = []
        app = web.Application()
        app.router.add_put("/v1/agent/service/register", self.register)
        app.router.add_put("/v1/agent/service/deregister/{id}", self.deregister)
        app.router.add_put("/v1/kv/{key:.+}", self.put)
        app.router.add_delete("/v1/kv/{key:.+}", self.delete)
        app.router.add_get("/v1/health/service/{name}", self.health)
        self.runner = web.AppRunner(app)
        self.address = ""

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.address = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def register(self, request: web.Request) -> web.Response:
        body = _canonical(await request.json())
        if not body.get("Name"):
            return web.Response(status=400, text="Missing service name")
        self.services[body.get("ID") or body["Name"]] = body
        return web.Response()

    async def deregister(self, request: web.Request) -> web.Response:
        service_id = request.match_info["id"]
        if self.services.pop(service_id, None) is None:
            return web.Response(status=404, text=f'Unknown service ID "{service_id}"')
        self.deregistered.append(service_id)
        return web.Response()

    async def put(self, request: web.Request) -> web.Response:
        self.kv[request.match_info["key"]] = await request.read()
        return web.json_response(True)

    async def delete(self, request: web.Request) -> web.Response:
        self.kv.pop(request.match_info["key"], None)
        return web.json_response(True)

    async def health(self, request: web.Request) -> web.Response:
        passing = request.query.get("passing") in ("", "true", "1")
        entries = []
        for service_id, body in self.services.items():
            if body["Name"] != request.match_info["name"]:
                continue
            status = "critical" if service_id in self.critical else "passing"
            if passing and status != "passing":
                continue
            entries.append(
                {
                    "Node": {"Node": "fake", "Address": "10.0.0.9"},
                    "Service": {
                        "ID": service_id,
                        "Service": body["Name"],
                        "Address": body.get("Address", ""),
                        "Port": body.get("Port", 0),
                    },
                    "Checks": [{"ServiceID": service_id, "Status": status}],
                }
            )
        # Consul answers every blocking-query endpoint with the index of the data it read.
        return web.json_response(entries, headers={"X-Consul-Index": str(len(self.deregistered) + len(self.services))})


@pytest.fixture
async def consul() -> AsyncIterator[FakeConsul]:
    fake = FakeConsul()
    await fake.start()
    yield fake
    await fake.stop()


async def test_registry_registers_mirrors_and_deregisters(consul: FakeConsul, tmp_path: Path) -> None:
    config = load_config(
        RegistryConfig,
        None,
        port=0,
        db=str(tmp_path / "r.sqlite"),
        probes=False,
        watch_coalesce_s=0.05,
        shutdown_grace_s=0.5,
        consul_http_addr=consul.address,
    )
    async with running_registry(config) as running:
        (service,) = consul.services.values()
        assert service["Name"] == "constellation-registry"
        assert service["Port"] == running.port
        (check,) = service["Checks"]
        assert isinstance(check, dict)
        assert check["GRPC"] == f"127.0.0.1:{running.port}" and check["Interval"] == "10s"

        assert await discover(consul.address, "constellation-registry") == [f"127.0.0.1:{running.port}"]
        consul.critical.add(str(service["ID"]))
        assert await discover(consul.address, "constellation-registry") == []
        consul.critical.clear()

        record = registry_pb2.ModelRecord(
            name="org/model@v2", family="f", backend=common_pb2.Backend(parameters={"recorded_model": "x"})
        )
        async with RegistryClient(f"127.0.0.1:{running.port}") as client:
            await client.register(record)
            assert running.mirror is not None
            await running.mirror.drain()
            value = json.loads(consul.kv["constellation/models/org/model@v2"])
            assert value["name"] == "org/model@v2" and value["state"] == "MODEL_STATE_READY"
            assert value["backend"]["parameters"] == {"recorded_model": "x"}
            await client.deregister("org/model@v2")
            await running.mirror.drain()
            assert "constellation/models/org/model@v2" not in consul.kv
        service_id = str(service["ID"])
    assert consul.deregistered == [service_id]
    assert consul.services == {}


async def test_consul_errors_are_unavailable(consul: FakeConsul) -> None:
    async with ConsulAgent(consul.address) as agent:
        with pytest.raises(Unavailable, match="404"):
            await agent.deregister_service("never-registered")
    await consul.stop()
    with pytest.raises(Unavailable, match="cannot be reached"):
        await discover(consul.address, "anything", timeout_s=1.0)


def test_consul_http_addr_comes_from_the_standard_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "http://consul.internal:8500")
    assert load_config(RegistryConfig, None).consul_http_addr == "http://consul.internal:8500"
    monkeypatch.delenv("CONSUL_HTTP_ADDR")
    assert load_config(RegistryConfig, None).consul_http_addr == ""
