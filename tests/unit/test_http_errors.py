"""The mesh's exceptions as OpenAI-shaped HTTP errors: status from the gRPC code, reason as code, param."""

from __future__ import annotations

import pytest

from constellation.errors import (
    Cancelled,
    ConstellationError,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InternalError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.dispatch.http._errors import http_error


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (InvalidArgument("bad"), 400, "invalid_request_error"),
        (FailedPrecondition("no model fits"), 400, "invalid_request_error"),
        (NotFound("gone"), 404, "invalid_request_error"),
        (ResourceExhausted("slow down"), 429, "rate_limit_error"),
        (Cancelled("cancelled"), 499, "cancelled"),
        (InternalError("bug"), 500, "server_error"),
        (ConstellationError("unknown"), 500, "server_error"),
        (Unavailable("triton down"), 503, "service_unavailable"),
        (DeadlineExceeded("late"), 504, "timeout"),
    ],
)
def test_status_and_type_follow_the_grpc_code(error: ConstellationError, status: int, kind: str) -> None:
    mapped = http_error(error)
    assert mapped.status == status
    assert mapped.body["error"]["type"] == kind
    assert set(mapped.body["error"]) == {"message", "type", "param", "code"}


def test_invalid_argument_names_its_first_field_and_lists_all_in_the_message() -> None:
    error = InvalidArgument(
        "invalid request",
        [FieldViolation("temperature", "must be in [0, 2]"), FieldViolation("top_p", "must be in (0, 1]")],
        reason="UNSUPPORTED_PARAMETER",
    )
    body = http_error(error).body["error"]
    assert body["param"] == "temperature" and body["code"] == "unsupported_parameter"
    assert "temperature: must be in [0, 2]" in body["message"] and "top_p" in body["message"]


def test_a_retry_delay_becomes_retry_after_in_whole_seconds() -> None:
    assert http_error(Unavailable("busy", retry_after_s=1.2)).headers == {"retry-after": "2"}
    assert http_error(Unavailable("busy")).headers == {}
    assert http_error(NotFound("m", reason="MODEL_NOT_FOUND")).body["error"]["code"] == "model_not_found"
