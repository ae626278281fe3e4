"""End-to-end tests of the replay model in a real Triton, through ``constellation.triton.TritonClient``.

A module-scoped Triton loads only ``replay`` (no torch: ready in about a second) over a tiny pool this
file writes, at ``time_scale`` 0.05 (a simulated second takes 50 ms). Simulated latencies are checked
against :class:`services.inference.replay.LatencyModel` with the same seed; wall-clock assertions are
generous bounds around the scaled simulated times.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import importlib.util
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import InferInput
from tritonclient.grpc.aio import InferenceServerClient

from constellation.errors import DeadlineExceeded, NotFound
from constellation.net import free_port
from constellation.semconv import Phase
from constellation.triton import Chunk, Sampling, TritonClient
from services.dispatch.config import ModelEntry
from services.dispatch.events import CandidateProgress, Finished
from services.inference.launcher import SHM_DIR, TritonServer
from services.inference.replay import LatencyModel, ReplayIndex
from tests.e2e.processes import process_group_alive
from tests.e2e.triton_metrics import generations, in_flight, scrape
from tests.unit.dispatch_fakes import config, plan, planned, run_plan

MODEL = "replay"
TIME_SCALE = 0.05
SEED = 7
CARDS = {
    "tiny-7b": {"params_b": 7.0, "open_weights": True, "price_in_per_mtok": 0.2, "price_out_per_mtok": 0.2},
    "huge-400b": {"params_b": 400.0, "open_weights": True, "price_in_per_mtok": 3.0, "price_out_per_mtok": 15.0},
}
FRANCE = "What is the capital of France?"
SEA = "Write a long essay about the sea."  # huge-400b: 200 tokens, ~0.34 s at TIME_SCALE
ROME = "Tell me everything about the history of Rome."  # huge-400b: 2000 tokens, ~3.2 s at TIME_SCALE
PARIS = "The capital of France is Paris, on the Seine. It is famous for the Eiffel Tower and the Louvre. " * 2
UNICODE = "Paris — die Hauptstadt Frankreichs 🇫🇷. Grüße, ça va? 東京ではありません。 " * 3
SEA_TEXT = "The sea is vast and deep and old. " * 24
ROME_TEXT = "Rome was founded, grew, ruled and fell. " * 200


def _response(text: str, input_tokens: int | None, output_tokens: int | None, cost: float | None) -> dict[str, Any]:
    return {
        "text": text,
        "answer": None,
        "correct": None,
        "score": None,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cost_usd": cost,
    }


def _write_pool(directory: Path) -> Path:
    rows = [
        (
            FRANCE,
            {
                "tiny-7b": _response(PARIS, 8, 45, 0.0000123),
                "huge-400b": _response(UNICODE, None, None, None),  # tokens estimated, cost from prices
            },
        ),
        (SEA, {"tiny-7b": _response("Waves.", 9, 2, 0.0000022), "huge-400b": _response(SEA_TEXT, 9, 200, 0.003)}),
        (ROME, {"tiny-7b": _response("Old.", 9, 2, 0.0000022), "huge-400b": _response(ROME_TEXT, 10, 2000, 0.03)}),
    ]
    (directory / "models.json").write_text(json.dumps(CARDS), encoding="utf-8")
    pool = directory / "tiny.jsonl.gz"
    with gzip.open(pool, "wt", encoding="utf-8") as handle:
        for n, (prompt, responses) in enumerate(rows):
            record = {
                "id": f"tiny/{n}",
                "task": "tiny",
                "split": "test",
                "prompt": prompt,
                "reference": None,
                "answer_kind": "open",
                "responses": responses,
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return pool

    return True


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_pool(tmp_path_factory.mktemp("replay-pool"))


@pytest.fixture(scope="module")
def replay_triton(tmp_path_factory: pytest.TempPathFactory, pool: Path) -> Iterator[TritonServer]:
    """Triton with only ``replay`` loaded; stopped at the end and checked clean (exit 0, no leftovers)."""
    if importlib.util.find_spec("pytriton") is None:
        pytest.skip("package nvidia-pytriton is not installed")
    run_dir = tmp_path_factory.mktemp("triton-replay")
    server = TritonServer(
        [MODEL],
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        run_dir=run_dir,
        model_parameters={
            MODEL: {"pool_paths": str(pool), "time_scale": TIME_SCALE, "tokens_per_chunk": 4, "latency_seed": SEED}
        },
    )
    server.start()
    pgid = server.pid
    assert pgid is not None
    try:
        server.wait_ready(timeout=60)
        assert server.served_model_repository == run_dir / "model_repository"
        yield server
    finally:
        server.stop()
    assert server.returncode == 0, f"tritonserver exit status {server.returncode}; log tail:\n{server.log_tail()}"
    assert not process_group_alive(pgid), f"processes of group {pgid} survived stop()"
    assert list(SHM_DIR.glob(f"{server.shm_prefix}*")) == []
    log = server.log_file.read_text(errors="replace")
    assert "latency is SIMULATED" in log


@pytest.fixture(scope="module")
def latency(pool: Path) -> LatencyModel:
    """The latency model the server uses (same pool cards, same seed)."""
    return LatencyModel(seed=SEED, cards=ReplayIndex.from_pools([pool]).cards)


@pytest.fixture
async def client(replay_triton: TritonServer) -> AsyncIterator[TritonClient]:
    async with TritonClient(replay_triton.grpc_url) as c:
        yield c


async def _replay(
    client: TritonClient, prompt: str, recorded_model: str | None, sampling: Sampling | None = None
) -> list[Chunk]:
    parameters = {} if recorded_model is None else {"recorded_model": recorded_model}
    generation = client.generate(MODEL, prompt, sampling or Sampling(), timeout_s=30, parameters=parameters)
    return [chunk async for chunk in generation]


async def test_streams_the_recorded_answer(client: TritonClient, latency: LatencyModel) -> None:
    chunks = await _replay(client, FRANCE, "tiny-7b")
    assert "".join(c.text for c in chunks) == PARIS
    assert len(chunks) >= 5
    assert all(not c.final and c.finish_reason == "" for c in chunks[:-1])
    counts = [c.output_tokens for c in chunks]
    assert counts == sorted(counts)
    final = chunks[-1]
    assert final.final and final.finish_reason == "stop"
    assert (final.input_tokens, final.output_tokens) == (8, 45)
    assert final.cost_usd == pytest.approx(0.0000123)
    simulated = latency.simulate("tiny-7b", FRANCE, 45)
    assert final.simulated_ttft_ms == pytest.approx(simulated.ttft_ms)
    assert final.simulated_total_ms == pytest.approx(simulated.total_ms)
    assert chunks[0].simulated_ttft_ms == pytest.approx(simulated.ttft_ms)


async def test_estimated_tokens_and_cost_from_prices(client: TritonClient, latency: LatencyModel) -> None:
    chunks = await _replay(client, FRANCE, "huge-400b")
    assert "".join(c.text for c in chunks) == UNICODE
    final = chunks[-1]
    n_in, n_out = round(len(FRANCE) / 4), round(len(UNICODE) / 4)
    assert (final.input_tokens, final.output_tokens) == (n_in, n_out)
    assert final.cost_usd == pytest.approx((n_in * 3.0 + n_out * 15.0) / 1e6)
    assert final.simulated_total_ms == pytest.approx(latency.simulate("huge-400b", FRANCE, n_out).total_ms)


async def test_really_waits_the_scaled_simulated_time(client: TritonClient, latency: LatencyModel) -> None:
    expected_s = latency.simulate("huge-400b", SEA, 200).total_ms / 1000 * TIME_SCALE
    started = time.monotonic()
    chunks = await _replay(client, SEA, "huge-400b")
    elapsed = time.monotonic() - started
    assert "".join(c.text for c in chunks) == SEA_TEXT
    # The lower bound is the behaviour (the model really waits); the upper one only catches a hang.
    assert expected_s * 0.95 <= elapsed <= expected_s + 10.0


@pytest.mark.parametrize(
    ("prompt", "recorded_model", "fragments"),
    [
        (FRANCE, "gpt-17", ["gpt-17", "not found"]),
        (
            "What is the capital of Atlantis? " * 4,
            "tiny-7b",
            ["tiny-7b", "not found", "What is the capital of Atlantis?"],
        ),
        (FRANCE, None, ["recorded_model", "not found"]),
    ],
)
async def test_unknown_is_not_found(
    client: TritonClient, prompt: str, recorded_model: str | None, fragments: list[str]
) -> None:
    with pytest.raises(NotFound) as caught:
        await _replay(client, prompt, recorded_model)
    for fragment in fragments:
        assert fragment in caught.value.message
    assert prompt[60:] not in caught.value.message or len(prompt) <= 60


async def test_max_tokens_truncates_with_length(client: TritonClient) -> None:
    chunks = await _replay(client, FRANCE, "tiny-7b", Sampling(max_tokens=10, temperature=0.3, seed=1))
    text = "".join(c.text for c in chunks)
    final = chunks[-1]
    assert final.finish_reason == "length" and final.output_tokens == 10
    assert PARIS.startswith(text) and 0 < len(text) < len(PARIS)
    assert final.cost_usd == pytest.approx((8 * 0.2 + 10 * 0.2) / 1e6)


async def test_without_stream_one_response(replay_triton: TritonServer) -> None:
    text_input = InferInput("text_input", [1], "BYTES")
    text_input.set_data_from_numpy(np.array([FRANCE.encode()], dtype=np.object_))
    stream = InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([False], dtype=bool))

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {
            "model_name": MODEL,
            "inputs": [text_input, stream],
            "request_id": uuid.uuid4().hex,
            "parameters": {"recorded_model": "tiny-7b"},
        }

    client = InferenceServerClient(replay_triton.grpc_url)
    try:
        results = []
        responses = client.stream_infer(requests())
        async with asyncio.timeout(30):
            async for result, error in responses:
                assert error is None
                results.append(result)
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
            # Read the stream to its end: a client that walks away right after the final response leaves
            # Triton 2.51's stream handler waiting, and the model then never unloads (exit status 1).
            assert [item async for item in responses] == []
    finally:
        await client.close()
    assert len(results) == 1
    assert results[0].as_numpy("text_output")[0].decode() == PARIS
    assert results[0].as_numpy("finish_reason")[0].decode() == "stop"
    assert int(results[0].as_numpy("num_output_tokens")[0]) == 45


async def test_concurrent_requests_wait_concurrently(client: TritonClient, latency: LatencyModel) -> None:
    each_s = latency.simulate("huge-400b", SEA, 200).total_ms / 1000 * TIME_SCALE
    assert each_s > 0.25  # the pool is built so that each request waits ~0.3 s

    async def one() -> tuple[str, float]:
        started = time.monotonic()
        chunks = await _replay(client, SEA, "huge-400b")
        return "".join(c.text for c in chunks), time.monotonic() - started

    started = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(20)))
    elapsed = time.monotonic() - started
    assert all(text == SEA_TEXT for text, _ in results)
    assert all(duration >= each_s * 0.95 for _, duration in results)
    assert elapsed < 20 * each_s / 2, (  # serialised would be 20x; generous for a loaded CI machine
        f"20 requests took {elapsed:.2f} s; serialised they would take {20 * each_s:.1f} s"
    )


async def test_cancel_mid_stream_stops_promptly(client: TritonClient, replay_triton: TritonServer) -> None:
    before = await asyncio.to_thread(scrape, replay_triton)
    assert in_flight(before, MODEL) == 0
    generation = client.generate(MODEL, ROME, Sampling(), timeout_s=30, parameters={"recorded_model": "huge-400b"})
    async with contextlib.aclosing(generation):
        first = await anext(generation)
        second = await anext(generation)
        assert not first.final and not second.final
        during = await asyncio.to_thread(scrape, replay_triton)
        assert in_flight(during, MODEL) == 1
    cancelled_at = time.monotonic()  # leaving the block closed the generator, which cancels the request

    deadline = cancelled_at + 10
    while True:
        now = await asyncio.to_thread(scrape, replay_triton)
        if in_flight(now, MODEL) == 0:
            break
        assert time.monotonic() < deadline, "replay still in flight 10 s after the cancel"
        await asyncio.sleep(0.02)
    # It ended as cancelled, not by running to its end (which would count as "stop"): no timing needed.
    assert generations(now, "cancelled", MODEL) == generations(before, "cancelled", MODEL) + 1
    assert generations(now, "stop", MODEL) == generations(before, "stop", MODEL)


async def test_a_stream_left_before_its_first_read_is_cancelled_in_triton(
    client: TritonClient, replay_triton: TritonServer
) -> None:
    """Dispatch enters a stream, then sends the plan before it reads: a caller gone by then must not leak it."""
    before = await asyncio.to_thread(scrape, replay_triton)
    assert in_flight(before, MODEL) == 0
    stream = client.stream(MODEL, ROME, Sampling(), timeout_s=30, parameters={"recorded_model": "huge-400b"})
    async with stream:
        deadline = time.monotonic() + 10
        while in_flight(await asyncio.to_thread(scrape, replay_triton), MODEL) == 0:
            assert time.monotonic() < deadline, "the request never reached the model after entering the stream"
            await asyncio.sleep(0.01)
    deadline = time.monotonic() + 10
    while in_flight(now := await asyncio.to_thread(scrape, replay_triton), MODEL) > 0:
        assert time.monotonic() < deadline, "replay still in flight 10 s after leaving the stream"
        await asyncio.sleep(0.02)
    assert generations(now, "cancelled", MODEL) == generations(before, "cancelled", MODEL) + 1
    assert generations(now, "stop", MODEL) == generations(before, "stop", MODEL)


async def test_a_cascade_whose_last_wave_cannot_finish_in_time_answers_with_its_first_wave(
    client: TritonClient, replay_triton: TritonServer
) -> None:
    """Wave 1 (tiny-7b) answers at once; wave 2 (huge-400b, ~3.2 s for ROME) cannot finish in the 1.5 s
    budget: the caller still gets wave 1's answer, uncertain, with the timeout first in its problems."""
    entries = {
        name: ModelEntry(triton_model=MODEL, parameters={"recorded_model": recorded})
        for name, recorded in (("tiny", "tiny-7b"), ("huge", "huge-400b"))
    }
    made = plan("cascade", [planned("tiny"), planned("huge", wave=1)])
    started = time.monotonic()
    events = await run_plan(
        made, client, config(), answer_kind="open", budget_s=1.5, prompt=ROME, entries=entries, max_tokens=4096
    )
    elapsed = time.monotonic() - started
    done = events[-1]
    assert isinstance(done, Finished)
    assert done.text == "Old."
    assert done.uncertain
    assert isinstance(done.problems[0], DeadlineExceeded)
    assert done.problems[0].reason == "WAVE_TIMED_OUT"
    assert [e.model for e in events if isinstance(e, CandidateProgress) and e.phase == Phase.CANCELLED] == ["huge"]
    assert elapsed < 3.0
    await asyncio.sleep(0.2)
    assert in_flight(await asyncio.to_thread(scrape, replay_triton), MODEL) == 0
