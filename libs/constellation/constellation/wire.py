"""Requests whose bytes do not decode end with INVALID_ARGUMENT, not UNKNOWN.

grpc.aio decodes a request with the method handler's ``request_deserializer`` before any servicer code
runs; when that raises (invalid UTF-8 in a string field, a truncated varint, plain garbage), the server
ends the call itself with UNKNOWN and the Python exception's class name, and no server interceptor's
behaviour ever sees it. :class:`UndecodableRequestInterceptor` therefore replaces each method handler
with one whose deserializer catches ``DecodeError`` and hands back an :class:`Undecodable` marker
instead, and whose behaviour ends the call with INVALID_ARGUMENT when it gets that marker: a
``google.rpc.Status`` with ``ErrorInfo`` (reason ``UNDECODABLE_REQUEST``) and a ``BadRequest`` whose
one field violation has the empty path (the request as a whole).

Hook it into a server as ``grpc.aio.server(interceptors=[..., UndecodableRequestInterceptor()])``.
Placed last, it is the innermost interceptor: the tracing and metrics interceptors before it see the
call end exactly as when a servicer aborts it with INVALID_ARGUMENT itself. Streamed requests are covered too: reading an undecodable message from the
request iterator ends the call the same way. Behaviours must be ``async`` (as every aio servicer's are).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from constellation.errors import FieldViolation, InvalidArgument, to_status_proto

REASON = "UNDECODABLE_REQUEST"
Deserializer = Callable[[bytes], Any]


class Undecodable:
    """What a guarded deserializer returns for bytes that do not decode; never reaches a servicer.

    Attributes:
        type_name: Full name of the expected message (``constellation.v1.ClassifyRequest``), or the
            method path when the deserializer does not say.
        size: Length of the bytes received.
    """

    __slots__ = ("size", "type_name")

    def __init__(self, type_name: str, size: int):
        self.type_name = type_name
        self.size = size


def guard_deserializer(deserializer: Deserializer, fallback_name: str) -> Deserializer:
    """``deserializer`` that returns an :class:`Undecodable` marker instead of raising ``DecodeError``."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    type_name = str(getattr(descriptor, "full_name", "") or fallback_name)

    def guarded(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError:
            return Undecodable(type_name, len(raw))

    return guarded


def undecodable_error(marker: Undecodable, method: str) -> InvalidArgument:
    """The error a caller gets for undecodable request bytes."""
    return InvalidArgument(
        f"the request is not a valid {marker.type_name}: its {marker.size} bytes do not decode "
        "(check the message type and that string fields hold valid UTF-8)",
        [FieldViolation("", f"undecodable {marker.type_name} ({marker.size} bytes)")],
        reason=REASON,
        metadata={"method": method},
    )


async def _abort(context: grpc.aio.ServicerContext, marker: Undecodable, method: str) -> NoReturn:
    status = rpc_status.to_status(to_status_proto(undecodable_error(marker, method)))
    await context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")  # pragma: no cover - grpc always raises


def _unary_request(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    """Wraps a behaviour that takes one request (unary-unary or unary-stream), keeping its kind."""
    if inspect.isasyncgenfunction(behavior):

        async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _abort(context, request, method)
            async for response in behavior(request, context):
                yield response

        return streamed

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await _abort(context, request, method)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return unary


def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[Any]:
    async def checked() -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Undecodable):
                await _abort(context, request, method)
            yield request

    return checked()


def _streamed_request(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    """Wraps a behaviour that reads a request iterator (stream-unary or stream-stream), keeping its kind."""
    if inspect.isasyncgenfunction(behavior):

        async def streamed(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behavior(_checked(requests, context, method), context):
                yield response

        return streamed

    async def unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        result = behavior(_checked(requests, context, method), context)
        return await result if inspect.isawaitable(result) else result

    return unary


def guard_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` that answers undecodable request bytes with INVALID_ARGUMENT (module doc)."""
    deserializer = handler.request_deserializer
    if deserializer is None:  # raw bytes in: nothing to decode
        return handler
    request = guard_deserializer(deserializer, method)
    response = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_unary_request(handler.unary_unary, method), request, response)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_unary_request(handler.unary_stream, method), request, response)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_streamed_request(handler.stream_unary, method), request, response)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(_streamed_request(handler.stream_stream, method), request, response)


class UndecodableRequestInterceptor(grpc.aio.ServerInterceptor):
    """Server interceptor that turns undecodable request bytes into INVALID_ARGUMENT (see the module doc).

    Stateless and cheap: it wraps each handler once per call; a request that decodes costs one
    ``isinstance`` check more.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return guard_handler(handler, handler_call_details.method)
