"""A small async client for DispatchService, used by the CLI, the benchmarks and the tests.

Errors come back as the library's exception tree (see :mod:`constellation.errors`), never as raw
``grpc.RpcError``. Leaving :meth:`DispatchClient.ask` early cancels the call, and with it the model
requests inside Triton.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any

from constellation.channel import ServiceClient, server_stream
from constellation.v1 import common_pb2, dispatch_pb2, dispatch_pb2_grpc


def ask_request(
    prompt: str,
    *,
    model: str = "",
    max_tokens: int = 0,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    **fields: Any,
) -> dispatch_pb2.AskRequest:
    """Builds an AskRequest from plain values; ``None`` sampling fields are left unset."""
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, stop=list(stop))
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    return dispatch_pb2.AskRequest(prompt=prompt, model=model, sampling=sampling, **fields)


class DispatchClient(ServiceClient[dispatch_pb2_grpc.DispatchServiceStub]):
    """One channel to a dispatch server (see :class:`~constellation.channel.ServiceClient`)."""

    stub_class = dispatch_pb2_grpc.DispatchServiceStub

    def ask(
        self, request: dispatch_pb2.AskRequest, *, timeout_s: float | None = None
    ) -> AsyncGenerator[dispatch_pb2.AskResponse, None]:
        """Streams the events of one Ask.

        Raises:
            constellation.errors.ConstellationError: the call failed (mapped from its status).
        """
        return server_stream(lambda: self.stub.Ask(request, timeout=timeout_s))

    async def plan(self, request: dispatch_pb2.AskRequest, *, timeout_s: float = 10.0) -> dispatch_pb2.PlanResponse:
        response: dispatch_pb2.PlanResponse = await self.stub.Plan(
            dispatch_pb2.PlanRequest(request=request), timeout=timeout_s
        )
        return response
