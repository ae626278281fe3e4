"""Every RPC of every service, and every HTTP route, against no key / tenant / admin / service keys.

The gRPC table runs each service's full name and methods (read from the generated descriptors, so a new
RPC without a row here fails) on a real server built by :func:`constellation.server.create_server` with
auth on; behind the key check sits a stand-in servicer that answers an empty response, so an allowed
call is OK and a refused one carries the interceptor's status. The HTTP table runs the real
OpenAI-compatible app over a dispatcher whose model calls a fake model server answers. The registry's
key RPCs run for real at the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from constellation.auth import Authenticator, Role, bearer_metadata, http_middleware, new_key
from constellation.config import SecurityConfig, ServiceConfig
from constellation.server import Registration, RunningServer, create_server
from constellation.triton import TritonClient
from constellation.v1 import (
    classifier_pb2,
    dispatch_pb2,
    fusion_pb2,
    ranking_pb2,
    registry_pb2,
    registry_pb2_grpc,
    scaler_pb2,
)
from services.dispatch.http import create_http_app, running_http
from services.dispatch.http.app import error_response
from services.dispatch.pipeline import Dispatcher
from services.registry.config import RegistryConfig
from services.registry.main import running_registry
from services.registry.store import ModelStore
from tests.unit.dispatch_fakes import FakeGenerator, Script, config

T, S, A = "tenant", "service", "admin"
EXPECTED = {
    "constellation.v1.DispatchService/Ask": T,
    "constellation.v1.DispatchService/Plan": T,
    "constellation.v1.RegistryService/RegisterModel": A,
    "constellation.v1.RegistryService/DeregisterModel": A,
    "constellation.v1.RegistryService/GetModel": S,
    "constellation.v1.RegistryService/ListModels": S,
    "constellation.v1.RegistryService/WatchModels": S,
    "constellation.v1.RegistryService/ReportOutcome": S,
    "constellation.v1.RegistryService/ReportModelState": S,
    "constellation.v1.RegistryService/CreateKey": A,
    "constellation.v1.RegistryService/ListKeys": A,
    "constellation.v1.RegistryService/RevokeKey": A,
    "constellation.v1.ClassifierService/Classify": S,
    "constellation.v1.ClassifierService/ClassifyBatch": S,
    "constellation.v1.RankingService/Rank": S,
    "constellation.v1.FusionService/Fuse": S,
    "constellation.v1.ScalerService/GetStatus": S,
    "constellation.v1.ScalerService/SetDryRun": A,
    "constellation.v1.ScalerService/RecordArrivals": S,
    "constellation.v1.ScalerService/EnsureReady": S,
}
"""The kind of each RPC: tenant calls (tenant or admin keys), service calls (service or admin), admin only."""
ALLOWED = {T: {Role.TENANT, Role.ADMIN}, S: {Role.SERVICE, Role.ADMIN}, A: {Role.ADMIN}}
SERVICES: list[ServiceDescriptor] = [
    module.DESCRIPTOR.services_by_name[name]
    for module, name in (
        (dispatch_pb2, "DispatchService"),
        (registry_pb2, "RegistryService"),
        (classifier_pb2, "ClassifierService"),
        (ranking_pb2, "RankingService"),
        (fusion_pb2, "FusionService"),
        (scaler_pb2, "ScalerService"),
    )
]
METHODS = [(service, method) for service in SERVICES for method in service.methods]
CREDENTIALS: list[Role | None] = [None, Role.TENANT, Role.ADMIN, Role.SERVICE]


def _classes(method: MethodDescriptor) -> tuple[Any, Any]:
    return message_factory.GetMessageClass(method.input_type), message_factory.GetMessageClass(method.output_type)


def _stand_in(service: ServiceDescriptor) -> grpc.GenericRpcHandler:
    """Answers every method of ``service`` with an empty response (one message for streams)."""
    handlers = {}
    for method in service.methods:
        request_cls, response_cls = _classes(method)
        if method.server_streaming:

            async def stream(request: Any, context: Any, cls: Any = response_cls) -> AsyncIterator[Any]:
                yield cls()

            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                stream, request_cls.FromString, response_cls.SerializeToString
            )
        else:

            async def unary(request: Any, context: Any, cls: Any = response_cls) -> Any:
                return cls()

            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                unary, request_cls.FromString, response_cls.SerializeToString
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def test_the_table_names_every_rpc_of_every_service() -> None:
    assert {f"{s.full_name}/{m.name}" for s, m in METHODS} == set(EXPECTED)


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[tuple[ModelStore, dict[Role, str]]]:
    with ModelStore(tmp_path / "keys.sqlite") as store:
        keys = {}
        for role in Role:
            full, row = new_key(f"{role}-tenant", role)
            store.add_key(row)
            keys[role] = full
        yield store, keys


@pytest.fixture
async def all_services(keyed: tuple[ModelStore, dict[Role, str]]) -> AsyncIterator[RunningServer]:
    store, _ = keyed
    registrations = [
        Registration(service, lambda handler, server: server.add_generic_rpc_handlers((handler,)), s.full_name)
        for s in SERVICES
        for service in [_stand_in(s)]
    ]
    running = await create_server(
        registrations, ServiceConfig(port=0, security=SecurityConfig(auth=True)), authenticator=Authenticator(store)
    )
    try:
        yield running
    finally:
        await running.stop(0)


async def _call(
    channel: grpc.aio.Channel, service: ServiceDescriptor, method: MethodDescriptor, key: str | None
) -> Any:
    request_cls, response_cls = _classes(method)
    path = f"/{service.full_name}/{method.name}"
    metadata = bearer_metadata(key) if key else None
    if method.server_streaming:
        call = channel.unary_stream(path, request_cls.SerializeToString, response_cls.FromString)
        return [m async for m in call(request_cls(), metadata=metadata, timeout=5)]
    return await channel.unary_unary(path, request_cls.SerializeToString, response_cls.FromString)(
        request_cls(), metadata=metadata, timeout=5
    )


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no rich status"
    info = error_details_pb2.ErrorInfo()
    next(d for d in status.details if d.Is(info.DESCRIPTOR)).Unpack(info)
    return info.reason


async def test_every_rpc_against_every_credential(
    all_services: RunningServer, keyed: tuple[ModelStore, dict[Role, str]]
) -> None:
    _, keys = keyed
    outcomes: dict[tuple[str, str], str] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{all_services.port}") as channel:
        for service, method in METHODS:
            for role in CREDENTIALS:
                try:
                    await _call(channel, service, method, keys[role] if role else None)
                    got = "OK"
                except grpc.aio.AioRpcError as error:
                    got = f"{error.code().name}/{_reason(error)}"
                outcomes[(f"{service.full_name}/{method.name}", str(role))] = got
    for (name, role), got in outcomes.items():
        allowed = ALLOWED[EXPECTED[name]]
        if role == "None":
            want = "UNAUTHENTICATED/NO_KEY"
        elif Role(role) in allowed:
            want = "OK"
        else:
            want = "PERMISSION_DENIED/ROLE_NOT_ALLOWED"
        assert got == want, (name, role)
    assert len(outcomes) == len(EXPECTED) * 4


async def test_an_unknown_key_is_unauthenticated_and_health_needs_none(all_services: RunningServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{all_services.port}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        service = SERVICES[0]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _call(channel, service, service.methods_by_name["Plan"], "ck_0123456789ab_nope")
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _reason(raised.value) == "UNKNOWN_KEY"


ROUTES = [
    ("POST", "/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}]}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/smollm2", None),
]


async def test_every_http_route_against_every_credential(keyed: tuple[ModelStore, dict[Role, str]]) -> None:
    store, keys = keyed
    fake = FakeGenerator({"smollm2": Script("Hi.")})
    async with TritonClient("127.0.0.1:1") as triton:
        dispatcher = Dispatcher(config(routing=False), triton, generator=fake)
        app = create_http_app(dispatcher, middlewares=[http_middleware(Authenticator(store), error_response)])
        async with running_http(app) as http, aiohttp.ClientSession() as session:
            for method, path, body in ROUTES:
                for role in CREDENTIALS:
                    headers = {"Authorization": f"Bearer {keys[role]}"} if role else {}
                    url = f"http://127.0.0.1:{http.port}{path}"
                    async with session.request(method, url, json=body, headers=headers) as response:
                        payload = await response.json()
                    want = 200 if role in HTTP_ALLOWED else 401 if role is None else 403
                    assert response.status == want, (path, role, payload)
                    if want != 200:
                        assert payload["error"]["type"] in ("authentication_error", "permission_error")


HTTP_ALLOWED = {Role.TENANT, Role.ADMIN}


async def test_registry_key_management_end_to_end(tmp_path: Path) -> None:
    db = tmp_path / "registry.sqlite"
    with ModelStore(db) as store:  # bootstrap: the first admin key is written to the file directly
        admin, row = new_key("ops", Role.ADMIN)
        store.add_key(row)
    settings = RegistryConfig(db=str(db), port=0, probes=False, security=SecurityConfig(auth=True))
    async with running_registry(settings) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            as_admin = bearer_metadata(admin)
            created = await stub.CreateKey(
                registry_pb2.CreateKeyRequest(tenant="acme", role=registry_pb2.KEY_ROLE_TENANT), metadata=as_admin
            )
            assert created.key.startswith(f"ck_{created.info.key_id}_")
            listed = await stub.ListKeys(registry_pb2.ListKeysRequest(), metadata=as_admin)
            assert {k.tenant for k in listed.keys} == {"ops", "acme"}
            assert created.key not in str(listed)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.ListKeys(registry_pb2.ListKeysRequest(), metadata=bearer_metadata(created.key))
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.CreateKey(registry_pb2.CreateKeyRequest(tenant=""), metadata=as_admin)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            revoked = await stub.RevokeKey(registry_pb2.RevokeKeyRequest(key_id=created.info.key_id), metadata=as_admin)
            assert revoked.info.HasField("revoked_at")
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await stub.ListKeys(registry_pb2.ListKeysRequest(), metadata=bearer_metadata(created.key))
            assert gone.value.code() == grpc.StatusCode.UNAUTHENTICATED
