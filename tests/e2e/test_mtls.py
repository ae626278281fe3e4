"""A part of the mesh with mTLS and API keys on: registry + classifier + dispatch, real Triton (plain gRPC).

Every server presents a certificate from a development CA and requires a client certificate from it;
dispatch reaches the classifier and the registry over mTLS with a ``service`` key; the test asks over
mTLS with a ``tenant`` key. A client without a certificate, and one with the wrong key, are turned away.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest

from constellation import tls
from constellation.auth import Role, bearer_metadata, new_key
from constellation.config import SecurityConfig, load_config
from constellation.v1 import dispatch_pb2, dispatch_pb2_grpc
from services.classifier.config import ClassifierConfig
from services.classifier.main import running_classifier
from services.dispatch.config import DispatchConfig, ModelEntry
from services.dispatch.main import running_dispatch
from services.inference.launcher import TritonServer
from services.registry.config import RegistryConfig
from services.registry.main import running_registry
from services.registry.store import ModelStore


async def _mesh(stack: AsyncExitStack, tmp_path: Path, triton_url: str) -> tuple[str, tls.DevCerts, str]:
    certs = tls.make_dev_ca(tmp_path / "certs")
    db = tmp_path / "registry.sqlite"
    with ModelStore(db) as store:
        service_key, service_row = new_key("mesh", Role.SERVICE)
        tenant_key, tenant_row = new_key("acme", Role.TENANT)
        store.add_key(service_row)
        store.add_key(tenant_row)
    security = SecurityConfig(
        auth=True,
        keys_db=str(db),
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        tls_ca=str(certs.ca),
        tls_client_cert=str(certs.client_cert),
        tls_client_key=str(certs.client_key),
        mtls=True,
        service_key=service_key,
    )
    tls.configure_clients(tls.from_config(security))  # what ServiceMain.main does in each process
    common = {"port": 0, "shutdown_grace_s": 1.0, "security": security}
    registry = await stack.enter_async_context(
        running_registry(load_config(RegistryConfig, None, db=str(db), probes=False, **common))
    )
    classifier = await stack.enter_async_context(running_classifier(load_config(ClassifierConfig, None, **common)))
    dispatch = await stack.enter_async_context(
        running_dispatch(
            load_config(
                DispatchConfig,
                None,
                triton_url=triton_url,
                classifier_url=f"localhost:{classifier.port}",
                registry_url=f"localhost:{registry.port}",
                models={"smollm2": ModelEntry(price_in_per_mtok=1.0, price_out_per_mtok=2.0)},
                **common,
            )
        )
    )
    return f"localhost:{dispatch.port}", certs, tenant_key


@pytest.fixture
async def mesh(tmp_path: Path, triton: TritonServer) -> AsyncIterator[tuple[str, tls.DevCerts, str]]:
    before = tls.client_security()
    try:
        async with AsyncExitStack() as stack:
            yield await _mesh(stack, tmp_path, triton.grpc_url)
    finally:
        tls.configure_clients(before)


async def test_an_ask_through_the_mesh_over_mtls_with_keys(mesh: tuple[str, tls.DevCerts, str]) -> None:
    address, certs, tenant_key = mesh
    request = dispatch_pb2.AskRequest(prompt="What is the capital of France?", model="", time_budget_ms=0)
    request.sampling.max_tokens = 24
    request.sampling.temperature = 0
    kinds: list[str] = []
    async with tls.open_channel(address, [], [], certs.client()) as channel:
        stub = dispatch_pb2_grpc.DispatchServiceStub(channel)
        async for event in stub.Ask(request, metadata=bearer_metadata(tenant_key), timeout=120):
            kinds.append(str(event.WhichOneof("event")))
            if event.WhichOneof("event") == "final":
                final = event.final
    assert "classification" in kinds  # dispatch reached the classifier over mTLS with its service key
    assert kinds[-1] == "final"
    assert final.text and final.models
    assert final.usage.cost_usd > 0


async def test_the_mesh_turns_away_clients_without_a_certificate_or_key(mesh: tuple[str, tls.DevCerts, str]) -> None:
    address, certs, _ = mesh
    request = dispatch_pb2.PlanRequest(request=dispatch_pb2.AskRequest(prompt="Hi"))
    async with tls.open_channel(address, [], [], tls.ClientSecurity(ca=str(certs.ca))) as no_cert:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dispatch_pb2_grpc.DispatchServiceStub(no_cert).Plan(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    async with tls.open_channel(address, [], [], certs.client()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
            await dispatch_pb2_grpc.DispatchServiceStub(channel).Plan(request, timeout=10)
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
