"""Decomposed prompts through the in-process pipeline, with a fake model server that answers by prompt."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from constellation.errors import Unavailable
from constellation.semconv import Policy
from constellation.triton import Sampling, TritonClient
from services.dispatch.events import Delta, Event, Finished, PlanMade
from services.dispatch.pipeline import Dispatcher
from services.dispatch.query import Query
from tests.unit.dispatch_fakes import FakeGenerator, FakeStream, Script, config

COMPOUND = "Answer the following questions:\n1. What is the capital of France?\n2. How many legs does a spider have?"


@dataclass
class ByPrompt(FakeGenerator):
    """The fake model server, scripted per prompt (every prompt goes to the default model)."""

    by_prompt: Mapping[str, Script] | None = None

    def stream(self, model: str, prompt: str, sampling: Sampling, **_: object) -> FakeStream:  # type: ignore[override]
        assert self.by_prompt is not None
        return FakeStream(self, prompt, self.by_prompt[prompt])


async def ask(fake: FakeGenerator, prompt: str, *, decompose: bool = True) -> list[Event]:
    async with TritonClient("127.0.0.1:1") as triton:
        dispatcher = Dispatcher(config(routing=False), triton, generator=fake)
        query = Query(prompt, Sampling(max_tokens=8), "", 0, "", decompose=decompose)
        return [e async for e in dispatcher.ask(query, deadline_s=10.0, received_at=time.perf_counter())]


def finished(events: list[Event]) -> Finished:
    last = events[-1]
    assert isinstance(last, Finished)
    return last


async def test_parts_run_concurrently_and_are_answered_in_order() -> None:
    fake = ByPrompt(
        {},
        by_prompt={
            "What is the capital of France?": Script("Paris.", first_after_s=0.2),
            "How many legs does a spider have?": Script("Eight."),
        },
    )
    events = await ask(fake, COMPOUND)

    plans = [e for e in events if isinstance(e, PlanMade)]
    assert plans[0].policy == Policy.DECOMPOSED and len(plans[0].parts) == 2
    assert [d.text for d in events if isinstance(d, Delta)] == ["1. Paris.", "\n\n2. Eight."]
    done = finished(events)
    assert done.text == "1. Paris.\n\n2. Eight."
    assert [(p.index, p.prompt, p.text, p.policy) for p in done.parts] == [
        (0, "What is the capital of France?", "Paris.", "single"),
        (1, "How many legs does a spider have?", "Eight.", "single"),
    ]
    assert done.input_tokens == 10 and not done.uncertain
    # the second part ended first: the parts ran at once, and the answer still came in the prompt's order
    assert fake.completed == ["How many legs does a spider have?", "What is the capital of France?"]


async def test_a_failed_part_does_not_fail_the_others() -> None:
    fake = ByPrompt(
        {},
        by_prompt={
            "What is the capital of France?": Script(fails=Unavailable("down")),
            "How many legs does a spider have?": Script("Eight."),
        },
    )
    done = finished(await ask(fake, COMPOUND))
    assert done.uncertain
    assert done.parts[0].error is not None and done.parts[1].text == "Eight."
    assert "1. (no answer:" in done.text and done.text.endswith("2. Eight.")


async def test_ordinary_and_opted_out_prompts_go_whole() -> None:
    fake = ByPrompt({}, by_prompt={COMPOUND: Script("Paris; eight."), "What is 2 + 2?": Script("4")})
    whole = finished(await ask(fake, COMPOUND, decompose=False))
    assert whole.text == "Paris; eight." and whole.parts == []
    assert finished(await ask(fake, "What is 2 + 2?")).parts == []
