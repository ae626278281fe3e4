"""A generic streaming causal-LM for Triton's python backend (decoupled), with its own token loop.

Every local model of the repository (``model_repository/<name>/1/model.py``) is a symlink to this one
file; what differs between models is only their ``config.pbtxt`` parameters (below).

Tensor convention (that of Triton's vLLM backend):

* inputs: ``text_input`` (string [1]); optional ``stream`` (bool [1], default false); optional
  ``sampling_parameters`` (string [1], a JSON object with optional keys ``max_tokens``, ``temperature``,
  ``top_p``, ``stop``, ``seed``; see :func:`_parse_sampling_parameters`).
* outputs: ``text_output`` (string [-1], one element), ``num_input_tokens`` and ``num_output_tokens``
  (int32 [1]), ``finish_reason`` (string [1]: ``stop`` | ``length`` | ``cancelled``, ``""`` on
  non-final streamed responses).

With ``stream`` true each response's ``text_output`` is only the text that is new since the previous
response (at most one response per generated token; a token whose text is not yet printable, such as
half of a UTF-8 character or a tail that may be the start of a stop string, is held back). The last
response carries ``TRITONSERVER_RESPONSE_COMPLETE_FINAL``, the finish reason and the token counts.
Without ``stream`` there is one response with the whole text. ``num_output_tokens`` counts every sampled
token, including an end-of-sequence token or the token that completed a stop string; neither appears in
``text_output``.

Concurrency: ``execute()`` validates and tokenises each request on Triton's thread, queues it and
returns None at once (decoupled models answer through their response sender). One worker thread runs
the queued generations one after another, so concurrent requests wait in FIFO order instead of fighting
over the CPU cores; none is dropped. Before each token the worker asks the response sender whether the
client cancelled (gRPC stream cancelled or closed) and then stops at once, closing the request with the
final flag. ``finalize()`` stops the worker within one token and fails requests still queued.

Model parameters (config.pbtxt ``parameters``):

* ``model_loader`` (required): a key of :data:`LOADERS` or ``"package.module:function"``; the function is
  called with the cache directory (:func:`constellation.paths.default_cache_dir`, i.e.
  ``$CONSTELLATION_CACHE_DIR``) and returns a transformers checkpoint directory.
* ``apply_chat_template`` (default ``"true"``): wrap ``text_input`` as one user message with the
  tokenizer's chat template (which must exist); ``"false"`` feeds the text as is (plain completion,
  for base models).
* ``max_context_tokens`` (optional): cap on prompt plus generated tokens, below the model's own
  ``max_position_embeddings`` (a base model with a 32k context needs no such window on 2 cores).
* ``default_max_tokens`` (default ``"128"``) and ``max_tokens_limit`` (default ``"2048"``).
* ``num_threads`` (optional): torch intra-op threads; default: the CPUs this process may run on.

Prometheus metrics on Triton's metrics port, all labelled ``model``:
``constellation_generations_in_flight`` (gauge: accepted requests not yet closed, queued ones included),
``constellation_generated_tokens_total`` (counter, incremented per sampled token) and
``constellation_generations_total`` (counter, also labelled ``finish_reason``: stop, length, cancelled,
error).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
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

LOADERS: dict[str, str] = {
    "smollm2": "services.inference.checkpoints:ensure_smollm2",
    "gemma3_270m": "services.inference.checkpoints:ensure_gemma3_270m",
}
"""Short names for ``model_loader``: name -> ``"module:function"`` taking a cache dir, returning a Path."""

MAX_STOP_STRINGS = 8
_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "stop", "seed")
_MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class _Sampling:
    """Validated sampling parameters of one request."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class _Job:
    """A validated request waiting for (or in) generation."""

    sender: Any
    input_ids: torch.Tensor
    stream: bool
    sampling: _Sampling
    enqueued_at: float = field(default_factory=time.monotonic)


def _as_float(name: str, value: Any) -> float:
    result: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            result = None
    if result is None or not math.isfinite(result):
        raise InvalidInput(f"{name} must be a finite number, got {value!r}")
    return result


def _parse_sampling_parameters(raw: str, default_max_tokens: int, max_tokens_limit: int) -> _Sampling:
    """Validate the ``sampling_parameters`` JSON.

    Keys (all optional; ``null`` means "use the default"; numbers may also be given as strings, as Triton's
    vLLM backend examples do): ``max_tokens`` int in [1, max_tokens_limit]; ``temperature`` float in
    [0, 2], 0 means greedy, default 1.0; ``top_p`` float in (0, 1], default 1.0; ``stop`` list of at most
    8 non-empty strings; ``seed`` int in [0, 2**64 - 1] (without it sampling is not reproducible).
    Unknown keys are an error.

    Raises:
        InvalidInput: With a message naming the offending field.
    """
    data = sampling_object(raw)
    unknown = sorted(set(data) - set(_SAMPLING_KEYS))
    if unknown:
        raise InvalidInput(
            f"sampling_parameters has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_SAMPLING_KEYS)}"
        )
    values = {k: v for k, v in data.items() if v is not None}

    max_tokens = default_max_tokens
    if "max_tokens" in values:
        max_tokens = as_int("sampling_parameters.max_tokens", values["max_tokens"])
        if not 1 <= max_tokens <= max_tokens_limit:
            raise InvalidInput(f"sampling_parameters.max_tokens must be in [1, {max_tokens_limit}], got {max_tokens}")
    temperature = 1.0
    if "temperature" in values:
        temperature = _as_float("sampling_parameters.temperature", values["temperature"])
        if not 0.0 <= temperature <= 2.0:
            raise InvalidInput(f"sampling_parameters.temperature must be in [0, 2], got {temperature}")
    top_p = 1.0
    if "top_p" in values:
        top_p = _as_float("sampling_parameters.top_p", values["top_p"])
        if not 0.0 < top_p <= 1.0:
            raise InvalidInput(f"sampling_parameters.top_p must be in (0, 1], got {top_p}")
    stop: tuple[str, ...] = ()
    if "stop" in values:
        raw_stop = values["stop"]
        if (
            not isinstance(raw_stop, list)
            or len(raw_stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in raw_stop)
        ):
            raise InvalidInput(
                f"sampling_parameters.stop must be a list of at most {MAX_STOP_STRINGS} non-empty strings, "
                f"got {raw_stop!r}"
            )
        stop = tuple(raw_stop)
    seed: int | None = None
    if "seed" in values:
        seed = as_int("sampling_parameters.seed", values["seed"])
        if not 0 <= seed <= _MAX_SEED:
            raise InvalidInput(f"sampling_parameters.seed must be in [0, 2**64 - 1], got {seed}")
    return _Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)


class _Detokenizer:
    """Turns the growing list of generated token ids into text deltas that are safe to send.

    The whole sequence is decoded after every token (byte-level BPE decoding is prefix-stable apart from an
    incomplete UTF-8 character at the end, which decodes to U+FFFD and is held back). A tail that could be
    the beginning of a stop string is held back too, so a stop string is never partly sent.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self._ids: list[int] = []
        self.text = ""
        self._sent = 0

    def push(self, token_id: int) -> bool:
        """Add a token; return True if a stop string is now complete (the text is cut before it)."""
        previous_length = len(self.text)
        self._ids.append(token_id)
        self.text = self._tokenizer.decode(self._ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if not self._stop:
            return False
        # A new match can only end in the new text; the margin covers characters that were U+FFFD before.
        start = max(0, previous_length - self._longest_stop - 4)
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def delta(self) -> str:
        """Return the not yet sent text that is certain, and mark it sent."""
        safe = len(self.text)
        while safe > self._sent and self.text[safe - 1] == "\ufffd" and len(self.text) - safe < 4:
            safe -= 1
        for k in range(min(self._longest_stop - 1, safe - self._sent), 0, -1):
            tail = self.text[safe - k : safe]
            if any(s.startswith(tail) for s in self._stop):
                safe -= k
                break
        out = self.text[self._sent : safe]
        self._sent = safe
        return out

    def flush(self) -> str:
        """Return all text not yet sent (used for the final response), and mark it sent."""
        out = self.text[self._sent :]
        self._sent = len(self.text)
        return out


def _resolve_loader(name: str) -> Any:
    target = LOADERS.get(name, name)
    module_name, sep, function_name = target.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(
            f"model_loader {name!r} is neither one of {sorted(LOADERS)} nor of the form 'package.module:function'"
        )
    return getattr(importlib.import_module(module_name), function_name)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class TritonPythonModel:
    """Triton python-backend entry point; see the module docstring for the contract."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load tokenizer and weights, set up metrics and start the generation worker."""
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("this model must be decoupled (model_transaction_policy)")
        self._model_name = args["model_name"]
        self._apply_chat_template = config_parameter(config, "apply_chat_template", "true").lower() == "true"
        self._default_max_tokens = int(config_parameter(config, "default_max_tokens", "128"))
        self._max_tokens_limit = int(config_parameter(config, "max_tokens_limit", "2048"))
        if not 1 <= self._default_max_tokens <= self._max_tokens_limit:
            raise pb_utils.TritonModelException("default_max_tokens must be in [1, max_tokens_limit]")
        loader_name = config_parameter(config, "model_loader")
        if not loader_name:
            raise pb_utils.TritonModelException("parameter model_loader is required")

        threads = int(config_parameter(config, "num_threads", str(_cpu_count())))
        torch.set_num_threads(max(1, threads))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or parallel work already started
            pass

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from constellation.paths import default_cache_dir

        started = time.monotonic()
        weights_dir = Path(_resolve_loader(loader_name)(default_cache_dir()))
        self._tokenizer = AutoTokenizer.from_pretrained(weights_dir, local_files_only=True)
        if self._apply_chat_template and not getattr(self._tokenizer, "chat_template", None):
            raise pb_utils.TritonModelException(
                f"apply_chat_template is true but the tokenizer in {weights_dir} has no chat template"
            )
        self._model = AutoModelForCausalLM.from_pretrained(weights_dir, local_files_only=True)
        self._model.eval()
        self._context_length = int(getattr(self._model.config, "max_position_embeddings", 2048))
        cap = int(config_parameter(config, "max_context_tokens", "0"))
        if cap > 0:
            self._context_length = min(self._context_length, cap)
        self._eos_ids = self._end_token_ids()
        pb_utils.Logger.log_info(
            f"{self._model_name}: loaded {weights_dir} in {time.monotonic() - started:.1f} s "
            f"(torch threads {torch.get_num_threads()}, context {self._context_length}, eos {sorted(self._eos_ids)})"
        )

        self._metrics = GenerationMetrics(pb_utils, self._model_name)

        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._worker = threading.Thread(target=self._work, name=f"{self._model_name}-generate", daemon=True)
        self._worker.start()

    def _end_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self._model, "generation_config", None), self._model.config):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list | tuple):
                ids.update(int(i) for i in eos)
        if self._tokenizer.eos_token_id is not None:
            ids.add(int(self._tokenizer.eos_token_id))
        return ids

    # ----------------------------------------------------------------------------------------- requests

    def execute(self, requests: list[Any]) -> None:
        """Validate, tokenise and queue each request; answer invalid ones at once. Returns None at once."""
        for request in requests:
            sender = request.get_response_sender()
            self._metrics.opened()
            try:
                job = self._prepare(request, sender)
            except InvalidInput as exc:
                self._close_with_error(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            except Exception as exc:
                pb_utils.Logger.log_error(f"{self._model_name}: cannot prepare request: {exc!r}")
                self._close_with_error(sender, f"internal error: {exc}", pb_utils.TritonError.INTERNAL)
                continue
            if self._stopping.is_set():
                self._close_with_error(sender, "model is unloading", pb_utils.TritonError.UNAVAILABLE)
                continue
            self._jobs.put(job)
        return None

    def _prepare(self, request: Any, sender: Any) -> _Job:
        text_value = single_input(pb_utils, request, "text_input", "string")
        if text_value is None:
            raise InvalidInput("text_input is required")
        text = to_str("text_input", text_value)
        if not text.strip():
            raise InvalidInput("text_input must not be empty")
        stream_value = single_input(pb_utils, request, "stream", "bool")
        stream = bool(stream_value) if stream_value is not None else False
        sampling_value = single_input(pb_utils, request, "sampling_parameters", "string")
        raw_sampling = to_str("sampling_parameters", sampling_value) if sampling_value is not None else ""
        sampling = _parse_sampling_parameters(raw_sampling, self._default_max_tokens, self._max_tokens_limit)

        if self._apply_chat_template:
            prompt = self._tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            ids = self._tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = self._tokenizer(text)["input_ids"]
        if len(ids) >= self._context_length:
            raise InvalidInput(f"text_input is {len(ids)} tokens, the model's context holds {self._context_length}")
        return _Job(sender=sender, input_ids=torch.tensor([ids], dtype=torch.long), stream=stream, sampling=sampling)

    # ----------------------------------------------------------------------------------------- generation

    def _work(self) -> None:
        """Worker thread: run queued jobs one at a time until finalize() queues the None sentinel."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._stopping.is_set():
                self._close_with_error(job.sender, "model is unloading", pb_utils.TritonError.UNAVAILABLE)
                continue
            try:
                self._generate(job)
            except Exception as exc:
                pb_utils.Logger.log_error(f"{self._model_name}: generation failed: {exc!r}")
                self._close_with_error(job.sender, f"generation failed: {exc}", pb_utils.TritonError.INTERNAL)

    def _should_stop(self, sender: Any) -> bool:
        return self._stopping.is_set() or bool(sender.is_cancelled())

    def _generate(self, job: _Job) -> None:
        """Prefill, then sample one token at a time until EOS, a stop string, max_tokens or cancellation."""
        sender = job.sender
        sampling = job.sampling
        n_in = int(job.input_ids.shape[1])
        if self._should_stop(sender):
            self._finish(sender, "", n_in, 0, "cancelled")
            return
        generator: torch.Generator | None = None
        if sampling.temperature > 0:
            generator = torch.Generator()
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sampling.seed)
        limit = min(sampling.max_tokens, self._context_length - n_in)
        detok = _Detokenizer(self._tokenizer, sampling.stop)
        n_out = 0
        started = time.monotonic()
        first_token_at: float | None = None
        finish = "length"
        with torch.inference_mode():
            out = self._model(input_ids=job.input_ids, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            logits = out.logits[0, -1]
            while True:
                token = self._sample(logits, sampling, generator)
                n_out += 1
                self._metrics.add_tokens(1)
                if first_token_at is None:
                    first_token_at = time.monotonic()
                if token in self._eos_ids:
                    finish = "stop"
                    break
                if detok.push(token):
                    finish = "stop"
                    break
                if n_out >= limit:
                    finish = "length"
                    break
                if job.stream:
                    delta = detok.delta()
                    if delta:
                        sender.send(self._response(delta, n_in, n_out, ""))
                if self._should_stop(sender):
                    finish = "cancelled"
                    break
                out = self._model(
                    input_ids=torch.tensor([[token]], dtype=torch.long), past_key_values=past, use_cache=True
                )
                past = out.past_key_values
                logits = out.logits[0, -1]
        del past
        text = detok.flush() if job.stream else detok.text
        self._finish(sender, text, n_in, n_out, finish)
        elapsed = time.monotonic() - started
        ttft = (first_token_at - started) if first_token_at else float("nan")
        rate = (n_out - 1) / (elapsed - ttft) if n_out > 1 and elapsed > ttft else float("nan")
        pb_utils.Logger.log_info(
            f"{self._model_name}: {finish} after {n_out} tokens (prompt {n_in}, queued "
            f"{started - job.enqueued_at:.3f} s, first token {ttft:.3f} s, {rate:.1f} tokens/s)"
        )

    @staticmethod
    def _sample(logits: torch.Tensor, sampling: _Sampling, generator: torch.Generator | None) -> int:
        if sampling.temperature == 0 or generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < sampling.top_p
            sorted_probs = sorted_probs * keep
            choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=generator))

    # ----------------------------------------------------------------------------------------- responses

    @staticmethod
    def _response(text: str, n_in: int, n_out: int, finish_reason: str) -> Any:
        return pb_utils.InferenceResponse(output_tensors=generation_outputs(pb_utils, text, n_in, n_out, finish_reason))

    def _finish(self, sender: Any, text: str, n_in: int, n_out: int, finish_reason: str) -> None:
        """Send the final response (text, counts, finish reason) with the final flag and update metrics."""
        send_final(pb_utils, sender, self._response(text, n_in, n_out, finish_reason), self._model_name)
        self._metrics.closed(finish_reason)

    def _close_with_error(self, sender: Any, message: str, code: Any) -> None:
        self._metrics.close_with_error(sender, message, code, self._model_name)

    # ----------------------------------------------------------------------------------------- shutdown

    def finalize(self) -> None:
        """Stop the worker: the running generation ends within one token, queued requests get UNAVAILABLE."""
        started = time.monotonic()
        self._stopping.set()
        self._jobs.put(None)
        self._worker.join(timeout=30)
        if self._worker.is_alive():
            pb_utils.Logger.log_warn(f"{self._model_name}: generation worker did not stop within 30 s")
        while True:  # requests that raced in behind the sentinel
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._close_with_error(job.sender, "model is unloading", pb_utils.TritonError.UNAVAILABLE)
        self._metrics.close()
        pb_utils.Logger.log_info(f"{self._model_name}: finalized in {time.monotonic() - started:.3f} s")
