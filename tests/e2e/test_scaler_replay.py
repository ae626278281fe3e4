"""Capacity of the replay model in a real Triton: one instance with ``max_concurrency`` 1 serves concurrent
requests one after another (so latency grows with load), and loading an instance takes its SIMULATED load
time. Both are checked as lower bounds on wall time (a loaded machine can only make them longer).

A module-scoped Triton loads only ``replay`` (no torch) over a one-model pool written here; the scaler's
Triton actuator unloads it and loads it again with two instances.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from constellation.net import free_port
from constellation.triton import Sampling, TritonClient
from services.inference.launcher import TritonServer
from services.scaler.actuators import TritonActuator

MODEL = "replay"
TIME_SCALE = 0.05
LOAD_SCALE = 0.05
LOAD_S = 20.0  # simulated seconds for a small model here: 1 s of real waiting at LOAD_SCALE
PROMPT = "Name three rivers."
RECORDED = "rivers-7b"


def write_pool(directory: Path) -> Path:
    cards = {RECORDED: {"params_b": 7.0, "open_weights": True, "price_in_per_mtok": 0.1, "price_out_per_mtok": 0.1}}
    (directory / "models.json").write_text(json.dumps(cards), encoding="utf-8")
    answer = {"text": "Nile, Amazon, Danube. " * 10, "answer": None, "correct": None, "score": None}
    answer |= {"input_tokens": 5, "output_tokens": 60, "cost_usd": 0.00001}
    record = {"id": "rivers/0", "task": "rivers", "split": "test", "prompt": PROMPT, "reference": None}
    record |= {"answer_kind": "open", "responses": {RECORDED: answer}}
    pool = directory / "rivers.jsonl.gz"
    with gzip.open(pool, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    return pool


@pytest.fixture(scope="module")
def capped_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    if importlib.util.find_spec("pytriton") is None:
        pytest.skip("package nvidia-pytriton is not installed")
    pool = write_pool(tmp_path_factory.mktemp("rivers-pool"))
    parameters = {
        "pool_paths": str(pool),
        "time_scale": TIME_SCALE,
        "max_concurrency": 1,
        "load_time_s": json.dumps({"small": LOAD_S}),
        "load_time_scale": LOAD_SCALE,
        "latency_profile": json.dumps({"ttft_sigma": 0, "per_token_sigma": 0}),
    }
    server = TritonServer(
        [MODEL],
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        run_dir=tmp_path_factory.mktemp("triton-capped"),
        model_parameters={MODEL: parameters},
    )
    server.start()
    try:
        server.wait_ready(timeout=60)
        yield server
    finally:
        server.stop()
    assert server.returncode == 0, server.log_tail()


async def answer(client: TritonClient, max_tokens: int | None = None) -> int:
    """Streams the recorded answer; returns its output tokens."""
    last = 0
    async for chunk in client.generate(
        MODEL, PROMPT, Sampling(max_tokens=max_tokens), timeout_s=60, parameters={"recorded_model": RECORDED}
    ):
        last = chunk.output_tokens
    return last


async def test_one_instance_serves_concurrent_requests_one_at_a_time(capped_triton: TritonServer) -> None:
    # ttft 120 ms + 59 x 8 ms = 592 simulated ms (no tail), 29.6 ms real each at TIME_SCALE.
    single_s = (120.0 + 59 * 8.0) / 1000.0 * TIME_SCALE
    async with TritonClient(capped_triton.grpc_url) as client:
        assert await answer(client) == 60
        started = time.monotonic()
        tokens = await asyncio.gather(*(answer(client) for _ in range(6)))
        wall = time.monotonic() - started
    assert tokens == [60] * 6
    assert wall >= 6 * single_s * 0.95, f"6 requests took {wall:.3f} s; one at a time needs {6 * single_s:.3f} s"
    log = capped_triton.log_file.read_text(errors="replace")
    assert "max_concurrency 1" in log and f"SIMULATED load of a small model: {LOAD_S:g} s" in log


async def test_loading_instances_takes_the_simulated_load_time(capped_triton: TritonServer) -> None:
    actuator = TritonActuator(capped_triton.grpc_url, model_repository=capped_triton.served_model_repository)
    try:
        assert await actuator.replicas(MODEL) == 1
        await actuator.scale(MODEL, 0)
        started = time.monotonic()
        await actuator.scale(MODEL, 2)
        loaded_s = time.monotonic() - started
        assert await actuator.replicas(MODEL) == 2
    finally:
        await actuator.close()
    assert loaded_s >= LOAD_S * LOAD_SCALE * 0.95, f"two instances loaded in {loaded_s:.2f} s"
    async with TritonClient(capped_triton.grpc_url) as client:
        assert await answer(client, max_tokens=5) == 5
