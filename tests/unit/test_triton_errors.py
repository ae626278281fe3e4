"""The one Triton error table, the retryable family and the fallback decision built on it."""

from __future__ import annotations

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from constellation.errors import (
    Cancelled,
    ConstellationError,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Retryable,
    Unavailable,
)
from constellation.triton import _from_client_exception, _from_stream_message, triton_error
from services.dispatch.strategies import replaceable

URL = "127.0.0.1:8001"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.CANCELLED, Cancelled),
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.INTERNAL, InternalError),
        (grpc.StatusCode.UNIMPLEMENTED, InternalError),
    ],
)
def test_each_status_code_maps_to_one_exception(code: grpc.StatusCode, expected: type[ConstellationError]) -> None:
    error = triton_error(code, "details", url=URL, model="m")
    assert type(error) is expected
    assert "details" in error.message + error.detail
    assert URL not in error.message
    assert URL in error.detail


def test_unavailable_says_how_to_start_triton_and_may_be_retried() -> None:
    error = triton_error(grpc.StatusCode.UNAVAILABLE, "connection refused", url=URL)
    assert isinstance(error, Unavailable)
    assert error.reason == "TRITON_UNAVAILABLE"
    assert error.retry_after_s == 1.0
    assert "constellation up" in error.detail
    assert "constellation up" not in error.message and URL not in error.message
    assert "endpoint" not in error.metadata


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Request for unknown model: 'x' is not found", NotFound),
        ("model 'x' is not ready", NotFound),
        ("recorded_model 'gpt-17' not found", NotFound),
        ("max_tokens must be positive", InvalidArgument),
        ("unknown key 'foo' in sampling_parameters", InvalidArgument),
        ("CUDA out of memory", InternalError),
    ],
)
def test_an_error_inside_a_streamed_response_is_read_from_its_text(
    message: str, expected: type[ConstellationError]
) -> None:
    assert type(_from_stream_message(message, URL, "m")) is expected


def test_a_control_call_failure_uses_its_status_then_its_text() -> None:
    down = InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE")
    assert type(_from_client_exception(down, URL, "m")) is Unavailable
    unknown = InferenceServerException("Request for unknown model: 'm'", status="StatusCode.INTERNAL")
    assert type(_from_client_exception(unknown, URL, "m")) is NotFound


def test_transient_failures_form_the_retryable_family() -> None:
    assert all(issubclass(cls, Retryable) for cls in (Unavailable, DeadlineExceeded, ResourceExhausted))
    assert not any(issubclass(cls, Retryable) for cls in (NotFound, InvalidArgument, Cancelled, InternalError))


def test_another_model_is_tried_for_transient_and_model_failures_only() -> None:
    for error in (Unavailable("x"), DeadlineExceeded("x"), ResourceExhausted("x"), NotFound("x")):
        assert replaceable(error)
    unknown = ConstellationError("x")
    assert not replaceable(unknown)
    for error in (InvalidArgument("x"), Cancelled("x"), FailedPrecondition("x"), InternalError("x")):
        assert not replaceable(error)
    aborted = ConstellationError("x")
    aborted.code = grpc.StatusCode.ABORTED  # type: ignore[misc]
    assert not replaceable(aborted)
