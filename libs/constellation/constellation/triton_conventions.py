"""The tensor conventions of the Triton backends Constellation streams from, as one request builder and
one response decoder each.

* ``constellation``: our python-backend models (smollm2, replay): ``text_input``, ``stream``,
  ``sampling_parameters`` (JSON) in; ``text_output`` plus ``num_input_tokens``, ``num_output_tokens``,
  ``finish_reason`` (and the replay model's cost and simulated times) out.
* ``vllm``: Triton's vLLM backend: ``text_input``, ``stream``, ``sampling_parameters`` (JSON) and
  ``exclude_input_in_output`` in; ``text_output`` out, each streamed response the new text only.
* ``tensorrtllm``: the TensorRT-LLM backend's ensemble: ``text_input``, ``max_tokens`` (INT32, required),
  ``stream`` and optional ``temperature``, ``top_p``, ``stop_words`` in; ``text_output`` out.

The last two report no token counts: their decoders count the streamed responses that carry text as
output tokens (one response per decoded token when streaming, so the count is close, not exact) and
report no input tokens. A final response without a finish reason gets ``length`` when that count
reached ``max_tokens`` and ``stop`` otherwise. A decoder keeps that count, so it belongs to one stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, get_args

from tritonclient.grpc import service_pb2

from constellation.triton import (
    Chunk,
    Sampling,
    _bytes_tensor,
    _is_final,
    _outputs,
    _text,
    decode_chunk,
    stream_request,
)

Convention = Literal["constellation", "vllm", "tensorrtllm"]
CONVENTIONS: tuple[str, ...] = get_args(Convention)
Decoder = Callable[[service_pb2.ModelInferResponse], Chunk]

TRTLLM_DEFAULT_MAX_TOKENS = 256
"""``max_tokens`` sent to a TensorRT-LLM ensemble when the request leaves it unset (the input is required)."""


def build_request(
    convention: Convention,
    model: str,
    prompt: str,
    sampling: Sampling,
    request_id: str = "",
    parameters: Mapping[str, str] | None = None,
) -> service_pb2.ModelInferRequest:
    """The one request of a generation stream, in ``convention``'s tensors (raw contents)."""
    if convention == "constellation":
        return stream_request(model, prompt, sampling, request_id, parameters)
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    if convention == "vllm":
        _add(request, "text_input", "BYTES", _bytes_tensor(prompt))
        _add(request, "stream", "BOOL", b"\x01")
        _add(request, "sampling_parameters", "BYTES", _bytes_tensor(sampling.to_json()))
        _add(request, "exclude_input_in_output", "BOOL", b"\x01")
    elif convention == "tensorrtllm":
        max_tokens = sampling.max_tokens or TRTLLM_DEFAULT_MAX_TOKENS
        _add(request, "text_input", "BYTES", _bytes_tensor(prompt))
        _add(request, "max_tokens", "INT32", max_tokens.to_bytes(4, "little", signed=True))
        _add(request, "stream", "BOOL", b"\x01")
        if sampling.temperature is not None:
            _add(request, "temperature", "FP32", _fp32(sampling.temperature))
        if sampling.top_p is not None:
            _add(request, "top_p", "FP32", _fp32(sampling.top_p))
        if sampling.stop:
            raw = b"".join(_bytes_tensor(word) for word in sampling.stop)
            _add(request, "stop_words", "BYTES", raw, shape=len(sampling.stop))
    else:
        raise ValueError(f"unknown Triton convention {convention!r}; one of {', '.join(CONVENTIONS)}")
    for key, value in (parameters or {}).items():
        request.parameters[key].string_param = value
    # Both backends close a stream with an empty response flagged final; Triton forwards it only when asked.
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def _add(request: service_pb2.ModelInferRequest, name: str, datatype: str, raw: bytes, shape: int = 1) -> None:
    request.inputs.add(name=name, datatype=datatype, shape=[shape])
    request.raw_input_contents.append(raw)


def _fp32(value: float) -> bytes:
    import struct

    return struct.pack("<f", value)


class CountingDecoder:
    """Decodes the responses of one vLLM or TensorRT-LLM stream, counting output tokens itself."""

    def __init__(self, max_tokens: int | None):
        self._max_tokens = max_tokens
        self._output_tokens = 0

    def __call__(self, response: service_pb2.ModelInferResponse) -> Chunk:
        text = _text(_outputs(response))
        if text:
            self._output_tokens += 1
        chunk = Chunk(text=text, output_tokens=self._output_tokens, final=_is_final(response))
        if chunk.final:
            reached = self._max_tokens is not None and self._output_tokens >= self._max_tokens
            chunk.finish_reason = "length" if reached else "stop"
        return chunk


def decoder_for(convention: Convention, sampling: Sampling) -> Decoder:
    """A decoder for one stream of ``convention`` (a new one per stream: it may count)."""
    if convention == "constellation":
        return decode_chunk
    if convention == "tensorrtllm":
        return CountingDecoder(sampling.max_tokens or TRTLLM_DEFAULT_MAX_TOKENS)
    if convention == "vllm":
        return CountingDecoder(sampling.max_tokens)
    raise ValueError(f"unknown Triton convention {convention!r}; one of {', '.join(CONVENTIONS)}")
