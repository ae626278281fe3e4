"""The client edge every mesh client stands on: one channel, one stub, one place errors are translated.

:class:`ServiceClient` owns the channel (its options are set here and nowhere else), the generated stub,
an optional default deadline and closing; it is an async context manager. Errors are translated by a
pair of client interceptors (:func:`error_mapping_interceptors`) on the channel, so a client method is only the
call: a failed unary call raises, and a failed stream raises while it is iterated, one of the library's
exceptions (:func:`constellation.errors.from_rpc_error`), never a raw ``grpc.RpcError``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from typing import Any, ClassVar, Generic, Self, TypeVar

import grpc

from constellation import telemetry, tls
from constellation.errors import from_rpc_error

# Largest message a client accepts (a fan-out's candidates and an embedding fit well inside).
MAX_RECEIVE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]

StubT = TypeVar("StubT")
T = TypeVar("T")


def _with_default_timeout(details: grpc.aio.ClientCallDetails, timeout_s: float | None) -> grpc.aio.ClientCallDetails:
    """``details`` with ``timeout_s`` as the deadline when the call set none."""
    if details.timeout is not None or timeout_s is None:
        return details
    return grpc.aio.ClientCallDetails(
        details.method, timeout_s, details.metadata, details.credentials, details.wait_for_ready
    )


class _ErrorMapping:
    """What both error-mapping interceptors share: the default deadline."""

    def __init__(self, default_timeout_s: float | None = None) -> None:
        self.default_timeout_s = default_timeout_s


class UnaryErrorMapping(_ErrorMapping, grpc.aio.UnaryUnaryClientInterceptor):
    """Awaits a unary call here, so the caller's ``await`` raises the library's exception for its status."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        details = _with_default_timeout(client_call_details, self.default_timeout_s)
        try:
            call = await continuation(details, request)
            return await call
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc


class StreamErrorMapping(_ErrorMapping, grpc.aio.UnaryStreamClientInterceptor):
    """Hands a server stream back as an iterator whose errors are translated as they surface."""

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> AsyncIterator[Any]:
        details = _with_default_timeout(client_call_details, self.default_timeout_s)
        call = await continuation(details, request)
        return _translated(call)


def error_mapping_interceptors(default_timeout_s: float | None = None) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors that turn every ``grpc.RpcError`` of a call into the library's exception.

    Two objects, because a grpc.aio channel files each interceptor under one call kind only. Placed
    first on a channel, so the tracing interceptors inside them still see (and record) the raw status.
    A stream's error is translated also after its first message. Cancelling the caller cancels the call;
    ``asyncio.CancelledError`` passes through untouched.

    Args:
        default_timeout_s: Deadline for calls that set none; None leaves such calls unbounded.
    """
    return [UnaryErrorMapping(default_timeout_s), StreamErrorMapping(default_timeout_s)]


async def _translated(call: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The messages of ``call``; an error ending it is raised as the library's exception."""
    try:
        async for message in call:
            yield message
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc


async def server_stream(start: Callable[[], AsyncIterable[T]]) -> AsyncGenerator[T, None]:
    """The messages of the server stream ``start()`` opens, opened on the first read.

    Leaving early (``break``, an error in the loop, ``aclose()``, a cancelled task) cancels the call,
    and with it the work the server does for it. Errors arrive already translated by the channel.
    """
    call = start()
    try:
        async for message in call:
            yield message
    finally:
        call.cancel()  # type: ignore[attr-defined]


class ServiceClient(Generic[StubT]):
    """One channel to one service and its stub. An async context manager; safe for concurrent calls.

    A subclass names its generated stub class in ``stub_class`` and adds one method per RPC that calls
    ``self.stub`` directly: errors already arrive as the library's exceptions. Leaving a stream early
    should ``cancel()`` its call (in a ``finally:``), which cancels the work the server does for it.

    Args:
        address: ``host:port`` of the service.
        traced: Add the OpenTelemetry client interceptors (a client span per call, ``traceparent`` sent).
        default_timeout_s: Deadline in seconds of calls made without one; None: such calls wait indefinitely.
    """

    stub_class: ClassVar[type[Any]]

    def __init__(self, address: str, *, traced: bool = True, default_timeout_s: float | None = None) -> None:
        interceptors = error_mapping_interceptors(default_timeout_s)
        if traced:
            interceptors.extend(telemetry.client_interceptors())
        self.address = address
        # TLS and the service key, when this process is configured for them (constellation.tls).
        self.channel = tls.open_channel(address, CHANNEL_OPTIONS, interceptors)
        self.stub: StubT = self.stub_class(self.channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls still running on it end with ``Cancelled``."""
        await self.channel.close()
