"""The one place that turns the mesh's exceptions into OpenAI-shaped HTTP errors.

The body is ``{"error": {"message", "type", "param", "code"}}``; the HTTP status follows the gRPC code
(the mapping Google's HTTP/JSON transcoding uses), ``code`` is the error's machine-readable reason in
lower case (``model_not_found``, ``unsupported_parameter``...), ``param`` the first offending
parameter. Codes are never flattened into the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import grpc

from constellation.errors import ConstellationError, InvalidArgument, ResourceExhausted, Unavailable

STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.ABORTED: (409, "server_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
"""gRPC code -> (HTTP status, OpenAI error type); anything else is 500 ``server_error``."""


@dataclass(frozen=True)
class HttpError:
    """An error ready to send: status, OpenAI error body and extra headers (``retry-after``)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def http_error(error: ConstellationError) -> HttpError:
    """The HTTP form of ``error``."""
    status, kind = STATUS.get(error.code, (500, "server_error"))
    param = error.violations[0].field if isinstance(error, InvalidArgument) and error.violations else None
    message = error.message
    if isinstance(error, InvalidArgument) and error.violations:
        message += " (" + "; ".join(f"{v.field}: {v.description}" for v in error.violations) + ")"
    headers = {}
    if isinstance(error, Unavailable | ResourceExhausted) and error.retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after_s)))
    body = {"error": {"message": message, "type": kind, "param": param, "code": error.reason.lower()}}
    return HttpError(status, body, headers)
