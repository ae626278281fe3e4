"""Reading requests and closing them: what every generating python-backend model does the same way.

Imported by the ``model.py`` files of the repository inside Triton's stub process (the stub inherits the
launcher's environment, so ``services`` is importable there, as for :mod:`.generation_metrics`). The stub's
``triton_python_backend_utils`` module exists only there, so the functions that need it take it as their
first argument; the rest is plain Python, testable anywhere.

The tensor contract is the vLLM one both models speak: ``text_input``, ``stream``, ``sampling_parameters``
in; ``text_output``, ``num_input_tokens``, ``num_output_tokens``, ``finish_reason`` out.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np


class InvalidInput(ValueError):
    """A request the client got wrong; the model answers it with ``TritonError.INVALID_ARG``."""


def config_parameter(config: dict[str, Any], key: str, default: str = "") -> str:
    """The string value of ``parameters[key]`` in a model's config; ``default`` when absent or empty."""
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else str(value)


def to_str(name: str, value: Any) -> str:
    """A string input's element as text (Triton hands strings over as bytes).

    Raises:
        InvalidInput: the bytes are not UTF-8.
    """
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{name} must be UTF-8") from None
    return str(value)


def as_int(name: str, value: Any) -> int:
    """An integer from a JSON value; a string of digits counts too (as Triton's parameters send numbers).

    Raises:
        InvalidInput: a boolean, a fraction or anything else that is not a whole number.
    """
    if isinstance(value, bool):
        raise InvalidInput(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise InvalidInput(f"{name} must be an integer, got {value!r}")


def single_input(pb_utils: Any, request: Any, name: str, kind: str = "value") -> Any:
    """The one element of the input tensor ``name``; None when the request has no such input.

    Args:
        pb_utils: The stub's ``triton_python_backend_utils`` module.
        request: A Triton inference request.
        name: Input tensor name.
        kind: What the element is, for the error message ("string", "bool").

    Raises:
        InvalidInput: the tensor holds no element or more than one.
    """
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise InvalidInput(f"{name} must hold exactly one {kind}, got {values.size}")
    return values[0]


def generation_outputs(pb_utils: Any, text: str, n_in: int, n_out: int, finish_reason: str) -> list[Any]:
    """The four output tensors of one response: text (only the new text when streaming), the token
    counts so far and the finish reason (empty before the final response)."""
    return [
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("num_input_tokens", np.array([n_in], dtype=np.int32)),
        pb_utils.Tensor("num_output_tokens", np.array([n_out], dtype=np.int32)),
        pb_utils.Tensor("finish_reason", np.array([finish_reason.encode("utf-8")], dtype=np.object_)),
    ]


def send_final(pb_utils: Any, sender: Any, response: Any, tag: str) -> None:
    """Sends ``response`` with the final flag; a sender that refuses it (a cancelled request may) is
    still closed with a bare final flag, so Triton never keeps the request open. Never raises."""
    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    try:
        sender.send(response, flags=final)
    except Exception as exc:
        pb_utils.Logger.log_verbose(f"{tag}: final response not sent ({exc!r}); closing")
        try:
            sender.send(flags=final)
        except Exception as exc2:
            pb_utils.Logger.log_warn(f"{tag}: could not close a request: {exc2!r}")


def sampling_object(raw: str) -> dict[str, Any]:
    """The ``sampling_parameters`` JSON object; an empty string is an empty object.

    Raises:
        InvalidInput: the text is not JSON, or not an object.
    """
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"sampling_parameters must be a JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"sampling_parameters must be a JSON object, got {type(data).__name__}")
    return data
