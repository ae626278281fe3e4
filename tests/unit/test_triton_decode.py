"""Decoding Triton's streamed responses from their raw contents, against tritonclient's own reading."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

from constellation.triton import _bytes_elements, _first, _outputs, _text


def response(**outputs: tuple[str, bytes]) -> grpcclient.InferResult:
    """A ModelInferResponse whose outputs are ``name=(datatype, raw contents)``, each of one element."""
    message = service_pb2.ModelInferResponse(model_name="m")
    for name, (datatype, raw) in outputs.items():
        tensor = message.outputs.add(name=name, datatype=datatype)
        tensor.shape.append(1 if datatype != "BYTES" else len(_bytes_elements(raw)))
        message.raw_output_contents.append(raw)
    return grpcclient.InferResult(message)


def bytes_tensor(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def test_outputs_match_tritonclients_reading_of_every_type_we_receive() -> None:
    result = response(
        text_output=("BYTES", bytes_tensor("é".encode())),
        num_output_tokens=("INT32", struct.pack("<i", 7)),
        cost_usd=("FP64", struct.pack("<d", 0.0125)),
        finish_reason=("BYTES", bytes_tensor(b"stop")),
    )
    decoded = _outputs(result.get_response())
    for name in ("num_output_tokens", "cost_usd"):
        assert _first(decoded, name) == result.as_numpy(name).reshape(-1)[0]
    assert _first(decoded, "finish_reason") == result.as_numpy("finish_reason").reshape(-1)[0] == b"stop"
    assert _text(decoded) == "é"
    assert _first(decoded, "absent") is None


def test_text_joins_the_elements_before_decoding_so_a_split_character_survives() -> None:
    encoded = "naïve".encode()
    decoded = _outputs(response(text_output=("BYTES", bytes_tensor(encoded[:3], encoded[3:]))).get_response())
    assert _text(decoded) == "naïve"
    assert _text({}) == ""


def test_bytes_elements_reads_empty_and_several_items() -> None:
    assert _bytes_elements(bytes_tensor(b"", b"ab", b"c")) == [b"", b"ab", b"c"]
    assert _bytes_elements(b"") == []


def test_numeric_outputs_are_little_endian_arrays() -> None:
    decoded = _outputs(response(flag=("BOOL", b"\x01"), half=("FP16", np.float16(1.5).tobytes())).get_response())
    assert bool(_first(decoded, "flag")) is True
    assert float(_first(decoded, "half")) == pytest.approx(1.5)
