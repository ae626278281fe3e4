"""A fake model server for dispatch's strategy tests, and the wiring that hands it to the strategies.

:class:`FakeGenerator` stands where Triton stands (the :class:`services.dispatch.generation.Generator`
seam): each model follows a :class:`Script` (how long before its first token, what it writes, or how it
fails), and the fake records which models were called, when, and which calls were cancelled while the
model was still working.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from constellation.errors import ConstellationError
from constellation.semconv import Policy
from constellation.triton import Chunk, Sampling
from services.dispatch.accounting import Accounting
from services.dispatch.aggregation import Aggregator
from services.dispatch.calls import Run
from services.dispatch.capacity import CallCapacity
from services.dispatch.config import DispatchConfig, ModelEntry
from services.dispatch.events import Event, PlanMade
from services.dispatch.generation import Generator, ModelCaller
from services.dispatch.query import Query
from services.dispatch.routing import PlannedModel
from services.dispatch.strategies import STRATEGIES, Toolkit


@dataclass(frozen=True)
class Script:
    """How one fake model behaves: ``first_after_s`` of silence, then ``text`` in two chunks, or ``fails``."""

    text: str = "ok"
    first_after_s: float = 0.0
    fails: ConstellationError | None = None


@dataclass
class FakeGenerator:
    """A scripted stand-in for Triton's generation stream."""

    scripts: Mapping[str, Script]
    url: str = "fake-triton:0"
    started: dict[str, float] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)

    def stream(
        self,
        model: str,
        prompt: str,
        sampling: Sampling,
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        request_id: str = "",
        parameters: Mapping[str, str] | None = None,
        convention: str = "constellation",
    ) -> FakeStream:
        return FakeStream(self, model, self.scripts[model])


class FakeStream:
    """One fake generation: an async context manager and an async iterator of chunks."""

    def __init__(self, owner: FakeGenerator, model: str, script: Script):
        self.owner = owner
        self.model = model
        self.script = script
        self.chunks: list[Chunk] | None = None

    async def __aenter__(self) -> FakeStream:
        self.owner.started[self.model] = time.perf_counter()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Chunk:
        if self.chunks is None:
            try:
                await asyncio.sleep(self.script.first_after_s)
            except asyncio.CancelledError:
                self.owner.cancelled.append(self.model)
                raise
            if self.script.fails is not None:
                raise self.script.fails
            half = len(self.script.text) // 2
            self.chunks = [
                Chunk(self.script.text[:half], input_tokens=5, output_tokens=1),
                Chunk(self.script.text[half:], input_tokens=5, output_tokens=2, finish_reason="stop", final=True),
            ]
        if not self.chunks:
            self.owner.completed.append(self.model)
            raise StopAsyncIteration
        return self.chunks.pop(0)


def config(**overrides: object) -> DispatchConfig:
    """Dispatch settings for strategy tests: no hedging unless asked, no catalog."""
    return DispatchConfig.model_validate({"hedging": False, **overrides})


def planned(
    model: str, *, chosen: bool = True, wave: int = 0, quality: float = 0.8, score: float = 1.0
) -> PlannedModel:
    return PlannedModel(model, quality=quality, chosen=chosen, wave=wave, score=1.0)


def plan(policy: str, members: list[PlannedModel], reserves: Sequence[PlannedModel] = (), quorum: int = 0) -> PlanMade:
    return PlanMade(policy, members, "", [*members, *reserves], quorum=quorum)


async def run_plan(
    made: PlanMade,
    generator: Generator,
    settings: DispatchConfig,
    answer_kind: str = "number",
    *,
    budget_s: float = 10.0,
    prompt: str = "What is 2 + 2?",
    entries: Mapping[str, ModelEntry] | None = None,
    max_tokens: int = 16,
    capacity: CallCapacity | None = None,
) -> list[Event]:
    """Runs ``made`` with the strategy registered for its policy against ``generator``, within ``budget_s``
    seconds; every event. ``entries`` says how to reach models (default: the Triton model of the name);
    end-to-end tests pass a real :class:`~constellation.triton.TritonClient` as ``generator``; ``capacity`` is
    what each call passes first (the cold-start gate), none by default."""
    accounting = Accounting(settings)
    known = dict(entries or {})
    caller = ModelCaller(generator, lambda name: known.get(name, ModelEntry(triton_model=name)), accounting)
    caller.capacity = capacity

    async def no_require(model: str) -> None:
        return None

    tools = Toolkit(
        config=settings,
        caller=caller,
        accounting=accounting,
        aggregator=Aggregator(settings),
        require_model=no_require,
    )
    query = Query(prompt, Sampling(max_tokens=max_tokens), model="", time_budget_ms=0, request_tag="")
    now = time.perf_counter()
    run = Run(query, made, answer_kind, now, now + budget_s)
    strategy = STRATEGIES[Policy(made.policy)](tools)
    return [event async for event in strategy.run(run)]
