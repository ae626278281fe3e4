"""Capacity of the replay model: the per-instance concurrency cap (the rest queue, in order, and may be
cancelled while waiting) and the SIMULATED load time by size class."""

from __future__ import annotations

import asyncio

import pytest

from constellation.pools import ModelCard
from services.inference.replay import DEFAULT_LOAD_S, ConcurrencyCap, LatencyModel, load_seconds


async def test_the_cap_serves_limit_requests_and_queues_the_rest_in_order() -> None:
    cap = ConcurrencyCap(2)
    served: list[int] = []

    async def request(n: int) -> None:
        assert await cap.acquire(lambda: False, poll_s=0.01)
        served.append(n)

    tasks = [asyncio.create_task(request(n)) for n in range(4)]
    await asyncio.sleep(0.05)
    assert (served, cap.in_service, cap.waiting) == ([0, 1], 2, 2)
    cap.release()
    await asyncio.sleep(0.05)
    assert (served, cap.in_service, cap.waiting) == ([0, 1, 2], 2, 1)
    cap.release()
    await asyncio.gather(*tasks)
    assert served == [0, 1, 2, 3]


async def test_a_cancelled_waiter_leaves_the_queue_without_a_slot() -> None:
    cap = ConcurrencyCap(1)
    assert await cap.acquire(lambda: False, poll_s=0.01)
    gone = asyncio.Event()
    waiter = asyncio.create_task(cap.acquire(gone.is_set, poll_s=0.01))
    await asyncio.sleep(0.03)
    assert cap.waiting == 1
    gone.set()
    assert await waiter is False
    assert (cap.in_service, cap.waiting) == (1, 0)
    cap.release()
    assert await asyncio.wait_for(cap.acquire(lambda: False, poll_s=0.01), 1.0)  # the slot was not lost


async def test_no_cap_at_zero() -> None:
    cap = ConcurrencyCap(0)
    assert all([await cap.acquire(lambda: False, poll_s=0.01) for _ in range(100)])
    assert (cap.in_service, cap.waiting) == (100, 0)
    with pytest.raises(ValueError):
        ConcurrencyCap(-1)


def test_load_time_follows_the_largest_size_class_or_the_named_model() -> None:
    latency = LatencyModel(
        cards={"tiny": ModelCard(name="tiny", params_b=7.0), "huge": ModelCard(name="huge", params_b=400.0)}
    )
    assert load_seconds(latency, ["tiny", "huge"]) == ("xl", DEFAULT_LOAD_S["xl"])
    assert load_seconds(latency, ["tiny", "huge"], load_as="tiny") == ("small", DEFAULT_LOAD_S["small"])
    assert load_seconds(latency, ["tiny"], table={"small": 0.5}) == ("small", 0.5)
    with pytest.raises(ValueError):
        load_seconds(latency, ["tiny"], table={"tiny": 1.0})
    with pytest.raises(ValueError):
        load_seconds(latency, ["tiny"], table={"small": -1.0})
