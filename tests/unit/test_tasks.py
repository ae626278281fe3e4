"""cancel_and_wait and BackgroundTask: tasks end before the call returns, and a caller's cancel survives."""

from __future__ import annotations

import asyncio

import pytest

from constellation.tasks import BackgroundTask, cancel_and_wait


async def test_cancel_and_wait_ends_every_task_and_keeps_results_of_finished_ones() -> None:
    ended: list[str] = []

    async def sleeper(name: str) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            ended.append(name)

    done = asyncio.ensure_future(asyncio.sleep(0, result="ok"))
    await done
    running = [asyncio.create_task(sleeper(n)) for n in ("a", "b")]
    await asyncio.sleep(0)
    await cancel_and_wait([*running, done, None])
    assert sorted(ended) == ["a", "b"]
    assert all(t.cancelled() for t in running)
    assert done.result() == "ok"


async def test_a_cancelled_caller_still_waits_for_its_tasks_then_is_cancelled() -> None:
    stopped = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)
            stopped.set()
            raise

    child = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)

    async def caller() -> None:
        await cancel_and_wait([child])

    outer = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert stopped.is_set() and child.done()


async def test_background_task_starts_once_and_stops_idempotently() -> None:
    runs = 0

    async def loop() -> None:
        nonlocal runs
        runs += 1
        await asyncio.sleep(60)

    task = BackgroundTask("probe")
    await task.stop()
    task.start(loop())
    task.start(loop())
    await asyncio.sleep(0)
    assert task.running and runs == 1
    await task.stop()
    await task.stop()
    assert not task.running
