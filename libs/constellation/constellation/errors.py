"""One exception tree for the whole mesh, and the two places that translate it.

Domain code raises the exceptions below and knows nothing of gRPC. Servers translate them to a
``google.rpc.Status`` with machine-readable details in exactly one place (:func:`abort`); clients
translate a ``grpc.RpcError`` back into the same tree in exactly one place (:func:`from_rpc_error`).
Codes are never flattened into strings.

The tree is shallow on purpose::

    ConstellationError
    ├── InvalidArgument          INVALID_ARGUMENT   (carries BadRequest field violations)
    ├── NotFound                 NOT_FOUND
    ├── Retryable                                   (the family: the same call may succeed later)
    │   ├── Unavailable          UNAVAILABLE        (may carry a retry delay)
    │   ├── DeadlineExceeded     DEADLINE_EXCEEDED
    │   └── ResourceExhausted    RESOURCE_EXHAUSTED (may carry QuotaFailure and a retry delay)
    ├── Unauthenticated          UNAUTHENTICATED
    ├── PermissionDenied         PERMISSION_DENIED
    ├── Cancelled                CANCELLED
    ├── FailedPrecondition       FAILED_PRECONDITION
    └── InternalError            INTERNAL

Callers that decide whether to retry or to try elsewhere catch a family (``Retryable``), never compare
code names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace

ERROR_DOMAIN = "constellation.dev"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request: a dotted path (``sampling.temperature``) and what is wrong."""

    field: str
    description: str


class ConstellationError(Exception):
    """Base of every error the mesh raises on purpose.

    Attributes:
        message: What happened and, where possible, what the caller can do about it. Sent to callers:
            no internal addresses, operator hints or inventories (those go in ``detail``).
        reason: A short UPPER_SNAKE machine-readable reason (``ErrorInfo.reason``).
        metadata: Extra key/value context for ``ErrorInfo.metadata`` (sent to callers too).
        detail: What an operator needs (addresses, how to fix the deployment); logged and recorded on
            the span by :func:`abort`, never sent over the wire.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        detail: str = "",
    ):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.detail = detail

    def __str__(self) -> str:
        """Code, message and (for logs and span events) the operator detail."""
        text = f"{self.code.name}: {self.message}"
        return f"{text} [{self.detail}]" if self.detail else text


class InvalidArgument(ConstellationError):
    """The request is malformed; ``violations`` names each bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        violations: Iterable[FieldViolation] = (),
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        detail: str = "",
    ):
        super().__init__(message, reason=reason, metadata=metadata, detail=detail)
        self.violations = list(violations)


class NotFound(ConstellationError):
    """A named thing (a model, a prompt in a pool) does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class Retryable(ConstellationError):
    """A failure of the moment rather than of the request: the same call may succeed later or elsewhere.

    Never raised itself; catch it to handle every transient failure at once.
    """


class Unavailable(Retryable):
    """A dependency cannot be reached; the call may succeed later."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        detail: str = "",
    ):
        super().__init__(message, reason=reason, metadata=metadata, detail=detail)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Retryable):
    """The caller's deadline or the request's time budget ran out."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(ConstellationError):
    """The call was cancelled, by the caller or by the mesh (a quorum made it unnecessary)."""

    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class ResourceExhausted(Retryable):
    """A limit was hit (queue full, rate limit, cost ceiling).

    Args:
        retry_after_s: When a retry may succeed (sent as ``RetryInfo``); None when unknown.
        quota: ``(subject, description)`` pairs of the quotas exceeded (sent as ``QuotaFailure``).
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        quota: Sequence[tuple[str, str]] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        detail: str = "",
    ):
        super().__init__(message, reason=reason, metadata=metadata, detail=detail)
        self.retry_after_s = retry_after_s
        self.quota = list(quota)


class Unauthenticated(ConstellationError):
    """The call carried no credentials, or credentials the mesh does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(ConstellationError):
    """The caller is known, but its role may not make this call."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class FailedPrecondition(ConstellationError):
    """The system is not in a state that allows the call (for example a model is still loading)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class InternalError(ConstellationError):
    """A bug or an unexpected failure inside the mesh."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[ConstellationError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        ResourceExhausted,
        FailedPrecondition,
        InternalError,
        Unauthenticated,
        PermissionDenied,
    )
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status_proto(error: ConstellationError, *, service: str = "") -> status_pb2.Status:
    """Builds the ``google.rpc.Status`` for ``error``, with ErrorInfo and type-specific details.

    Used both for the status that ends a call and for errors carried inside streamed messages.
    """
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason,
                domain=ERROR_DOMAIN,
                metadata={**error.metadata, **({"service": service} if service else {})},
            )
        )
    ]
    if isinstance(error, InvalidArgument) and error.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in error.violations
                    ]
                )
            )
        )
    if isinstance(error, ResourceExhausted) and error.quota:
        violations = [error_details_pb2.QuotaFailure.Violation(subject=s, description=d) for s, d in error.quota]
        details.append(_pack(error_details_pb2.QuotaFailure(violations=violations)))
    if isinstance(error, Unavailable | ResourceExhausted) and error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_s * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=error.code.value[0], message=error.message, details=details)


def from_status_proto(status: status_pb2.Status) -> ConstellationError:
    """Turns a ``google.rpc.Status`` (from a trailer or a streamed message) into the exception tree."""
    code = _code_from_int(status.code)
    cls = _BY_CODE.get(code, ConstellationError)
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after_s: float | None = None
    quota: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason or None
            metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.ToMilliseconds() / 1000
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            quota = [(v.subject, v.description) for v in failure.violations]
    if cls is ResourceExhausted:
        return ResourceExhausted(
            status.message, retry_after_s=retry_after_s, quota=quota, reason=reason, metadata=metadata
        )
    if cls is InvalidArgument:
        return InvalidArgument(status.message, violations, reason=reason, metadata=metadata)
    if cls is Unavailable:
        return Unavailable(status.message, retry_after_s=retry_after_s, reason=reason, metadata=metadata)
    error = cls(status.message, reason=reason, metadata=metadata)
    if cls is ConstellationError:
        error.code = code  # type: ignore[misc]
    return error


def _code_from_int(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


async def abort(context: grpc.aio.ServicerContext, error: ConstellationError, *, service: str = "") -> NoReturn:
    """Ends the current call with ``error``'s rich status. The one server-side mapping point.

    The operator detail (``error.detail``) stays here: it is logged and added to the current span,
    never sent.
    """
    if error.detail:
        log.warning("%s (%s): %s", error.message, error.code.name, error.detail)
        trace.get_current_span().add_event("error_detail", {"message": error.message, "detail": error.detail})
    await context.abort_with_status(rpc_status.to_status(to_status_proto(error, service=service)))
    raise AssertionError("abort_with_status returned")  # pragma: no cover - grpc always raises


def from_rpc_error(error: grpc.RpcError) -> ConstellationError:
    """Translates a failed call into the exception tree. The one client-side mapping point.

    Rich details are read from the ``grpc-status-details-bin`` trailer when the server sent them;
    otherwise the code and message alone are used, except that gRPC's own text about a connection that
    failed (UNAVAILABLE, naming addresses) becomes the error's ``detail``.
    """
    status = None
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        try:
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
        except ValueError:
            status = None
    if status is not None:
        return from_status_proto(status)
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        # gRPC's own words about a failed connection name addresses: operator detail, not for callers.
        return Unavailable(UNREACHABLE, detail=message or "")
    proto = status_pb2.Status(code=code.value[0], message=message or "")
    return from_status_proto(proto)


UNREACHABLE = "a service this call depends on is not reachable at the moment; retry later"
"""The message of an UNAVAILABLE that gRPC itself reported (a connection that failed): no address in it."""


OK_STATUS = status_pb2.Status(code=code_pb2.OK)
