"""Requests and decoders of the Triton tensor conventions, without a server (tests/e2e covers real Triton)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from constellation.triton import Sampling
from constellation.triton_conventions import CONVENTIONS, build_request, decoder_for


def _inputs(request: service_pb2.ModelInferRequest) -> dict[str, tuple[str, list[int], bytes]]:
    return {
        t.name: (t.datatype, list(t.shape), raw)
        for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
    }


def _response(text: str | None, *, final: bool = False) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name="m")
    if text is not None:
        response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        encoded = text.encode()
        response.raw_output_contents.append(len(encoded).to_bytes(4, "little") + encoded)
    if final:
        response.parameters["triton_final_response"].bool_param = True
    return response


def test_tensorrtllm_request_carries_max_tokens_as_int32_and_sampling_as_tensors() -> None:
    request = build_request("tensorrtllm", "m", "hi", Sampling(max_tokens=7, temperature=0.5, top_p=0.9, stop=("\n",)))
    inputs = _inputs(request)
    assert set(inputs) == {"text_input", "max_tokens", "stream", "temperature", "top_p", "stop_words"}
    assert inputs["max_tokens"][:2] == ("INT32", [1])
    assert np.frombuffer(inputs["max_tokens"][2], dtype="<i4")[0] == 7
    assert struct.unpack("<f", inputs["temperature"][2])[0] == 0.5
    assert inputs["stream"][2] == b"\x01"
    assert inputs["stop_words"][:2] == ("BYTES", [1])
    assert request.parameters["triton_enable_empty_final_response"].bool_param


def test_tensorrtllm_request_always_sends_max_tokens() -> None:
    inputs = _inputs(build_request("tensorrtllm", "m", "hi", Sampling()))
    assert np.frombuffer(inputs["max_tokens"][2], dtype="<i4")[0] == 256
    assert "temperature" not in inputs


def test_vllm_request_sends_sampling_parameters_json_and_keeps_the_prompt_out_of_the_output() -> None:
    request = build_request("vllm", "m", "hi", Sampling(max_tokens=3, seed=1), parameters={"k": "v"})
    inputs = _inputs(request)
    assert set(inputs) == {"text_input", "stream", "sampling_parameters", "exclude_input_in_output"}
    assert json.loads(inputs["sampling_parameters"][2][4:]) == {"max_tokens": 3, "seed": 1}
    assert inputs["exclude_input_in_output"][2] == b"\x01"
    assert request.parameters["k"].string_param == "v"


def test_constellation_request_is_the_one_smollm2_reads() -> None:
    inputs = _inputs(build_request("constellation", "smollm2", "hi", Sampling(max_tokens=3)))
    assert set(inputs) == {"text_input", "stream", "sampling_parameters"}


def test_counting_decoder_counts_text_responses_and_names_the_finish() -> None:
    decode = decoder_for("tensorrtllm", Sampling(max_tokens=2))
    chunks = [decode(_response("a")), decode(_response(" b")), decode(_response(None, final=True))]
    assert [c.text for c in chunks] == ["a", " b", ""]
    assert [c.output_tokens for c in chunks] == [1, 2, 2]
    assert chunks[-1].final and chunks[-1].finish_reason == "length"
    # One decoder per stream: a new one starts from zero.
    fresh = decoder_for("vllm", Sampling(max_tokens=5))
    assert fresh(_response("x", final=True)).finish_reason == "stop"


def test_an_unknown_convention_is_refused() -> None:
    assert CONVENTIONS == ("constellation", "vllm", "tensorrtllm")
    with pytest.raises(ValueError, match="unknown Triton convention"):
        build_request("openai", "m", "hi", Sampling())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown Triton convention"):
        decoder_for("openai", Sampling())  # type: ignore[arg-type]
