"""A weightless stand-in for a TensorRT-LLM ensemble or a vLLM-backend model on Triton's python backend
(decoupled). ``trtllm_echo`` and ``vllm_echo`` share this file (the latter by a symbolic link).

Inputs ``text_input`` (string [1]) and optional ``stream`` (bool [1]), plus either ``max_tokens`` (int32 [1],
the TensorRT-LLM ensemble's) or ``sampling_parameters`` (string [1], a JSON object with ``max_tokens``,
vLLM's); vLLM's ``exclude_input_in_output`` is accepted and ignored (the input is never echoed as such).
Output ``text_output`` (string [-1]). It answers with the words of the prompt: with ``stream`` true one
response per word (each the new text only, words after the first led by a space), then an empty
response flagged ``TRITONSERVER_RESPONSE_COMPLETE_FINAL``; without it one response with the whole text.
At most ``max_tokens`` words. Like the real ensemble it reports no token counts and no finish reason.
Requests run on Triton's thread one after another (a test model: no concurrency of its own).
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils


def _scalar(request, name, default):  # type: ignore[no-untyped-def]
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0]


def _max_tokens(request) -> int:  # type: ignore[no-untyped-def]
    sampling = _scalar(request, "sampling_parameters", None)
    if sampling is not None:
        return int(json.loads(sampling).get("max_tokens", 16))
    return int(_scalar(request, "max_tokens", 16))


def _text(value: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", np.array([value], dtype=object))])


class TritonPythonModel:
    def execute(self, requests):  # type: ignore[no-untyped-def]
        for request in requests:
            sender = request.get_response_sender()
            prompt = _scalar(request, "text_input", b"")
            prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
            words = prompt.split()[: max(_max_tokens(request), 0)]
            if not bool(_scalar(request, "stream", False)):
                sender.send(_text(" ".join(words)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            for index, word in enumerate(words):
                if sender.is_cancelled():
                    break
                sender.send(_text(word if index == 0 else f" {word}"))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
