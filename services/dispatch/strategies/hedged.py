"""A hedged call: the member, and a backup request if the member is slow to its first token.

Whichever of the two produces text first wins and streams; the other is cancelled inside Triton. A
member that fails before the hedge delay starts the backup at once (a fallback). The single strategy
uses this for each attempt when a hedge delay applies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from opentelemetry import trace

from constellation.errors import ConstellationError, DeadlineExceeded
from constellation.semconv import CancelReason, Outcome, Phase, Role
from constellation.tasks import cancel_and_wait
from services.dispatch.accounting import HEDGES
from services.dispatch.calls import CallResult, Run
from services.dispatch.events import CandidateProgress, Delta, Event
from services.dispatch.generation import ModelCaller
from services.dispatch.strategies import replaceable

Item = tuple[Role, Event | CallResult]
"""What a racing call reports: its role and one of its events, or its result when it has ended."""


class HedgedCall:
    """One race between a member and its hedge; :meth:`events` runs it.

    Args:
        caller: Calls the models.
        run: The request.
        member: The member's result, filled in as it runs.
        hedge: The backup's result (role ``hedge``), filled in if it is sent.
        delay_s: How long the member may go without a first token before the hedge is sent.
        pre_events: Events to yield once the member's request has left (the plan).
    """

    def __init__(
        self,
        caller: ModelCaller,
        run: Run,
        member: CallResult,
        hedge: CallResult,
        delay_s: float,
        pre_events: Sequence[Event] = (),
    ):
        self.caller = caller
        self.run = run
        self.calls = {Role.MEMBER: member, Role.HEDGE: hedge}
        self.delay_s = delay_s
        self.pre_events = pre_events
        self.winner: Role | None = None
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._tasks: dict[Role, asyncio.Task[None]] = {}

    async def events(self) -> AsyncGenerator[Event, None]:
        """The winner's events (and the cancelled loser's ``cancelled``); raises when both calls fail.

        Raises:
            ConstellationError: the winner failed after it streamed text, or both calls failed.
            DeadlineExceeded: neither call answered before the request's deadline.
        """
        self._launch(Role.MEMBER, self.pre_events)
        hedge_at = time.perf_counter() + self.delay_s
        try:
            while True:
                if self.winner is None and not self._hedge_sent and time.perf_counter() >= hedge_at:
                    self._send_hedge()
                    continue
                item = await self._next(hedge_at)
                if item is None:
                    continue
                role, thing = item
                if isinstance(thing, CallResult):
                    if self._ended(role, thing):
                        return
                    continue
                if self.winner is None and isinstance(thing, Delta):
                    self.winner = role
                    cancelled = await self._cancel_loser()
                    if cancelled is not None:
                        yield cancelled
                if role == self.winner or (self.winner is None and not isinstance(thing, Delta)):
                    yield thing
        finally:
            await cancel_and_wait(self._tasks.values())

    @property
    def _hedge_sent(self) -> bool:
        return Role.HEDGE in self._tasks

    def _launch(self, role: Role, pre_events: Sequence[Event] = ()) -> None:
        self._tasks[role] = asyncio.create_task(self._pump(self.calls[role], pre_events))

    def _send_hedge(self) -> None:
        HEDGES.labels(self.caller.accounting.label(self.calls[Role.MEMBER].model)).inc()
        backup = self.calls[Role.HEDGE].model
        trace.get_current_span().add_event("hedged", {"after_ms": self.delay_s * 1000, "backup": backup})
        self._launch(Role.HEDGE)

    async def _pump(self, result: CallResult, pre_events: Sequence[Event]) -> None:
        """Runs one call, putting its events and finally its result on the queue."""
        try:
            generation = self.caller.generate(result, self.run.query, self.run.ends_at, pre_events=pre_events)
            async with aclosing(generation) as events:
                async for event in events:
                    self._queue.put_nowait((result.role, event))
        except ConstellationError as exc:
            result.error = exc
        self._queue.put_nowait((result.role, result))

    async def _next(self, hedge_at: float) -> Item | None:
        """The next item; None when the hedge delay passed first (time to send the hedge).

        Before the hedge is sent the wait ends at the hedge delay, after it at the request's deadline.
        """
        wait = (self.run.ends_at if self._hedge_sent else hedge_at) - time.perf_counter()
        try:
            return await asyncio.wait_for(self._queue.get(), wait if wait > 0 else None)
        except TimeoutError:
            if self._hedge_sent:
                raise DeadlineExceeded("neither the model nor its hedge answered in time") from None
            return None

    def _ended(self, role: Role, result: CallResult) -> bool:
        """Handles the end of one call; True when the race is over (the winner finished).

        A call that finishes without error before any text wins (an empty answer is an answer).
        """
        if result.error is None and self.winner is None:
            self.winner = role
        if self.winner == role:
            if result.error is not None:
                raise result.error  # the winner failed mid-stream: its text was sent, no fallback
            return True
        other = Role.HEDGE if role == Role.MEMBER else Role.MEMBER
        if other not in self._tasks:  # the member failed before the hedge delay: ask the backup now
            if result.error is not None and not replaceable(result.error):
                raise result.error  # another model would fail the same way (see replaceable)
            self._launch(other)
            return False
        if self.calls[other].error is not None and result.error is not None:
            raise result.error  # both failed
        return False

    async def _cancel_loser(self) -> CandidateProgress | None:
        """Cancels the call that did not win, if it is still running; the event that says so."""
        loser = Role.HEDGE if self.winner == Role.MEMBER else Role.MEMBER
        task = self._tasks.get(loser)
        if task is None or task.done():
            return None
        result = self.calls[loser]
        result.cancel_reason = CancelReason.HEDGE
        await cancel_and_wait([task])
        result.outcome = Outcome.CANCELLED
        return CandidateProgress(result.model, Phase.CANCELLED, self.run.elapsed_ms())
