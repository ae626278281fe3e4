from __future__ import annotations

import grpc
import pytest

from constellation.errors import (
    ConstellationError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
    from_status_proto,
    to_status_proto,
)


def test_invalid_argument_round_trips_with_field_violations() -> None:
    error = InvalidArgument(
        "bad request", [FieldViolation("prompt", "empty"), FieldViolation("sampling.top_p", "too big")]
    )
    status = to_status_proto(error, service="dispatch")
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    back = from_status_proto(status)
    assert isinstance(back, InvalidArgument)
    assert back.message == "bad request"
    assert [(v.field, v.description) for v in back.violations] == [("prompt", "empty"), ("sampling.top_p", "too big")]
    assert back.metadata["service"] == "dispatch"


def test_unavailable_keeps_retry_delay_and_reason() -> None:
    error = Unavailable("Triton down; start it", retry_after_s=1.5, reason="TRITON_UNAVAILABLE")
    back = from_status_proto(to_status_proto(error))
    assert isinstance(back, Unavailable)
    assert back.retry_after_s == pytest.approx(1.5)
    assert back.reason == "TRITON_UNAVAILABLE"


def test_each_error_maps_to_its_own_code() -> None:
    assert from_status_proto(to_status_proto(NotFound("no such model"))).code == grpc.StatusCode.NOT_FOUND
    unknown = from_status_proto(to_status_proto(ConstellationError("odd")))
    assert type(unknown) is ConstellationError
    assert unknown.code == grpc.StatusCode.UNKNOWN
