"""The registry's readiness prober against a real Triton (CPU, the ``replay`` model): a model marked
UNHEALTHY by failed calls comes back once Triton's ModelReady says ready, and turns UNHEALTHY again
when Triton goes away. Nothing is timed beyond generous hang-catching bounds."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from constellation.config import load_config
from constellation.net import free_port
from constellation.v1 import common_pb2, registry_pb2
from services.inference.launcher import TritonServer
from services.registry.client import RegistryClient, RegistryView
from services.registry.config import RegistryConfig
from services.registry.main import running_registry


def _pool(directory: Path) -> Path:
    (directory / "models.json").write_text(json.dumps({"tiny-7b": {"params_b": 7.0}}), encoding="utf-8")
    pool = directory / "tiny.jsonl.gz"
    response: dict[str, Any] = {"text": "Paris.", "answer": None, "correct": None, "score": None, "input_tokens": 4}
    response.update(output_tokens=2, cost_usd=0.0)
    row: dict[str, Any] = {
        "id": "tiny/0",
        "task": "tiny",
        "split": "test",
        "prompt": "Capital of France?",
        "reference": None,
    }
    row.update(answer_kind="open", responses={"tiny-7b": response})
    with gzip.open(pool, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
    return pool


async def test_probe_recovers_a_model_and_flags_a_stopped_triton(tmp_path: Path) -> None:
    if importlib.util.find_spec("pytriton") is None:
        pytest.skip("package nvidia-pytriton is not installed")
    triton = TritonServer(
        ["replay"],
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        run_dir=tmp_path / "triton",
        model_parameters={"replay": {"pool_paths": str(_pool(tmp_path)), "time_scale": 0.05}},
    )
    triton.start()
    try:
        triton.wait_ready(timeout=60)
        config = load_config(
            RegistryConfig,
            None,
            port=0,
            db=str(tmp_path / "registry.sqlite"),
            shutdown_grace_s=0.5,
            probe_interval_s=0.5,
            unhealthy_probe_interval_s=0.1,
            min_unhealthy_s=0.0,
            watch_coalesce_s=0.1,
        )
        async with running_registry(config) as running:
            address = f"127.0.0.1:{running.port}"
            backend = common_pb2.Backend(
                endpoint=triton.grpc_url.removeprefix("grpc://"),
                model_name="replay",
                parameters={"recorded_model": "tiny-7b"},
            )
            states: list[int] = []

            def seen(change: int, record: registry_pb2.ModelRecord) -> None:
                states.append(record.state)

            async with RegistryClient(address) as client, RegistryView(address, on_change=seen) as view:
                await client.register(registry_pb2.ModelRecord(name="tiny-7b", backend=backend))
                await view.ready(10)
                failures = [registry_pb2.Outcome(model="tiny-7b", success=False, error_code="UNAVAILABLE")] * 5
                assert await client.report(failures) == 5
                unhealthy, ready = common_pb2.MODEL_STATE_UNHEALTHY, common_pb2.MODEL_STATE_READY
                # First the burst turns it UNHEALTHY, then Triton's ModelReady brings it back.
                await view.wait_for(lambda m: unhealthy in states and states[-1] == ready, timeout_s=30)
                assert (await client.get("tiny-7b")).stats.error_rate == 0.0

                triton.stop()
                await view.wait_for(lambda m: m["tiny-7b"].state == common_pb2.MODEL_STATE_UNHEALTHY, timeout_s=30)
    finally:
        triton.stop()
