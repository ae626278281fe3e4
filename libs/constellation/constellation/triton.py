"""Async client for Triton Inference Server's KServe v2 gRPC protocol, for text generation.

It speaks the tensor convention of Triton's vLLM backend, which our python-backend models follow too:
``text_input`` (BYTES), ``stream`` (BOOL), ``sampling_parameters`` (JSON as BYTES) in, and
``text_output`` (BYTES) out, plus the optional ``num_input_tokens``, ``num_output_tokens`` and
``finish_reason`` outputs when the model provides them. A streamed response carries only the new text.

Every call has a deadline. Leaving :meth:`TritonClient.generate` early (``break``, an exception, or
cancellation of the consuming task) cancels the gRPC stream, which cancels the request inside Triton;
the model sees ``is_cancelled()`` and stops generating.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from constellation import telemetry, tls
from constellation.errors import (
    Cancelled,
    ConstellationError,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.keepalive_time_ms", 2**31 - 1),
]
"""tritonclient's defaults: no message size limit, no keepalive pings on an idle channel."""

HOW_TO_START = "start it with `constellation up` (or `python -m services.inference.launcher`)"
HOW_TO_LIST = "`constellation models list` (or RegistryService/ListModels) lists the models that can be asked"


@dataclass(frozen=True)
class Sampling:
    """Decoding settings sent as ``sampling_parameters``. ``None`` fields are left to the model."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def to_json(self) -> str:
        fields: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }
        if self.stop:
            fields["stop"] = list(self.stop)
        return json.dumps({k: v for k, v in fields.items() if v is not None})


@dataclass
class Chunk:
    """One streamed response: new text and the running token counts.

    Models that know their own cost or simulate their latency (the replay model) also report
    ``cost_usd`` and the simulated times in milliseconds; they are None for other models.
    """

    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = ""
    final: bool = False
    cost_usd: float | None = None
    simulated_ttft_ms: float | None = None
    simulated_total_ms: float | None = None


@dataclass
class Generation:
    """What one finished generation produced (see :meth:`TritonClient.complete`)."""

    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str
    chunks: list[Chunk] = field(default_factory=list)


_ERRORS: dict[grpc.StatusCode, tuple[type[ConstellationError], str]] = {
    grpc.StatusCode.UNAVAILABLE: (Unavailable, "the model server is not reachable at the moment; retry later"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (DeadlineExceeded, "deadline exceeded while {model} was generating"),
    grpc.StatusCode.CANCELLED: (Cancelled, "the request to {model} was cancelled"),
    grpc.StatusCode.NOT_FOUND: (NotFound, "{model}: {details}; " + HOW_TO_LIST),
    grpc.StatusCode.INVALID_ARGUMENT: (InvalidArgument, "{model} rejected the request: {details}"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (ResourceExhausted, "{model} is out of capacity: {details}"),
}
"""The one table from Triton's failures to the library's exceptions, with the message each one carries.

Messages are for callers: what failed and what they can do (a model's own words about the request are
kept, they hold no address). Triton's address, its words about itself and how to fix the deployment go
in the error's ``detail`` (see
:class:`~constellation.errors.ConstellationError`). Every other code becomes :class:`InternalError`.
Failures that Triton reports only as text (an error inside a streamed response, a control call's
message) get their code from :data:`_MESSAGE_CODES` first.
"""

_MESSAGE_CODES: tuple[tuple[str, grpc.StatusCode], ...] = (
    ("unknown model", grpc.StatusCode.NOT_FOUND),
    ("is not ready", grpc.StatusCode.NOT_FOUND),
    ("not found", grpc.StatusCode.NOT_FOUND),
    ("must be", grpc.StatusCode.INVALID_ARGUMENT),
    ("context holds", grpc.StatusCode.INVALID_ARGUMENT),
    ("context length", grpc.StatusCode.INVALID_ARGUMENT),
    ("invalid", grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown key", grpc.StatusCode.INVALID_ARGUMENT),
)
"""Phrases of Triton's error text and the status code each one means, first match wins."""


def _code_of_message(message: str) -> grpc.StatusCode:
    lowered = message.lower()
    return next((code for phrase, code in _MESSAGE_CODES if phrase in lowered), grpc.StatusCode.INTERNAL)


def triton_error(code: grpc.StatusCode, details: str, *, url: str, model: str = "") -> ConstellationError:
    """The library's exception for a Triton failure with status ``code``: the one translation point.

    Args:
        code: The gRPC status code of the failure (from the call, or read from its text).
        details: Triton's own words.
        url: The Triton endpoint, named in messages and in the error's metadata.
        model: The model the call was about, if any.
    """
    cls, template = _ERRORS.get(code, (InternalError, "{model} failed while generating ({code})"))
    message = template.format(model=model or "the model server", details=details, code=code.name)
    detail = f"Triton at {url}: {code.name}: {details}"
    if cls is Unavailable:
        detail += "; " + HOW_TO_START
        return Unavailable(message, retry_after_s=1.0, reason="TRITON_UNAVAILABLE", detail=detail)
    metadata = {"model": model} if model else {}
    return cls(message, metadata=metadata, detail=detail)


def _from_rpc_error(error: grpc.aio.AioRpcError, url: str, model: str) -> ConstellationError:
    return triton_error(error.code(), error.details() or "", url=url, model=model)


def _from_stream_message(message: str, url: str, model: str) -> ConstellationError:
    """An error carried inside a streamed response: Triton gives only its text."""
    return triton_error(_code_of_message(message), message, url=url, model=model)


def _from_client_exception(exc: InferenceServerException, url: str, model: str) -> ConstellationError:
    """A tritonclient control-call failure: its status is the code's name as text (``StatusCode.UNAVAILABLE``)."""
    name = (exc.status() or "").upper().removeprefix("STATUSCODE.")
    code = grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)
    if code not in _ERRORS:
        code = _code_of_message(exc.message() or "")
    return triton_error(code, exc.message() or "", url=url, model=model)


_NUMERIC_TYPES = {
    "BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1", "INT16": "<i2",
    "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip
"""Triton datatypes of fixed width, as numpy dtypes of their little-endian raw contents."""


def _bytes_elements(raw: bytes) -> list[bytes]:
    """The elements of a raw BYTES tensor: each a 4-byte little-endian length, then that many bytes."""
    items, position = [], 0
    while position + 4 <= len(raw):
        length = int.from_bytes(raw[position : position + 4], "little")
        items.append(raw[position + 4 : position + 4 + length])
        position += 4 + length
    return items


def _outputs(response: service_pb2.ModelInferResponse) -> dict[str, Any]:
    """Every output of one streamed response, decoded once from its raw contents.

    BYTES outputs become lists of bytes, the others 1-D numpy arrays. One pass over the response costs a
    fraction of a ``result.as_numpy(name)`` call per output (which searches the outputs and builds arrays
    each time); responses without raw contents fall back to tritonclient's ``as_numpy``.
    """
    raw_contents = response.raw_output_contents
    decoded: dict[str, Any] = {}
    for index, tensor in enumerate(response.outputs):
        if index >= len(raw_contents):
            value = grpcclient.InferResult(response).as_numpy(tensor.name)
            if value is not None:
                flat = value.reshape(-1)
                decoded[tensor.name] = list(flat) if tensor.datatype == "BYTES" else flat
            continue
        raw = raw_contents[index]
        if tensor.datatype == "BYTES":
            decoded[tensor.name] = _bytes_elements(raw)
        elif tensor.datatype in _NUMERIC_TYPES:
            decoded[tensor.name] = np.frombuffer(raw, dtype=_NUMERIC_TYPES[tensor.datatype])
    return decoded


def _first(outputs: Mapping[str, Any], name: str) -> Any:
    """The first element of output ``name``; None when it is absent or empty."""
    value = outputs.get(name)
    if value is None or len(value) == 0:
        return None
    return value[0]


def _text(outputs: Mapping[str, Any]) -> str:
    parts = outputs.get("text_output")
    if not parts:
        return ""
    return b"".join(p if isinstance(p, bytes) else str(p).encode() for p in parts).decode("utf-8", errors="replace")


def _is_final(response: service_pb2.ModelInferResponse) -> bool:
    parameters = response.parameters
    return "triton_final_response" in parameters and parameters["triton_final_response"].bool_param


def _bytes_tensor(value: str) -> bytes:
    """One BYTES element as raw contents: a 4-byte little-endian length, then the bytes."""
    encoded = value.encode("utf-8")
    return len(encoded).to_bytes(4, "little") + encoded


def stream_request(
    model: str, prompt: str, sampling: Sampling, request_id: str, parameters: Mapping[str, str] | None
) -> service_pb2.ModelInferRequest:
    """The one request of a generation stream, with its inputs as raw contents (what Triton reads fastest)."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, datatype in (("text_input", "BYTES"), ("stream", "BOOL"), ("sampling_parameters", "BYTES")):
        request.inputs.add(name=name, datatype=datatype, shape=[1])
    request.raw_input_contents.extend([_bytes_tensor(prompt), b"\x01", _bytes_tensor(sampling.to_json())])
    for key, value in (parameters or {}).items():
        request.parameters[key].string_param = value
    return request


def decode_chunk(response: service_pb2.ModelInferResponse) -> Chunk:
    """One streamed response as a chunk of text with its counts."""
    outputs = _outputs(response)
    chunk = Chunk(
        text=_text(outputs),
        input_tokens=int(_first(outputs, "num_input_tokens") or 0),
        output_tokens=int(_first(outputs, "num_output_tokens") or 0),
    )
    for name in ("cost_usd", "simulated_ttft_ms", "simulated_total_ms"):
        value = _first(outputs, name)
        if value is not None:
            setattr(chunk, name, float(value))
    reason = _first(outputs, "finish_reason")
    if isinstance(reason, bytes):
        reason = reason.decode()
    chunk.finish_reason = str(reason or "")
    chunk.final = _is_final(response) or bool(chunk.finish_reason)
    return chunk


STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


class GenerationStream:
    """One generation in flight: an async context manager, and an async iterator of :class:`Chunk`.

    Entering sends the request; leaving before the final chunk cancels it inside Triton. Made by
    :meth:`TritonClient.stream`.

    The request goes out as the one message of a server-streaming call to Triton's bidirectional
    ``ModelStreamInfer``: initial metadata, the request and the half-close leave in one batch, where
    a bidirectional call waits for the metadata to be sent before it sends the request
    (``python -m bench.relay_floor`` measures the hop; the direct call took 0.27 ms less to the first
    token this way, ad hoc). Triton ends the stream after the last response of a half-closed stream.
    """

    def __init__(
        self,
        method: grpc.aio.UnaryStreamMultiCallable,
        request: service_pb2.ModelInferRequest,
        *,
        url: str,
        model: str,
        timeout_s: float,
        headers: Mapping[str, str] | None,
        decode: Callable[[service_pb2.ModelInferResponse], Chunk] = decode_chunk,
    ):
        self._method = method
        self._decode = decode
        self._request = request
        self._url = url
        self._model = model
        self._timeout_s = timeout_s
        self._headers = tuple((headers or {}).items())
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._ended = False

    async def __aenter__(self) -> GenerationStream:
        if self._timeout_s <= 0:
            raise DeadlineExceeded(f"no time left to call {self._model}")
        self._call = self._method(self._request, timeout=self._timeout_s, metadata=self._headers)
        # The call sends from a task of its own; yield once so that it is on its way before the
        # caller does anything else.
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._call is not None and not self._ended:
            self._call.cancel()

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._call is None:
            raise RuntimeError("enter the stream (async with) before reading it")
        if self._ended:
            raise StopAsyncIteration
        try:
            response = await self._call.read()
            if response is grpc.aio.EOF:
                self._ended = True
                raise StopAsyncIteration
            if response.error_message:
                # Read the stream to its end before raising: cancelling right after an error
                # response can leave Triton 2.51 unable to unload the model at shutdown.
                await self._finish()
                raise _from_stream_message(response.error_message, self._url, self._model)
            chunk = self._decode(response.infer_response)
            if chunk.final:
                # Read to the end too: a client that walks away right after the final response leaves
                # Triton's stream handler waiting (seen with 2.51). The answer is complete by now, so a
                # stream that ends badly after it (a deadline, say) does not lose it.
                try:
                    await self._finish()
                except grpc.aio.AioRpcError as exc:
                    log.debug("stream of %s ended with %s after its final response", self._model, exc.code())
                    self._ended = True
            return chunk
        except grpc.aio.AioRpcError as exc:
            raise _from_rpc_error(exc, self._url, self._model) from exc

    async def _finish(self) -> None:
        assert self._call is not None
        while await self._call.read() is not grpc.aio.EOF:
            pass
        self._ended = True


class TritonClient:
    """One connection to one Triton server. An async context manager; safe to share between tasks.

    Every call, generations and control calls alike, carries the metadata that ``call_headers`` returns
    at the time of the call: by default the W3C ``traceparent`` of the current span, so that Triton's
    spans and every model call join the caller's trace without the caller passing anything.

    Args:
        url: ``host:port`` of Triton's gRPC endpoint.
        control_timeout_s: Deadline for control calls (readiness, load, statistics), in seconds.
        call_headers: The header hook: metadata to add to every call. Headers a call passes itself win
            over the hook's.
    """

    def __init__(
        self,
        url: str,
        *,
        control_timeout_s: float = 5.0,
        call_headers: Callable[[], Mapping[str, str]] = telemetry.inject_headers,
    ):
        self.url = url
        self.control_timeout_s = control_timeout_s
        self.call_headers = call_headers
        credentials = tls.triton_credentials()  # SSL to Triton when this process is configured for it
        self._client = aioclient.InferenceServerClient(url=url, ssl=credentials is not None, creds=credentials)
        # Generations go over a channel of their own, skipping tritonclient's request iterator and
        # numpy conversions (see GenerationStream).
        self._channel = (
            grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
            if credentials is None
            else grpc.aio.secure_channel(url, credentials, options=_CHANNEL_OPTIONS)
        )
        self._stream_method = self._channel.unary_stream(
            STREAM_METHOD,
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )

    async def __aenter__(self) -> TritonClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()
        await self._channel.close()

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The hook's headers for this call, then the call's own."""
        return {**self.call_headers(), **(extra or {})}

    async def _control(self, coro: Any, model: str = "") -> Any:
        try:
            return await coro
        except InferenceServerException as exc:
            raise _from_client_exception(exc, self.url, model) from exc

    async def server_ready(self) -> bool:
        """True when the server answers and is ready. Never raises for an unreachable server."""
        try:
            return bool(
                await self._client.is_server_ready(headers=self._headers(), client_timeout=self.control_timeout_s)
            )
        except InferenceServerException:
            return False

    async def server_live(self) -> bool:
        """True when the server answers and is live (serving requests), whatever the state of its models.

        Unlike :meth:`server_ready`, which under Triton's strict readiness turns false while any model is
        loading, unloaded or failed, this follows only whether the server itself can be reached. Never
        raises.
        """
        try:
            return bool(
                await self._client.is_server_live(headers=self._headers(), client_timeout=self.control_timeout_s)
            )
        except InferenceServerException:
            return False

    async def model_ready(self, model: str) -> bool:
        """True when ``model`` is loaded and ready.

        Raises:
            Unavailable: Triton cannot be reached.
        """
        return bool(
            await self._control(
                self._client.is_model_ready(model, headers=self._headers(), client_timeout=self.control_timeout_s),
                model,
            )
        )

    async def require_model(self, model: str) -> None:
        """Raises NotFound unless ``model`` is ready; the models Triton does serve go in the error's ``detail``."""
        if await self.model_ready(model):
            return
        index = await self._control(
            self._client.get_model_repository_index(
                headers=self._headers(), as_json=True, client_timeout=self.control_timeout_s
            )
        )
        ready = sorted(m["name"] for m in index.get("models", []) if m.get("state") == "READY")
        raise NotFound(
            f"model {model!r} is not served; {HOW_TO_LIST}",
            metadata={"model": model},
            detail=f"Triton at {self.url} does not have it ready; ready models: {', '.join(ready) or 'none'}",
        )

    async def load(self, model: str, *, timeout_s: float = 120.0) -> None:
        """Loads ``model`` (explicit model control). Blocks until it is ready or fails."""
        await self._control(self._client.load_model(model, headers=self._headers(), client_timeout=timeout_s), model)

    async def unload(self, model: str) -> None:
        """Unloads ``model``; in-flight requests finish first (Triton's behaviour)."""
        await self._control(
            self._client.unload_model(model, headers=self._headers(), client_timeout=self.control_timeout_s), model
        )

    async def statistics(self, model: str = "") -> dict[str, Any]:
        """Triton's per-model inference statistics as JSON."""
        stats = await self._control(
            self._client.get_inference_statistics(
                model_name=model, headers=self._headers(), as_json=True, client_timeout=self.control_timeout_s
            ),
            model,
        )
        return dict(stats)

    def stream(
        self,
        model: str,
        prompt: str,
        sampling: Sampling,
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        request_id: str = "",
        parameters: Mapping[str, str] | None = None,
        convention: str = "constellation",
    ) -> GenerationStream:
        """One generation of ``model`` for ``prompt``, to enter with ``async with`` and read with ``async for``.

        Entering sends the request, so a caller can do other work while the model runs before it reads
        the first chunk. The last chunk has ``final`` set. Leaving the block early (``break``, an
        exception, or cancellation of the task) cancels the request inside Triton.

        Args:
            model: Triton model name.
            prompt: Text for ``text_input``.
            sampling: Decoding settings.
            timeout_s: Deadline for the whole stream, in seconds (use the caller's remaining time).
            headers: Extra gRPC metadata for this call, added to the header hook's.
            request_id: Triton request id (shows in Triton's logs and traces).
            parameters: KServe request parameters, e.g. ``{"recorded_model": "gpt-4o"}`` for the replay
                model.
            convention: The model's tensor convention (``constellation``, ``vllm`` or ``tensorrtllm``; see
                :mod:`constellation.triton_conventions`).

        Raises (on entering or reading):
            NotFound, InvalidArgument, Unavailable, DeadlineExceeded, Cancelled, InternalError.
        """
        from constellation import triton_conventions as conventions  # it builds on this module

        return GenerationStream(
            self._stream_method,
            conventions.build_request(convention, model, prompt, sampling, request_id, parameters),  # type: ignore[arg-type]
            url=self.url,
            model=model,
            timeout_s=timeout_s,
            headers=self._headers(headers),
            decode=conventions.decoder_for(convention, sampling),  # type: ignore[arg-type]
        )

    async def generate(
        self,
        model: str,
        prompt: str,
        sampling: Sampling,
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        request_id: str = "",
        parameters: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """Streams the model's answer to ``prompt``: :meth:`stream` as one async generator.

        Closing the generator early (or cancelling the task that drives it) cancels the request inside
        Triton.
        """
        async with self.stream(
            model, prompt, sampling, timeout_s=timeout_s, headers=headers, request_id=request_id, parameters=parameters
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    async def complete(self, model: str, prompt: str, sampling: Sampling, *, timeout_s: float) -> Generation:
        """Runs :meth:`generate` to the end and returns the whole text."""
        chunks = [c async for c in self.generate(model, prompt, sampling, timeout_s=timeout_s)]
        last = chunks[-1] if chunks else Chunk("")
        return Generation(
            text="".join(c.text for c in chunks),
            input_tokens=last.input_tokens,
            output_tokens=last.output_tokens,
            finish_reason=last.finish_reason,
            chunks=chunks,
        )
