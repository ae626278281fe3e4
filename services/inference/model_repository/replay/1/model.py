"""REPLAY model: a recorded LLM's real answer to a known prompt, streamed, with a SIMULATED latency.

Triton python backend, decoupled. The answer, its token counts and its cost are recorded (the pools of
``constellation.pools``, indexed by :class:`services.inference.replay.ReplayIndex`); the latency is
SIMULATED by :class:`services.inference.replay.LatencyModel` (size class of the recorded model, seeded
heavy tail, deterministic per latency seed, model and prompt).

Tensors (the vLLM convention of the smollm2 model):

* inputs: ``text_input`` (string [1], the exact prompt text); optional ``stream`` (bool [1], default
  false); optional ``sampling_parameters`` (string [1], JSON object). Only ``max_tokens`` (int >= 1) is
  honoured: a longer recorded answer is cut and finishes with ``length``. Other keys (temperature,
  top_p, stop, seed, ...) are accepted and ignored: the answer is recorded.
* KServe request parameter ``recorded_model`` (string): which recorded model answers.
* outputs: ``text_output`` (string [-1], one element; with ``stream`` only the new text), ``num_input_tokens``
  and ``num_output_tokens`` (int32 [1], output tokens sent so far), ``finish_reason`` (string [1]:
  ``stop`` | ``length`` | ``cancelled`` on the final response, ``""`` before), ``simulated_ttft_ms``
  (fp64 [1], on every response), ``cost_usd`` and ``simulated_total_ms`` (fp64 [1], on the final
  response only; ``cost_usd`` is left out when the cost is unknown). Simulated times are UNSCALED
  milliseconds.

Timing: chunk *k* (about ``tokens_per_chunk`` tokens of text) is sent when ``time_scale`` times its
simulated time ``ttft + per_token * (tokens_so_far - 1)`` has passed since the request arrived; the last
one at the simulated total. Without ``stream`` the single response is sent at the simulated total.

Errors (each sent as one response with the final flag; the model never crashes): no ``recorded_model``,
an unknown one, or a prompt not recorded for it -> ``NOT_FOUND`` with "is not found" and the model's
name in the message (the first 60 characters of an unknown prompt are shown); a malformed input ->
``INVALID_ARG``; anything else -> ``INTERNAL``.

Concurrency: ``execute`` is a coroutine. Triton's python-backend stub runs the coroutines of a decoupled
model on one asyncio event loop in the background, so hundreds of requests wait (``asyncio.sleep``)
concurrently in this one process, without a thread each. The response sender's calls are short
blocking IPC calls made from the loop. While waiting, each request asks ``is_cancelled()`` at least
every :data:`CANCEL_POLL_S` seconds and before every chunk, and stops at once when the client cancelled.

Config parameters: ``pool_paths`` (comma-separated pool files; empty: ``$CONSTELLATION_REPLAY_POOLS``),
``time_scale`` (float >= 0, default 1.0; 0 = no waiting), ``tokens_per_chunk`` (int >= 1, default 8),
``latency_seed`` (int, default 0), ``latency_profile`` (JSON, see ``LatencyProfile``; empty = defaults),
``max_concurrency`` (int >= 0, default 0 = no cap), ``load_time_s`` (JSON seconds by size class merged into
``DEFAULT_LOAD_S``; empty = defaults), ``load_time_scale`` (float >= 0; empty = ``time_scale``), ``load_as``
(recorded model whose size class sets the load time; empty = the largest class in the pools).

Capacity: one instance (a replica; ``instance_group`` count) serves at most ``max_concurrency`` requests at
once; later ones wait in arrival order (polling for cancellation) and their simulated schedule starts when
they are served, so their real latency grows with the load. ``initialize`` waits the SIMULATED load time of
the size class, times ``load_time_scale``, so loading an instance takes visible time.

Prometheus metrics (labels ``model``; the counter also ``finish_reason``: stop, length, cancelled,
error): ``constellation_generations_in_flight``, ``constellation_generated_tokens_total`` (replayed
output tokens) and ``constellation_generations_total``; same families as the smollm2 model.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from services.inference.backend_io import (
    InvalidInput,
    as_int,
    config_parameter,
    generation_outputs,
    sampling_object,
    send_final,
    single_input,
    to_str,
)
from services.inference.generation_metrics import GenerationMetrics
from services.inference.replay import (
    ChunkStep,
    ConcurrencyCap,
    LatencyModel,
    LatencyProfile,
    ReplayIndex,
    ReplayNotFound,
    load_seconds,
    prompt_sha256,
    stream_plan,
)

CANCEL_POLL_S = 0.1
"""Longest time a waiting request goes without asking whether it was cancelled (seconds)."""

CANCEL_RECHECK_S = 0.01
"""Chunks due at once (no wait) ask ``is_cancelled()`` again only after this many seconds (an IPC call)."""

POOLS_ENV = "CONSTELLATION_REPLAY_POOLS"
"""Environment variable with comma-separated pool files, used when ``pool_paths`` is empty."""

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_TAG = "replay (latency is SIMULATED)"


@dataclass(frozen=True)
class _Request:
    prompt: str
    stream: bool
    max_tokens: int | None
    recorded_model: str | None


def _max_tokens(raw: str) -> int | None:
    """``max_tokens`` from the sampling_parameters JSON; every other key is accepted and ignored."""
    value = sampling_object(raw).get("max_tokens")
    if value is None:
        return None
    try:
        tokens = as_int("sampling_parameters.max_tokens", value)
    except InvalidInput:
        tokens = 0
    if tokens < 1:
        raise InvalidInput(f"sampling_parameters.max_tokens must be an integer >= 1, got {value!r}")
    return tokens


def _recorded_model(request: Any) -> str | None:
    raw = request.parameters()
    try:
        parameters = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise InvalidInput(f"request parameters are not valid JSON: {raw!r}") from None
    value = parameters.get("recorded_model") if isinstance(parameters, dict) else None
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"request parameter recorded_model must be a string, got {value!r}")
    return value


def _f64(name: str, value: float) -> Any:
    return pb_utils.Tensor(name, np.array([value], dtype=np.float64))


class TritonPythonModel:
    """Triton python-backend entry point; see the module docstring for the contract."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the pools into a ReplayIndex, set up the simulated latency model and the metrics."""
        started = time.monotonic()
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("this model must be decoupled (model_transaction_policy)")
        self._model_name = args["model_name"]
        raw_paths = config_parameter(config, "pool_paths", os.environ.get(POOLS_ENV, ""))
        paths = [Path(p.strip()).expanduser() for p in raw_paths.split(",") if p.strip()]
        if not paths:
            raise pb_utils.TritonModelException(
                f"{_TAG}: parameter pool_paths (comma-separated pool files) is empty and ${POOLS_ENV} is not set"
            )
        paths = [p if p.is_absolute() else Path.cwd() / p for p in paths]
        try:
            self._time_scale = float(config_parameter(config, "time_scale", "1.0"))
            self._tokens_per_chunk = int(config_parameter(config, "tokens_per_chunk", "8"))
            seed = int(config_parameter(config, "latency_seed", "0"))
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"{_TAG}: bad parameter: {exc}") from None
        if not math.isfinite(self._time_scale) or self._time_scale < 0:
            raise pb_utils.TritonModelException(f"{_TAG}: time_scale must be >= 0, got {self._time_scale}")
        if self._tokens_per_chunk < 1:
            raise pb_utils.TritonModelException(f"{_TAG}: tokens_per_chunk must be >= 1")
        try:
            profile = LatencyProfile.from_json(config_parameter(config, "latency_profile", ""))
            self._index = ReplayIndex.from_pools(paths)
        except Exception as exc:  # bad profile JSON, missing file, PoolFormatError (names file and line)
            raise pb_utils.TritonModelException(f"{_TAG}: {exc}") from None
        self._latency = LatencyModel(profile, seed=seed, cards=self._index.cards)
        self._cap, load_note = self._capacity(config)

        self._metrics = GenerationMetrics(pb_utils, self._model_name)
        self._stopping = False
        pb_utils.Logger.log_info(
            f"{_TAG}: {self._model_name} loaded {len(self._index)} recorded answers of "
            f"{len(self._index.models())} models from {len(paths)} pool(s) in {time.monotonic() - started:.2f} s "
            f"(time_scale {self._time_scale}, tokens_per_chunk {self._tokens_per_chunk}, latency_seed {seed}; "
            f"simulated base ttft ms by size class {dict(profile.ttft_ms)}; max_concurrency {self._cap.limit}; "
            f"{load_note})"
        )

    def _capacity(self, config: dict[str, Any]) -> tuple[ConcurrencyCap, str]:
        """The instance's concurrency cap; then waits its SIMULATED load time (a real wait, scaled)."""
        try:
            cap = ConcurrencyCap(int(config_parameter(config, "max_concurrency", "0")))
            raw_table = config_parameter(config, "load_time_s", "")
            table = json.loads(raw_table) if raw_table else None
            if table is not None and not isinstance(table, dict):
                raise ValueError("load_time_s must be a JSON object of seconds by size class")
            size, seconds = load_seconds(
                self._latency, self._index.models(), load_as=config_parameter(config, "load_as", ""), table=table
            )
            load_scale = float(config_parameter(config, "load_time_scale", str(self._time_scale)))
            if not (math.isfinite(load_scale) and load_scale >= 0):
                raise ValueError(f"load_time_scale must be >= 0, got {load_scale}")
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"{_TAG}: bad parameter: {exc}") from None
        wait_s = seconds * load_scale
        time.sleep(wait_s)
        return cap, f"SIMULATED load of a {size} model: {seconds:g} s, waited {wait_s:.2f} s"

    # ----------------------------------------------------------------------------------------- requests

    async def execute(self, requests: list[Any]) -> None:
        """Serve every request of the batch concurrently; returns when all are closed (runs in background)."""
        await asyncio.gather(*(self._serve(request) for request in requests))
        return None

    def _parse(self, request: Any) -> _Request:
        text = single_input(pb_utils, request, "text_input")
        if text is None:
            raise InvalidInput("text_input is required")
        prompt = to_str("text_input", text)
        stream_value = single_input(pb_utils, request, "stream")
        stream = bool(stream_value) if stream_value is not None else False
        sampling = single_input(pb_utils, request, "sampling_parameters")
        max_tokens = _max_tokens(to_str("sampling_parameters", sampling)) if sampling is not None else None
        return _Request(prompt, stream, max_tokens, _recorded_model(request))

    async def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        self._metrics.opened()
        try:
            try:
                parsed = self._parse(request)
                prompt_hash = prompt_sha256(parsed.prompt)
                replay = self._index.replay(
                    parsed.recorded_model, parsed.prompt, max_tokens=parsed.max_tokens, prompt_hash=prompt_hash
                )
            except InvalidInput as exc:
                self._close_with_error(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
                return
            except ReplayNotFound as exc:
                pb_utils.Logger.log_verbose(f"{_TAG}: {exc}")
                self._close_with_error(sender, str(exc), pb_utils.TritonError.NOT_FOUND)
                return
            if not await self._cap.acquire(lambda: self._stopping or sender.is_cancelled(), CANCEL_POLL_S):
                self._finish_cancelled(sender, replay, 0, 0.0, 0.0)
                return
            try:
                await self._stream(sender, parsed, replay, prompt_hash)
            finally:
                self._cap.release()
        except Exception as exc:
            pb_utils.Logger.log_error(f"{_TAG}: request failed: {exc!r}")
            self._close_with_error(sender, f"replay failed: {exc}", pb_utils.TritonError.INTERNAL)

    async def _stream(self, sender: Any, parsed: _Request, replay: Any, prompt_hash: bytes) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        ttft, per_token = self._latency.sample_hashed(replay.model, prompt_hash)
        total = LatencyModel.total_ms(ttft, per_token, replay.output_tokens)
        if parsed.stream:
            steps = stream_plan(replay, ttft, per_token, self._tokens_per_chunk)
        else:
            steps = [ChunkStep(replay.text, replay.output_tokens, total)]
        sent_tokens = 0
        last_check = [-math.inf]
        for i, step in enumerate(steps):
            final = i == len(steps) - 1
            if await self._wait_until(sender, started + step.at_ms / 1000.0 * self._time_scale, last_check):
                self._finish_cancelled(sender, replay, sent_tokens, ttft, total)
                return
            finish_reason = replay.finish_reason if final else ""
            outputs = generation_outputs(pb_utils, step.text, replay.input_tokens, step.output_tokens, finish_reason)
            outputs.append(_f64("simulated_ttft_ms", ttft))
            if final:
                outputs.append(_f64("simulated_total_ms", total))
                if replay.cost_usd is not None:
                    outputs.append(_f64("cost_usd", replay.cost_usd))
            try:
                sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=_FINAL if final else 0)
            except Exception as exc:  # the client went away between the check and the send
                pb_utils.Logger.log_verbose(f"{_TAG}: send failed ({exc!r}); treating the request as cancelled")
                self._finish_cancelled(sender, replay, sent_tokens, ttft, total)
                return
            self._metrics.add_tokens(step.output_tokens - sent_tokens)
            sent_tokens = step.output_tokens
        self._metrics.closed(replay.finish_reason)
        pb_utils.Logger.log_verbose(
            f"{_TAG}: {replay.model} answered with {replay.output_tokens} tokens ({replay.finish_reason}) in "
            f"{len(steps)} response(s); simulated ttft {ttft:.0f} ms, total {total:.0f} ms, real "
            f"{loop.time() - started:.3f} s at time_scale {self._time_scale}"
        )

    async def _wait_until(self, sender: Any, deadline: float, last_check: list[float]) -> bool:
        """Sleep until the loop time ``deadline``; True as soon as the request is cancelled.

        ``is_cancelled()`` is an IPC round trip to Triton, so it is asked before every sleep (at least every
        CANCEL_POLL_S while sleeping) but, between chunks that are due at once, only when
        CANCEL_RECHECK_S has passed since ``last_check[0]`` (this request's previous check; updated here).
        """
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            remaining = deadline - now
            if self._stopping:
                return True
            if remaining > 0 or now - last_check[0] >= CANCEL_RECHECK_S:
                last_check[0] = now
                if sender.is_cancelled():
                    return True
                remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(remaining, CANCEL_POLL_S))

    # ----------------------------------------------------------------------------------------- closing

    def _finish_cancelled(self, sender: Any, replay: Any, sent_tokens: int, ttft: float, total: float) -> None:
        """Close a cancelled request with the final flag (a response if the sender still takes one)."""
        outputs = generation_outputs(pb_utils, "", replay.input_tokens, sent_tokens, "cancelled")
        outputs += [_f64("simulated_ttft_ms", ttft), _f64("simulated_total_ms", total)]
        send_final(pb_utils, sender, pb_utils.InferenceResponse(output_tensors=outputs), _TAG)
        self._metrics.closed("cancelled")
        pb_utils.Logger.log_verbose(f"{_TAG}: {replay.model} cancelled after {sent_tokens} tokens")

    def _close_with_error(self, sender: Any, message: str, code: Any) -> None:
        self._metrics.close_with_error(sender, message, code, _TAG)

    def finalize(self) -> None:
        """Stop waiting requests (they close as cancelled within CANCEL_POLL_S) and release the metrics."""
        self._stopping = True
        deadline = time.monotonic() + 5.0
        while self._metrics.in_flight_count > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        self._metrics.close()
        pb_utils.Logger.log_info(f"{_TAG}: {self._model_name} finalized")
