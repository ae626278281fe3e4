"""Ways of executing a plan, one module each, chosen by the plan's policy.

A strategy takes one :class:`~services.dispatch.calls.Run` and streams its events, ending with
``Finished``. To add one, write a module here with a class that implements :class:`Strategy`, decorate
it with ``@register(Policy.X)`` and import the module at the bottom of this file.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from constellation.errors import ConstellationError, NotFound, Retryable
from constellation.semconv import Policy
from services.dispatch.accounting import Accounting
from services.dispatch.aggregation import Aggregator
from services.dispatch.calls import Run
from services.dispatch.config import DispatchConfig
from services.dispatch.events import Event
from services.dispatch.generation import ModelCaller
from services.dispatch.query import Query


@dataclass(frozen=True)
class Toolkit:
    """What every strategy may use; built once per dispatch server.

    Attributes:
        require_model: Raises NotFound, listing the models the server does serve, unless the named
            model is ready (used when a requested model was not found).
        ask_part: Runs one sub-query as a whole Ask (query, seconds left, received_at) for decomposed
            prompts; None where there is no dispatcher behind the strategies (unit tests of one strategy).
    """

    config: DispatchConfig
    caller: ModelCaller
    accounting: Accounting
    aggregator: Aggregator
    require_model: Callable[[str], Awaitable[None]]
    ask_part: Callable[[Query, float, float], AsyncGenerator[Event, None]] | None = None


class Strategy(Protocol):
    """Executes a plan: made with the toolkit, run once per request."""

    def __init__(self, tools: Toolkit) -> None: ...

    def run(self, run: Run) -> AsyncGenerator[Event, None]:
        """Streams the request's events, the plan first (once a model is on its way), ``Finished`` last."""
        ...


STRATEGIES: dict[Policy, type[Strategy]] = {}
"""The strategy of each policy."""


def register(*policies: Policy) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: ``cls`` executes plans of ``policies``."""

    def add(cls: type[Strategy]) -> type[Strategy]:
        for policy in policies:
            STRATEGIES[policy] = cls
        return cls

    return add


def replaceable(error: ConstellationError) -> bool:
    """True when another model may succeed where this one failed (a fallback is worth trying).

    Transient failures (the :class:`Retryable` family) and a model the server does not have. Not the
    request's own faults (invalid, cancelled, precondition), and not INTERNAL or unknown failures: a
    request that broke one model (a prompt past its context, say) would only break the next one too,
    at the cost of another call.
    """
    return isinstance(error, Retryable | NotFound)


from services.dispatch.strategies import decomposed, planned, single, waves  # noqa: E402  (registers them)

__all__ = [
    "STRATEGIES",
    "Strategy",
    "Toolkit",
    "decomposed",
    "planned",
    "register",
    "replaceable",
    "single",
    "waves",
]
