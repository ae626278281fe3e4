"""Streams still running when a server's drain window ends get a last message, not a bare UNAVAILABLE.

On shutdown a server turns health NOT_SERVING, refuses new calls and gives in-flight calls a drain
window (``ServiceConfig.shutdown_grace_s``) to finish. grpc.aio cancels whatever still runs at the end
of the window, and the caller then sees only UNAVAILABLE with no explanation. :class:`DrainInterceptor`
ends such response streams a moment earlier itself (at the *cut*): it cancels the servicer's
generator (so its outbound calls are cancelled too), then either sends the message the method's
``cut_message`` builds (dispatch's final event with an UNAVAILABLE status) or ends the call with a
rich UNAVAILABLE status that carries a retry delay.

The cut is an :class:`asyncio.Event` the server's stop sets; unary calls are left to grpc's grace.

:class:`ClosingStreamInterceptor` (outermost) fixes how cancelled streams end: grpc.aio drives a
response-streaming behaviour that is an async generator itself, and when the caller cancels while
grpc is writing (between two ``yield``), the generator is abandoned suspended at its ``yield`` and
closed later by the event loop's finalizer *in another task*. Every ``with`` around that ``yield``
(the OpenTelemetry interceptor's span and remote context) then exits in a foreign context:
"Failed to detach context" tracebacks on every cancelled stream. The interceptor hands grpc a
coroutine that writes each message with ``context.write`` and closes the generator in ``finally``, in
the call's own task.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc

from constellation.errors import Unavailable, abort

CutMessage = Callable[[Unavailable], Any]
"""Builds the last message of a stream cut by shutdown, from the error that says why."""

CUT_MESSAGE = "the server shut down before this answer finished; retry the request"
RETRY_AFTER_S = 1.0


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
            task.cancel("shutdown cut")

    watcher = asyncio.ensure_future(cut.wait())
    watcher.add_done_callback(fire)
    return watcher, lambda: fired


def _drained(
    behavior: Callable[..., AsyncIterator[Any]],
    cut: asyncio.Event,
    cut_message: CutMessage | None,
    service: str,
) -> Callable[..., AsyncIterator[Any]]:
    """``behavior`` (a response-streaming one) ended by ``cut`` with a last message or a clear status."""

    async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        task = asyncio.current_task()
        assert task is not None
        watcher, fired = _cut_on(cut, task)
        try:
            async for message in behavior(request, context):
                yield message
        except asyncio.CancelledError:
            if not fired():
                raise
            task.uncancel()
        finally:
            watcher.cancel()
        if not fired():
            return
        error = shutdown_error()
        if cut_message is None:
            await abort(context, error, service=service)
        yield cut_message(error)

    return streamed


def _closing(behavior: Callable[..., AsyncGenerator[Any, None]]) -> Callable[..., Awaitable[None]]:
    """``behavior`` as a coroutine that writes its messages and always closes it in the call's task."""

    async def written(request: Any, context: grpc.aio.ServicerContext) -> None:
        stream = behavior(request, context)
        try:
            async for message in stream:
                await context.write(message)
        finally:
            await stream.aclose()

    return written


class ClosingStreamInterceptor(grpc.aio.ServerInterceptor):
    """Closes response-streaming generators in the call's own task, also when it is cancelled (module doc).

    Must be the first (outermost) interceptor, so that every generator inside is closed by it.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        request, response = handler.request_deserializer, handler.response_serializer
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(_closing(handler.unary_stream), request, response)
        if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(_closing(handler.stream_stream), request, response)
        return handler


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """Ends response streams at the shutdown cut with a last message or UNAVAILABLE (module doc).

    Args:
        cut: Set by the server's stop shortly before the drain window ends.
        cut_messages: Per full method name (``/constellation.v1.DispatchService/Ask``), what to send last.
        service: Names the service in the status details.
    """

    def __init__(self, cut: asyncio.Event, cut_messages: Mapping[str, CutMessage], service: str = ""):
        self.cut = cut
        self.cut_messages = dict(cut_messages)
        self.service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        method = handler_call_details.method
        message = self.cut_messages.get(method)
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            behavior = _drained(handler.unary_stream, self.cut, message, self.service)
            return grpc.unary_stream_rpc_method_handler(
                behavior, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
            behavior = _drained(handler.stream_stream, self.cut, message, self.service)
            return grpc.stream_stream_rpc_method_handler(
                behavior, handler.request_deserializer, handler.response_serializer
            )
        return handler
