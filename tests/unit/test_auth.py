"""API keys (hashing, verification, revocation), the bind guard, the prober's allow-list, and TLS/mTLS
credentials from a development CA, over real loopback gRPC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from constellation import tls
from constellation.auth import Authenticator, Role, SqliteKeys, hash_secret, new_key, roles_for, split_key
from constellation.config import SecurityConfig, ServiceConfig
from constellation.errors import FailedPrecondition, Unauthenticated
from constellation.server import Registration, check_exposure, create_server
from constellation.triton import TritonClient
from constellation.v1 import common_pb2, registry_pb2
from services.registry.allowlist import AllowList, allowed_probe
from services.registry.main import SERVICE as REGISTRY_MAIN
from services.registry.store import ModelStore


def test_a_key_is_stored_as_a_salted_hash_and_verifies(tmp_path: Path) -> None:
    with ModelStore(tmp_path / "r.sqlite") as store:
        full, row = new_key("acme", Role.TENANT)
        store.add_key(row)
        key_id, secret = split_key(full)
        stored = store.key(key_id)
        assert stored is not None
        assert secret.encode() not in stored.digest + stored.salt
        assert stored.digest == hash_secret(secret, stored.salt)
        _, other = new_key("acme", Role.TENANT)
        assert other.salt != row.salt
        principal = Authenticator(store).authenticate(full)
        assert (principal.tenant, principal.role, principal.key_id) == ("acme", Role.TENANT, key_id)


@pytest.mark.parametrize(
    ("presented", "reason"),
    [(None, "NO_KEY"), ("not-a-key", "MALFORMED_KEY"), ("ck_000000000000_secret", "UNKNOWN_KEY")],
)
def test_missing_malformed_and_unknown_keys_are_unauthenticated(
    tmp_path: Path, presented: str | None, reason: str
) -> None:
    with ModelStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(Unauthenticated) as raised:
            Authenticator(store).authenticate(presented)
        assert raised.value.reason == reason


def test_a_wrong_secret_for_a_known_id_is_unknown(tmp_path: Path) -> None:
    with ModelStore(tmp_path / "r.sqlite") as store:
        full, row = new_key("acme", Role.ADMIN)
        store.add_key(row)
        with pytest.raises(Unauthenticated) as raised:
            Authenticator(store).authenticate(full[:-2] + "xx")
        assert raised.value.reason == "UNKNOWN_KEY"


def test_a_revoked_key_stops_working_and_other_services_read_the_same_table(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with ModelStore(path) as store:
        full, row = new_key("acme", Role.SERVICE)
        store.add_key(row)
        reader = SqliteKeys(path)
        assert Authenticator(reader, cache_s=0).authenticate(full).role == Role.SERVICE
        assert reader.tenants() == {"acme"}
        store.revoke_key(row.key_id)
        with pytest.raises(Unauthenticated) as raised:
            Authenticator(reader, cache_s=0).authenticate(full)
        assert raised.value.reason == "REVOKED_KEY"
        assert reader.tenants() == set()
    assert SqliteKeys(tmp_path / "missing.sqlite").key("x") is None


def test_health_and_reflection_are_open_and_unknown_methods_need_admin() -> None:
    assert roles_for("/grpc.health.v1.Health/Check") is None
    assert roles_for("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    assert roles_for("/constellation.v1.NewService/Anything") == frozenset({Role.ADMIN})


def test_binding_beyond_loopback_without_auth_is_refused_unless_insecure() -> None:
    check_exposure(ServiceConfig(host="127.0.0.1"))
    with pytest.raises(FailedPrecondition) as raised:
        check_exposure(ServiceConfig(host="0.0.0.0"))
    assert raised.value.reason == "INSECURE_BIND"
    check_exposure(ServiceConfig(host="0.0.0.0", security=SecurityConfig(insecure=True)))
    check_exposure(ServiceConfig(host="0.0.0.0", security=SecurityConfig(auth=True)))


async def test_create_server_refuses_an_open_bind_before_binding() -> None:
    with pytest.raises(FailedPrecondition):
        await create_server([], ServiceConfig(host="0.0.0.0", port=0))


def test_the_insecure_flag_is_the_operators_explicit_choice() -> None:
    assert REGISTRY_MAIN.load(["--port", "0"]).security.insecure is False
    assert REGISTRY_MAIN.load(["--port", "0", "--insecure"]).security.insecure is True


def _record(name: str, endpoint: str) -> registry_pb2.ModelRecord:
    return registry_pb2.ModelRecord(name=name, backend=common_pb2.Backend(endpoint=endpoint))


async def test_the_prober_dials_only_allow_listed_endpoints() -> None:
    dialled: list[str] = []

    async def probe(record: registry_pb2.ModelRecord) -> bool | None:
        dialled.append(record.backend.endpoint)
        return True

    guarded = allowed_probe(probe, AllowList(["127.0.0.1", "localhost", "::1", "triton.internal:8001"]))
    assert await guarded(_record("a", "127.0.0.1:8001")) is True
    assert await guarded(_record("b", "[::1]:9000")) is True
    assert await guarded(_record("c", "triton.internal:8001")) is True
    assert await guarded(_record("d", "triton.internal:9999")) is None
    assert await guarded(_record("e", "169.254.169.254:80")) is None
    assert dialled == ["127.0.0.1:8001", "[::1]:9000", "triton.internal:8001"]


async def _health(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(response.status)


async def test_mtls_lets_in_only_clients_with_a_certificate_from_the_ca(tmp_path: Path) -> None:
    certs = tls.make_dev_ca(tmp_path / "certs")
    assert oct(certs.server_key.stat().st_mode & 0o777) == "0o600"
    security = SecurityConfig(
        tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), tls_ca=str(certs.ca), mtls=True
    )
    running = await create_server([], ServiceConfig(port=0, security=security))
    address = f"localhost:{running.port}"
    try:
        async with tls.open_channel(address, [], [], certs.client()) as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        async with tls.open_channel(address, [], [], tls.ClientSecurity(ca=str(certs.ca))) as no_cert:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _health(no_cert)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(address) as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await _health(plain)
    finally:
        await running.stop(0)


async def test_tls_without_client_certificates_verifies_the_server(tmp_path: Path) -> None:
    certs = tls.make_dev_ca(tmp_path / "certs")
    other = tls.make_dev_ca(tmp_path / "other")
    security = SecurityConfig(tls_cert=str(certs.server_cert), tls_key=str(certs.server_key))
    running = await create_server([], ServiceConfig(port=0, security=security))
    try:
        trusted = tls.ClientSecurity(ca=str(certs.ca), server_name="localhost")
        async with tls.open_channel(f"127.0.0.1:{running.port}", [], [], trusted) as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        wrong_ca = tls.ClientSecurity(ca=str(other.ca))
        async with tls.open_channel(f"localhost:{running.port}", [], [], wrong_ca) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await _health(channel)
    finally:
        await running.stop(0)


def _fake_triton_ready() -> grpc.GenericRpcHandler:
    """A stand-in for Triton's ``ServerReady`` (real gRPC, real TLS; only the answer is canned)."""
    from tritonclient.grpc import service_pb2

    async def ready(request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=True)

    handler = grpc.unary_unary_rpc_method_handler(
        ready, service_pb2.ServerReadyRequest.FromString, service_pb2.ServerReadyResponse.SerializeToString
    )
    return grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ServerReady": handler})


async def test_the_triton_client_dials_over_ssl_when_configured(tmp_path: Path) -> None:
    certs = tls.make_dev_ca(tmp_path / "certs")
    security = SecurityConfig(tls_cert=str(certs.server_cert), tls_key=str(certs.server_key))
    triton = Registration(_fake_triton_ready(), lambda h, server: server.add_generic_rpc_handlers((h,)), "inference")
    running = await create_server([triton], ServiceConfig(port=0, security=security))
    before = tls.client_security()
    try:
        async with TritonClient(f"localhost:{running.port}", control_timeout_s=3) as plain:
            assert await plain.server_ready() is False  # plain text against an SSL port
        tls.configure_clients(tls.ClientSecurity(ca=str(certs.ca), triton=True))
        async with TritonClient(f"localhost:{running.port}", control_timeout_s=3) as over_ssl:
            assert await over_ssl.server_ready() is True
    finally:
        tls.configure_clients(before)
        await running.stop(0)
