"""The request helpers both python-backend models share, outside Triton. The stub's
``triton_python_backend_utils`` exists only inside Triton's stub process, so ``FakeBackendUtils`` stands
in for the two calls these helpers make on it (the e2e tests run the models in a real Triton)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from services.inference.backend_io import (
    InvalidInput,
    as_int,
    config_parameter,
    sampling_object,
    send_final,
    single_input,
    to_str,
)


class _Tensor:
    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def as_numpy(self) -> np.ndarray:
        return self.values


class _Logger:
    lines: ClassVar[list[str]] = []

    @classmethod
    def log_verbose(cls, line: str) -> None:
        cls.lines.append(line)

    @classmethod
    def log_warn(cls, line: str) -> None:
        cls.lines.append(line)


class FakeBackendUtils:
    """A fake of the stub module: input lookup by name, the final flag and the logger."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    Logger = _Logger

    @staticmethod
    def get_input_tensor_by_name(request: dict[str, np.ndarray], name: str) -> _Tensor | None:
        return _Tensor(request[name]) if name in request else None


class _RefusingSender:
    """A sender of a cancelled request: it refuses a response but takes the bare final flag."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, int]] = []

    def send(self, response: Any = None, flags: int = 0) -> None:
        if response is not None:
            raise RuntimeError("request cancelled")
        self.sent.append((response, flags))


def test_single_input_is_none_when_absent_and_rejects_more_than_one_element() -> None:
    request = {"text_input": np.array([[b"hello"]], dtype=np.object_), "stream": np.array([True, False])}
    assert single_input(FakeBackendUtils, request, "text_input") == b"hello"
    assert single_input(FakeBackendUtils, request, "sampling_parameters") is None
    with pytest.raises(InvalidInput, match="stream must hold exactly one bool, got 2"):
        single_input(FakeBackendUtils, request, "stream", "bool")


def test_values_are_decoded_and_checked() -> None:
    assert to_str("text_input", "é".encode()) == "é"
    with pytest.raises(InvalidInput, match="text_input must be UTF-8"):
        to_str("text_input", b"\xff")
    assert as_int("seed", " 7 ") == 7
    for bad in (True, 1.5, "x"):
        with pytest.raises(InvalidInput, match="seed must be an integer"):
            as_int("seed", bad)
    assert sampling_object("  ") == {}
    assert sampling_object('{"max_tokens": 3}') == {"max_tokens": 3}
    with pytest.raises(InvalidInput, match="got list"):
        sampling_object("[1]")
    config = {"parameters": {"time_scale": {"string_value": "0.5"}, "empty": {"string_value": ""}}}
    assert config_parameter(config, "time_scale", "1.0") == "0.5"
    assert config_parameter(config, "empty", "8") == "8"
    assert config_parameter(config, "absent") == ""


def test_a_refused_final_response_still_closes_the_request() -> None:
    sender = _RefusingSender()
    send_final(FakeBackendUtils, sender, object(), "replay")
    assert sender.sent == [(None, FakeBackendUtils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)]
