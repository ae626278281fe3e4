"""DispatchService contract over real gRPC on loopback, without a model behind it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest

from constellation.client import DispatchClient, ask_request
from constellation.errors import InvalidArgument, Unavailable
from constellation.net import free_port
from constellation.v1 import common_pb2
from tests.grpc_checks import SERVING, reflected, serving


async def collect(address: str, request: object) -> list[object]:
    async with DispatchClient(address) as client:
        return [event async for event in client.ask(request, timeout_s=10)]  # type: ignore[arg-type]


async def test_health_and_reflection(dispatch_factory) -> None:  # type: ignore[no-untyped-def]
    # No Triton check: health stays SERVING (with checks on, it follows Triton: tests/e2e/test_ask.py).
    address = await dispatch_factory(triton_url=f"127.0.0.1:{free_port()}", triton_check_s=0)
    assert await serving(address, ("", "constellation.v1.DispatchService")) == [SERVING, SERVING]
    services, output = await reflected(address, "constellation.v1.DispatchService", "Ask")
    assert {"constellation.v1.DispatchService", "grpc.health.v1.Health"} <= services
    assert output == "constellation.v1.AskResponse"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"prompt": ""}, {"prompt"}),
        ({"prompt": "x" * 40_000}, {"prompt"}),
        ({"prompt": "hi", "temperature": 7.0}, {"sampling.temperature"}),
        ({"prompt": "hi", "top_p": 1.5, "max_tokens": 100_000}, {"sampling.top_p", "sampling.max_tokens"}),
    ],
)
async def test_invalid_requests_name_each_field(dispatch_factory, fields, expected) -> None:  # type: ignore[no-untyped-def]
    address = await dispatch_factory(triton_url=f"127.0.0.1:{free_port()}")
    prompt = fields.pop("prompt")
    with pytest.raises(InvalidArgument) as caught:
        await collect(address, ask_request(prompt, **fields))
    assert {v.field for v in caught.value.violations} == expected
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("check_s", [0.0, 2.0])
async def test_triton_down_is_unavailable_and_keeps_its_address_and_hints_to_operators(
    dispatch_factory,  # type: ignore[no-untyped-def]
    check_s: float,
) -> None:
    """With the liveness check on, the Ask fails fast; off, it fails on the model call: UNAVAILABLE both ways."""
    port = free_port()
    address = await dispatch_factory(triton_url=f"127.0.0.1:{port}", triton_check_s=check_s)
    with pytest.raises(Unavailable) as caught:
        await collect(address, ask_request("What is 2+2?", max_tokens=8))
    assert caught.value.reason == "TRITON_UNAVAILABLE"
    assert "retry" in caught.value.message
    assert str(port) not in caught.value.message and "constellation up" not in caught.value.message
    assert str(port) not in str(caught.value.metadata)


async def test_plan_is_a_dry_run(dispatch_factory) -> None:  # type: ignore[no-untyped-def]
    address = await dispatch_factory(triton_url=f"127.0.0.1:{free_port()}", default_model="smollm2")
    async with DispatchClient(address) as client:
        response = await client.plan(ask_request("What is 2+2?"))
        chosen = [c.model for c in response.plan.candidates if c.chosen]
        assert chosen == ["smollm2"]
        assert "default model" in response.plan.candidates[0].reason
        with pytest.raises(InvalidArgument):
            await client.plan(ask_request(""))


async def grpcurl(*args: str) -> tuple[int, str, str]:
    binary = Path(sys.executable).parent / "grpcurl"
    process = await asyncio.create_subprocess_exec(
        str(binary), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode or 0, out.decode(), err.decode()


async def test_readme_grpcurl_recipes(dispatch_factory) -> None:  # type: ignore[no-untyped-def]
    """The README's grpcurl recipes that need no model, run as written against a live server."""
    address = await dispatch_factory(triton_url=f"127.0.0.1:{free_port()}", triton_check_s=0)
    rc, out, _ = await grpcurl("-plaintext", address, "list")
    assert rc == 0 and "constellation.v1.DispatchService" in out.split()
    rc, out, _ = await grpcurl("-plaintext", address, "describe", "constellation.v1.DispatchService")
    assert rc == 0 and "returns ( stream .constellation.v1.AskResponse )" in out
    rc, out, _ = await grpcurl("-plaintext", address, "grpc.health.v1.Health/Check")
    assert rc == 0 and '"SERVING"' in out
    plan = '{"request": {"prompt": "Name three colours."}}'
    rc, out, _ = await grpcurl("-plaintext", "-d", plan, address, "constellation.v1.DispatchService/Plan")
    assert rc == 0 and '"policy": "single"' in out
    bad = '{"prompt": "", "sampling": {"temperature": 5}}'
    rc, _, err = await grpcurl("-plaintext", "-d", bad, address, "constellation.v1.DispatchService/Ask")
    assert rc != 0 and "InvalidArgument" in err and '"field":"sampling.temperature"' in err


async def test_dispatch_classifies_and_survives_a_classifier_outage(dispatch_factory, spans) -> None:  # type: ignore[no-untyped-def]
    """Plan carries the classifier's answer and the Ask span its labels; a dead classifier loses nothing."""
    from constellation.config import load_config
    from services.classifier.config import ClassifierConfig
    from services.classifier.main import running_classifier

    config = load_config(ClassifierConfig, None, port=0, policy="keyword", encoder=False, shutdown_grace_s=0.5)
    async with running_classifier(config) as classifier:
        address = await dispatch_factory(
            triton_url=f"127.0.0.1:{free_port()}", classifier_url=f"127.0.0.1:{classifier.port}", triton_check_s=0
        )
        async with DispatchClient(address) as client:
            response = await client.plan(ask_request("Solve 12 * 7 + 3. What is the result?"))
            assert response.classification.task == common_pb2.TASK_TYPE_MATH
            assert response.classification.decided_by == "keyword"
            with pytest.raises(Unavailable):  # no Triton: the Ask fails after classification
                await collect(address, ask_request("Solve 12 * 7 + 3. What is the result?", max_tokens=4))
    ask_spans = [s for s in spans.get_finished_spans() if s.name.endswith("DispatchService/Ask")]
    assert any((s.attributes or {}).get("constellation.task") == "TASK_TYPE_MATH" for s in ask_spans)
    # The classifier is gone now: dispatch goes on unclassified instead of failing the request.
    async with DispatchClient(address) as client:
        response = await client.plan(ask_request("Solve 12 * 7 + 3. What is the result?"))
    assert not response.HasField("classification")
    assert [c.model for c in response.plan.candidates] == ["smollm2"]
