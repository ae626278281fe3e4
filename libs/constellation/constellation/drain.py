"""How response streams end: in their own task, and with a last message when shutdown cuts them.

:class:`StreamEndInterceptor` (the outermost interceptor) hands grpc.aio a coroutine that writes each
message of a response-streaming behaviour with ``context.write`` and closes the behaviour's generator
in ``finally``, in the call's own task. grpc.aio, driving the generator itself, abandons it suspended
at its ``yield`` when the caller cancels while a message is being written; the event loop's finalizer
then closes it *in another task*, and every ``with`` around that ``yield`` (the OpenTelemetry
interceptor's span and remote context) exits in a foreign context: "Failed to detach context"
tracebacks on every cancelled stream.

It also ends streams that shutdown would cut. A server's stop turns health NOT_SERVING, refuses new
calls and gives in-flight calls a drain window (``ServiceConfig.shutdown_grace_s``); grpc.aio cancels
whatever still runs at its end, and the caller sees a bare UNAVAILABLE. A moment before (at the *cut*)
the interceptor cancels the servicer's generator (so its outbound calls are cancelled too) and sends
the message the method's ``cut_message`` builds (dispatch's final event with an UNAVAILABLE status), or
ends the call with a rich UNAVAILABLE status carrying a retry delay. Streams that never end by
themselves (watches) are cut when the drain starts instead. Unary calls are left to grpc's grace.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

import grpc

from constellation.errors import Unavailable, abort

CutMessage = Callable[[Unavailable], Any]
"""Builds the last message of a stream cut by shutdown, from the error that says why."""

CUT_MESSAGE = "the server shut down before this answer finished; retry the request"
RETRY_AFTER_S = 1.0
CUT_REASON = "shutdown cut"


def shutdown_error() -> Unavailable:
    """The error a cut stream reports: UNAVAILABLE, retryable after a short delay."""
    return Unavailable(CUT_MESSAGE, reason="SHUTTING_DOWN", retry_after_s=RETRY_AFTER_S)


def _cut_on(cut: asyncio.Event, task: asyncio.Task[Any]) -> tuple[asyncio.Future[Any], Callable[[], bool]]:
    """Cancels ``task`` when ``cut`` is set; returns the watcher and a function that says whether it fired."""
    fired = False

    def fire(_: asyncio.Future[Any]) -> None:
        nonlocal fired
        if cut.is_set() and not task.done():
            fired = True
            task.cancel(CUT_REASON)

    watcher = asyncio.ensure_future(cut.wait())
    watcher.add_done_callback(fire)
    return watcher, lambda: fired


def _written(
    behavior: Callable[..., AsyncGenerator[Any, None]],
    cut: asyncio.Event,
    cut_message: CutMessage | None,
    service: str,
) -> Callable[..., Awaitable[None]]:
    """``behavior`` as a coroutine that writes its messages, closes it in the call's task, obeys ``cut``."""

    async def written(request: Any, context: grpc.aio.ServicerContext) -> None:
        task = asyncio.current_task()
        assert task is not None
        watcher, fired = _cut_on(cut, task)
        stream = behavior(request, context)
        try:
            async for message in stream:
                await context.write(message)
        except asyncio.CancelledError:
            if not fired():
                raise
            task.uncancel()
        finally:
            watcher.cancel()
            await stream.aclose()
        if fired():
            error = shutdown_error()
            if cut_message is None:
                await abort(context, error, service=service)
            await context.write(cut_message(error))

    return written


class StreamEndInterceptor(grpc.aio.ServerInterceptor):
    """Writes response streams from the call's own task and ends them at shutdown (module doc).

    Must be the first (outermost) interceptor, so that every generator inside is closed by it.

    Args:
        cut: Set by the server's stop shortly before the drain window ends.
        cut_messages: Per full method name (``/constellation.v1.DispatchService/Ask``), what to send last.
        service: Names the service in the status details.
        draining: Set when the drain window starts; ``endless`` streams are cut then.
        endless: Full method names of streams that never end by themselves (watches): waiting for them
            would only hold the shutdown, so they end when the drain starts and their callers reconnect.
    """

    def __init__(
        self,
        cut: asyncio.Event,
        cut_messages: Mapping[str, CutMessage],
        service: str = "",
        *,
        draining: asyncio.Event | None = None,
        endless: frozenset[str] = frozenset(),
    ):
        self.cut = cut
        self.cut_messages = dict(cut_messages)
        self.service = service
        self.draining = draining or cut
        self.endless = endless

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        method = handler_call_details.method
        cut = self.draining if method in self.endless else self.cut
        message = self.cut_messages.get(method)
        request, response = handler.request_deserializer, handler.response_serializer
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            behavior = _written(handler.unary_stream, cut, message, self.service)
            return grpc.unary_stream_rpc_method_handler(behavior, request, response)
        if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
            behavior = _written(handler.stream_stream, cut, message, self.service)
            return grpc.stream_stream_rpc_method_handler(behavior, request, response)
        return handler
