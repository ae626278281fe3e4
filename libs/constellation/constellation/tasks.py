"""Background tasks: starting one under a name and stopping several without swallowing the caller's cancel.

Every service keeps a few long-lived tasks (a watch, a flusher, a prober, a batcher) and dispatch races
short-lived ones (hedges, wave members). Stopping them is always the same three steps: cancel what is
still running, wait until each has really ended (so a Triton stream it held is closed), and re-raise
nothing but a cancellation of the *caller* itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any] | None]) -> None:
    """Cancels every task still running and waits until all have ended.

    Exceptions of the tasks (their own cancellation included) are dropped: the caller decided to stop
    them. If the caller is itself cancelled while waiting, the wait still completes before the
    ``CancelledError`` propagates, so no task outlives the call.
    """
    pending = [task for task in tasks if task is not None]
    for task in pending:
        if not task.done():
            task.cancel()
    if not pending:
        return
    gathered = asyncio.gather(*pending, return_exceptions=True)
    try:
        await asyncio.shield(gathered)
    except asyncio.CancelledError:
        await gathered
        raise


class BackgroundTask:
    """One named long-lived task with idempotent ``start`` and ``stop``.

    ``start`` needs a running loop; calling it twice starts one task. ``stop`` cancels and awaits it
    and may be called any number of times (also before ``start``).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task[Any] | None = None

    @property
    def running(self) -> bool:
        """True while the task has been started and has not ended."""
        return self._task is not None and not self._task.done()

    def start(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Runs ``coroutine`` as the task, unless one is already running (then it is closed unused)."""
        if self.running:
            coroutine.close()
            return
        self._task = asyncio.create_task(coroutine, name=self.name)

    async def stop(self) -> None:
        """Cancels the task and waits until it has ended."""
        task, self._task = self._task, None
        await cancel_and_wait([task])
