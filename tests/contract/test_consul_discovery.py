"""Dispatch finds its peers through Consul (a fake agent: no Consul can be installed here), and every
service registers itself while it serves."""

from __future__ import annotations

import asyncio
import contextlib

from constellation import consul
from constellation.config import load_config
from constellation.server import serve
from services.classifier.config import ClassifierConfig
from services.classifier.main import running_classifier
from services.dispatch.config import DispatchConfig
from services.dispatch.main import discover_peers
from tests.unit.test_registry_consul import FakeConsul


async def test_dispatch_discovers_the_peers_it_has_no_address_for() -> None:
    fake = FakeConsul()
    await fake.start()
    try:
        classifier_config = load_config(ClassifierConfig, None, port=0, metrics_port=-1)
        async with running_classifier(classifier_config) as running:
            name = consul.service_name("classifier")
            async with consul.registered_in_consul(fake.address, name, "127.0.0.1", running.port):
                config = load_config(DispatchConfig, None, port=0, consul_http_addr=fake.address)
                found = await discover_peers(config)
                assert found.classifier_url == f"127.0.0.1:{running.port}"
                assert found.registry_url == "" and found.fusion_url == ""  # nothing registered: still none
                pinned = load_config(
                    DispatchConfig, None, port=0, consul_http_addr=fake.address, classifier_url="10.0.0.9:1"
                )
                assert (await discover_peers(pinned)).classifier_url == "10.0.0.9:1"  # configuration wins
                fake.critical.add(consul.instance_id(name, "127.0.0.1", running.port))
                assert (await discover_peers(config)).classifier_url == ""  # failing its check: not chosen
    finally:
        await fake.stop()
    unreachable = load_config(DispatchConfig, None, port=0, consul_http_addr=fake.address)
    assert (await discover_peers(unreachable)).classifier_url == ""  # Consul gone: static configuration


async def test_a_served_service_is_registered_with_a_grpc_check_and_deregistered_on_stop() -> None:
    fake = FakeConsul()
    await fake.start()
    config = load_config(ClassifierConfig, None, port=0, metrics_port=-1, consul_http_addr=fake.address)
    task = asyncio.create_task(serve([], config))  # no servicers: health and reflection alone make a server
    try:
        for _ in range(100):
            if fake.services:
                break
            await asyncio.sleep(0.05)
        (registered,) = fake.services.values()
        assert registered["Name"] == "constellation-classifier"
        (check,) = registered["Checks"]
        assert isinstance(check, dict) and check["GRPC"] == f"127.0.0.1:{registered['Port']}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await fake.stop()
    assert fake.deregistered == [registered["ID"]]
