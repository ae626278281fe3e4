"""Replay of recorded LLM answers, with token counts, cost and a SIMULATED latency.

The recorded pools (``constellation.pools``) hold real outputs of many LLMs on known prompts. The
``replay`` Triton model (``model_repository/replay``) serves them as if the recorded model were answering:
it looks up (recorded model, exact prompt text), streams the recorded text in chunks and reports the
recorded token counts and cost. No source records latency, so the time to first token and the time per
token are **simulated** by :class:`LatencyModel` from the model's size class, with a heavy tail that is
deterministic per (seed, model, prompt).

This module is plain Python (no Triton, no torch) so that it can be unit-tested and imported fast:

* :class:`ReplayIndex`: (model, sha256 of the prompt) -> :class:`ReplayEntry`, plus each model's
  :class:`~constellation.pools.ModelCard`; :meth:`ReplayIndex.replay` applies ``max_tokens``.
* :class:`LatencyModel` / :class:`LatencyProfile`: simulated (ttft_ms, per_token_ms).
* :func:`chunk_text` and :func:`stream_plan`: what to send, and at which simulated millisecond.
* :class:`ConcurrencyCap` and :func:`load_seconds`: an instance's capacity (requests served at once, the
  rest queued) and its SIMULATED load time by size class.

Token estimates: where a pool records no token counts (the RouterBench pools), they are estimated as
``max(1, round(len(text) / 4))`` (:data:`CHARS_PER_TOKEN` characters per token) and flagged as estimated.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

from constellation.pools import ModelCard, model_cards_for, read_pool

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4.0
"""Characters per token assumed when a pool records no token count (and for chunk sizes)."""

SIZE_CLASSES = ("small", "medium", "large", "xl")
"""Size classes of :class:`LatencyModel`, smallest first."""

PROMPT_PREVIEW_CHARS = 60
"""How much of an unknown prompt error messages show."""


def prompt_sha256(prompt: str) -> bytes:
    """The index key of a prompt: sha256 of its exact UTF-8 text (no normalisation at all)."""
    return hashlib.sha256(prompt.encode("utf-8")).digest()


def estimate_tokens(text: str, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """A rough token count for ``text``: characters / ``chars_per_token``, rounded, at least 1."""
    return max(1, round(len(text) / chars_per_token))


def cost_from_prices(card: ModelCard | None, input_tokens: int, output_tokens: int) -> float | None:
    """Cost in USD of a call at the card's list prices ($ per million tokens); None if a price is unknown."""
    if card is None or card.price_in_per_mtok is None or card.price_out_per_mtok is None:
        return None
    return (input_tokens * card.price_in_per_mtok + output_tokens * card.price_out_per_mtok) / 1e6


# ------------------------------------------------------------------------------------------------ errors


class ReplayNotFound(LookupError):
    """Nothing recorded for a request. The message always contains "is not found" and names the model.

    (``constellation.triton.TritonClient`` maps stream errors containing "is not found" to ``NotFound``.)
    """

    def __init__(self, message: str, model: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.model = model

    def __str__(self) -> str:
        return self.message


class UnknownRecordedModel(ReplayNotFound):
    """No recorded model of that name (or none was named)."""


class UnknownPrompt(ReplayNotFound):
    """The recorded model has no answer to this exact prompt text."""


def preview(prompt: str, limit: int = PROMPT_PREVIEW_CHARS) -> str:
    """The first ``limit`` characters of a prompt, with ``...`` when cut (for error messages)."""
    return prompt if len(prompt) <= limit else prompt[:limit] + "..."


# ------------------------------------------------------------------------------------------------ index


@dataclass(frozen=True, slots=True)
class ReplayEntry:
    """One recorded answer, ready to replay.

    Attributes:
        text: The recorded output text, exactly as recorded.
        input_tokens: Prompt tokens (recorded, or estimated when ``input_tokens_estimated``).
        output_tokens: Output tokens (recorded, or estimated when ``output_tokens_estimated``).
        cost_usd: Recorded cost in USD; when the pool has none, computed from the card's prices
            (``cost_from_prices``); None when neither is known.
        input_tokens_estimated: The pool recorded no input token count; :func:`estimate_tokens` was used.
        output_tokens_estimated: Likewise for the output.
        cost_from_prices: ``cost_usd`` was computed here from list prices, not recorded.
    """

    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    input_tokens_estimated: bool = False
    output_tokens_estimated: bool = False
    cost_from_prices: bool = False


@dataclass(frozen=True)
class Replay:
    """What one request replays, after ``max_tokens`` was applied.

    Attributes:
        model: The recorded model.
        text: Text to send (the recorded text, or its start when truncated).
        input_tokens: Prompt tokens.
        output_tokens: Output tokens sent (``min(recorded, max_tokens)``).
        finish_reason: ``"stop"`` (the whole recorded answer) or ``"length"`` (cut by ``max_tokens``).
        cost_usd: Cost in USD of what is sent, or None when unknown.
        entry: The full recorded entry.
    """

    model: str
    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str
    cost_usd: float | None
    entry: ReplayEntry


class ReplayIndex:
    """Recorded answers by (model name, sha256 of the exact prompt text), from one or more pool files.

    Memory: one :class:`ReplayEntry` (the text plus a few numbers) per (model, prompt); prompts are kept
    only as 32-byte digests, shared by all models. All five shared pools (~100k answers) take a few
    hundred MB at most and load in a few seconds (gsm8k, 41 x 1319 answers: ~1 s on 2 cores).

    When two pools (or two lines) hold the same (model, prompt), the first one loaded wins; the
    count of such duplicates is in :attr:`duplicates`.

    Not thread-safe while loading; read-only afterwards, so lookups may run from any thread.
    """

    def __init__(self) -> None:
        """An empty index; add pools with :meth:`add_pool` (or use :meth:`from_pools`)."""
        self._entries: dict[str, dict[bytes, ReplayEntry]] = {}
        self._cards: dict[str, ModelCard] = {}
        self.pool_paths: list[Path] = []
        """The pool files loaded, in order."""
        self.duplicates = 0
        """(model, prompt) pairs skipped because an earlier pool or line already had them."""

    @classmethod
    def from_pools(cls, paths: Iterable[Path | str]) -> ReplayIndex:
        """Load every pool file in ``paths`` (gzip or plain JSON lines) into a new index.

        Raises:
            constellation.pools.PoolFormatError: A pool (or its ``models.json``) is malformed.
            FileNotFoundError: A pool file does not exist.
        """
        index = cls()
        for path in paths:
            index.add_pool(path)
        return index

    def add_pool(self, path: Path | str) -> int:
        """Load one pool file and the ``models.json`` beside it (if any); return the answers added.

        Token counts that are null in the pool are estimated from the text (and flagged); a null
        ``cost_usd`` is computed from the card's prices when both are known, else stays None.
        Cards already known (from an earlier pool) are kept.
        """
        path = Path(path)
        started = time.monotonic()
        cards = model_cards_for(path)
        for name, card in cards.items():
            self._cards.setdefault(name, card)
        added = 0
        for record in read_pool(path):
            key = prompt_sha256(record.prompt)
            prompt_estimate: int | None = None
            for model, response in record.responses.items():
                answers = self._entries.get(model)
                if answers is None:
                    answers = self._entries[model] = {}
                if key in answers:
                    self.duplicates += 1
                    continue
                input_tokens = response.input_tokens
                input_estimated = input_tokens is None
                if input_tokens is None:
                    if prompt_estimate is None:
                        prompt_estimate = estimate_tokens(record.prompt)
                    input_tokens = prompt_estimate
                output_tokens = response.output_tokens
                output_estimated = output_tokens is None
                if output_tokens is None:
                    output_tokens = estimate_tokens(response.text)
                cost = response.cost_usd
                from_prices = False
                if cost is None:
                    cost = cost_from_prices(self._cards.get(model), input_tokens, output_tokens)
                    from_prices = cost is not None
                answers[key] = ReplayEntry(
                    text=response.text,
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                    cost_usd=cost,
                    input_tokens_estimated=input_estimated,
                    output_tokens_estimated=output_estimated,
                    cost_from_prices=from_prices,
                )
                added += 1
        self.pool_paths.append(path)
        logger.info(
            "replay index: %d recorded answers from %s in %.2f s (%d models in the index)",
            added,
            path,
            time.monotonic() - started,
            len(self._entries),
        )
        return added

    # -------------------------------------------------------------------------------------- queries

    def models(self) -> list[str]:
        """Names of the recorded models, sorted."""
        return sorted(self._entries)

    def __contains__(self, model: object) -> bool:
        return model in self._entries

    def __len__(self) -> int:
        """Number of (model, prompt) answers."""
        return sum(len(answers) for answers in self._entries.values())

    def prompt_count(self, model: str) -> int:
        """How many prompts ``model`` has answers for (0 for an unknown model)."""
        return len(self._entries.get(model, {}))

    @property
    def cards(self) -> dict[str, ModelCard]:
        """Model cards (from each pool's ``models.json``) of the recorded models that have one."""
        return {name: card for name, card in self._cards.items() if name in self._entries}

    def card(self, model: str) -> ModelCard | None:
        """The model's card, or None when no ``models.json`` describes it."""
        return self._cards.get(model)

    def lookup(self, model: str, prompt: str) -> ReplayEntry | None:
        """The recorded answer of ``model`` to exactly ``prompt``, or None."""
        return self.lookup_hashed(model, prompt_sha256(prompt))

    def lookup_hashed(self, model: str, prompt_hash: bytes) -> ReplayEntry | None:
        """Like :meth:`lookup`, with the prompt given as :func:`prompt_sha256` of its text."""
        answers = self._entries.get(model)
        return None if answers is None else answers.get(prompt_hash)

    def get(self, model: str | None, prompt: str, *, prompt_hash: bytes | None = None) -> ReplayEntry:
        """The recorded answer, or an error that says what is missing.

        Args:
            model: Recorded model name (None or empty: the request named none).
            prompt: The exact prompt text.
            prompt_hash: :func:`prompt_sha256` of ``prompt`` when already computed.

        Raises:
            UnknownRecordedModel: ``model`` is missing or not in any loaded pool.
            UnknownPrompt: ``model`` has no answer to this exact prompt.
        """
        if not model:
            raise UnknownRecordedModel(
                "recorded model is not found: the request parameter 'recorded_model' is missing or empty "
                f"({self._known_models()})",
                None,
            )
        answers = self._entries.get(model)
        if answers is None:
            raise UnknownRecordedModel(
                f"recorded model {model!r} is not found in the replay pools ({self._known_models()})", model
            )
        entry = answers.get(prompt_hash if prompt_hash is not None else prompt_sha256(prompt))
        if entry is None:
            raise UnknownPrompt(
                f"prompt {preview(prompt)!r} is not found in the replay pools for recorded model {model!r} "
                f"({len(answers)} prompts recorded for it; the text must match exactly)",
                model,
            )
        return entry

    def _known_models(self, limit: int = 12) -> str:
        names = self.models()
        if not names:
            return "no pools loaded"
        shown = ", ".join(names[:limit])
        more = f", ... ({len(names)} in all)" if len(names) > limit else ""
        return f"recorded models: {shown}{more}"

    def replay(
        self,
        model: str | None,
        prompt: str,
        *,
        max_tokens: int | None = None,
        prompt_hash: bytes | None = None,
    ) -> Replay:
        """What a request for ``model`` and ``prompt`` replays, honouring ``max_tokens``.

        When ``max_tokens`` is below the recorded output tokens, the text is cut proportionally (the
        first ``round(len(text) * max_tokens / output_tokens)`` characters, at least one), the output
        token count becomes ``max_tokens``, ``finish_reason`` is ``"length"`` and the cost is recomputed
        from the card's prices; without prices the recorded cost is scaled by
        ``(input + max_tokens) / (input + output)`` (an approximation).

        Raises:
            UnknownRecordedModel, UnknownPrompt: See :meth:`get`.
            ValueError: ``max_tokens`` < 1.
        """
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        entry = self.get(model, prompt, prompt_hash=prompt_hash)
        assert model is not None  # get() raised otherwise
        if max_tokens is None or max_tokens >= entry.output_tokens:
            return Replay(model, entry.text, entry.input_tokens, entry.output_tokens, "stop", entry.cost_usd, entry)
        keep = round(len(entry.text) * max_tokens / entry.output_tokens)
        text = entry.text[: max(1, keep)] if entry.text else ""
        cost = cost_from_prices(self._cards.get(model), entry.input_tokens, max_tokens)
        if cost is None and entry.cost_usd is not None:
            cost = entry.cost_usd * (entry.input_tokens + max_tokens) / (entry.input_tokens + entry.output_tokens)
        return Replay(model, text, entry.input_tokens, max_tokens, "length", cost, entry)


# ------------------------------------------------------------------------------------------------ latency


def _default_ttft() -> dict[str, float]:
    return {"small": 120.0, "medium": 200.0, "large": 350.0, "xl": 500.0}


def _default_per_token() -> dict[str, float]:
    return {"small": 8.0, "medium": 14.0, "large": 22.0, "xl": 30.0}


def _default_params_max() -> dict[str, float]:
    return {"small": 10.0, "medium": 40.0, "large": 100.0}


def _default_price_min() -> dict[str, float]:
    return {"xl": 10.0, "large": 2.0}


@dataclass(frozen=True)
class LatencyProfile:
    """Parameters of the SIMULATED latency (no pool records real latency). All times in milliseconds.

    The JSON form (``latency_profile`` model parameter) has the same keys as the attributes; every key is
    optional and the mappings are merged key by key into the defaults, e.g.
    ``{"ttft_ms": {"xl": 800}, "ttft_sigma": 1.0, "models": {"gpt-4o-2024-08-06": {"size_class": "large"}}}``.

    Attributes:
        ttft_ms: Base time to first token per size class (default small 120, medium 200, large 350,
            xl 500).
        per_token_ms: Base time per further output token per size class (default small 8, medium 14,
            large 22, xl 30).
        ttft_mu, ttft_sigma: The base ttft is multiplied by exp(N(mu, sigma)) (log-normal; default 0, 0.6).
        per_token_mu, per_token_sigma: Likewise for the per-token time (default 0, 0.25).
        params_b_max: Open models: the smallest class whose bound (billions of parameters, inclusive)
            holds ``params_b``; above every bound: xl (default small 10, medium 40, large 100).
        closed_price_out_min: Models without ``params_b``: the first class (largest first) whose minimum
            output price ($ per million tokens) the card's output price reaches (default xl 10, large 2);
            otherwise ``closed_default_class``.
        closed_default_class: Class of a closed model whose output price is below every minimum
            (default medium).
        unknown_class: Class of a model with no card, or a closed model with no price (default medium).
        models: Per-model overrides: ``{"<model>": {"size_class": ..., "ttft_ms": ..., "per_token_ms": ...}}``
            (base times before the tail).
    """

    ttft_ms: Mapping[str, float] = field(default_factory=_default_ttft)
    per_token_ms: Mapping[str, float] = field(default_factory=_default_per_token)
    ttft_mu: float = 0.0
    ttft_sigma: float = 0.6
    per_token_mu: float = 0.0
    per_token_sigma: float = 0.25
    params_b_max: Mapping[str, float] = field(default_factory=_default_params_max)
    closed_price_out_min: Mapping[str, float] = field(default_factory=_default_price_min)
    closed_default_class: str = "medium"
    unknown_class: str = "medium"
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str | None) -> LatencyProfile:
        """Parse the ``latency_profile`` JSON (None or blank: the defaults).

        Raises:
            ValueError: Not a JSON object, an unknown key, a negative time or sigma, or an unknown class.
        """
        if text is None or not text.strip():
            return cls()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"latency_profile is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("latency_profile must be a JSON object")
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> LatencyProfile:
        """Build a profile from a mapping of overrides (see the class docstring); validates it."""
        base = cls()
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"latency_profile has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        changes: dict[str, Any] = {}
        for key, value in data.items():
            current = getattr(base, key)
            if isinstance(current, Mapping):
                if not isinstance(value, Mapping):
                    raise ValueError(f"latency_profile.{key} must be an object")
                if key == "models":
                    if not all(isinstance(v, Mapping) for v in value.values()):
                        raise ValueError("latency_profile.models must map model names to objects")
                    changes[key] = {str(m): dict(v) for m, v in value.items()}
                else:
                    changes[key] = {**current, **{str(k): _number(f"{key}.{k}", v) for k, v in value.items()}}
            elif isinstance(current, str):
                changes[key] = str(value)
            else:
                changes[key] = _number(key, value)
        profile = replace(base, **changes)
        profile.validate()
        return profile

    def validate(self) -> None:
        """Raise ValueError unless every class name is known and every time and sigma is >= 0."""
        for name in ("ttft_ms", "per_token_ms", "params_b_max", "closed_price_out_min"):
            table = getattr(self, name)
            for cls_name, value in table.items():
                if cls_name not in SIZE_CLASSES:
                    raise ValueError(f"latency_profile.{name}: unknown size class {cls_name!r}; use {SIZE_CLASSES}")
                if value < 0:
                    raise ValueError(f"latency_profile.{name}.{cls_name} must be >= 0, got {value}")
        for name in ("ttft_ms", "per_token_ms"):
            missing = [c for c in SIZE_CLASSES if c not in getattr(self, name)]
            if missing:
                raise ValueError(f"latency_profile.{name} lacks size class(es) {missing}")
        for name in ("ttft_sigma", "per_token_sigma"):
            if getattr(self, name) < 0:
                raise ValueError(f"latency_profile.{name} must be >= 0")
        for name in ("closed_default_class", "unknown_class"):
            if getattr(self, name) not in SIZE_CLASSES:
                raise ValueError(f"latency_profile.{name} must be one of {SIZE_CLASSES}")
        for model, override in self.models.items():
            bad = sorted(set(override) - {"size_class", "ttft_ms", "per_token_ms"})
            if bad:
                raise ValueError(f"latency_profile.models[{model!r}] has unknown key(s) {bad}")
            if "size_class" in override and override["size_class"] not in SIZE_CLASSES:
                raise ValueError(f"latency_profile.models[{model!r}].size_class must be one of {SIZE_CLASSES}")
            for key in ("ttft_ms", "per_token_ms"):
                if key in override and _number(f"models[{model!r}].{key}", override[key]) < 0:
                    raise ValueError(f"latency_profile.models[{model!r}].{key} must be >= 0")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"latency_profile.{name} must be a finite number, got {value!r}")
    return float(value)


def size_class_of(card: ModelCard | None, profile: LatencyProfile | None = None) -> str:
    """A model's size class from its card: by ``params_b`` when known, else by output price.

    Defaults: params_b <= 10 small, <= 40 medium, <= 100 large, else xl; without params_b (closed
    models) output price >= 10 $/Mtok xl, >= 2 large, else medium; no card or no price: medium.
    """
    profile = profile or LatencyProfile()
    if card is None:
        return profile.unknown_class
    if card.params_b is not None:
        for cls_name, bound in sorted(profile.params_b_max.items(), key=lambda item: item[1]):
            if card.params_b <= bound:
                return cls_name
        return "xl"
    if card.price_out_per_mtok is None:
        return profile.unknown_class
    for cls_name, minimum in sorted(profile.closed_price_out_min.items(), key=lambda item: -item[1]):
        if card.price_out_per_mtok >= minimum:
            return cls_name
    return profile.closed_default_class


@dataclass(frozen=True)
class SimulatedLatency:
    """One request's SIMULATED latency, in milliseconds (unscaled)."""

    ttft_ms: float
    per_token_ms: float
    total_ms: float


_UNIT = 2.0**-64


class LatencyModel:
    """SIMULATED latency of recorded models: (time to first token, time per further token) in ms.

    Base times come from the model's size class (:func:`size_class_of` on its card, or a per-model
    override); each is multiplied by a log-normal factor (heavy tail). The two standard-normal draws come
    from sha256(latency seed, model, prompt hash): a counter-free RNG, so the same (seed, model, prompt)
    always gets the same latency, in any process and order, and different prompts get independent draws.
    Stateless after construction, hence safe to share between threads and coroutines.
    """

    def __init__(
        self,
        profile: LatencyProfile | Mapping[str, Any] | str | None = None,
        *,
        seed: int = 0,
        cards: Mapping[str, ModelCard] | None = None,
    ) -> None:
        """A latency model; cheap to build.

        Args:
            profile: A :class:`LatencyProfile`, a mapping of overrides or its JSON text (None: defaults).
            seed: The latency seed (``latency_seed``); changing it redraws every tail factor.
            cards: Model cards by name, for size classes (e.g. :attr:`ReplayIndex.cards`).

        Raises:
            ValueError: The profile is invalid.
        """
        if profile is None or isinstance(profile, str):
            profile = LatencyProfile.from_json(profile)
        elif not isinstance(profile, LatencyProfile):
            profile = LatencyProfile.from_mapping(profile)
        else:
            profile.validate()
        self.profile: LatencyProfile = profile
        self.seed = int(seed)
        self.cards: dict[str, ModelCard] = dict(cards or {})
        self._ttft_tail = NormalDist(profile.ttft_mu, profile.ttft_sigma) if profile.ttft_sigma > 0 else None
        self._token_tail = (
            NormalDist(profile.per_token_mu, profile.per_token_sigma) if profile.per_token_sigma > 0 else None
        )

    def size_class(self, model: str) -> str:
        """The size class of ``model`` (a per-model override first, then its card)."""
        override = self.profile.models.get(model, {})
        if "size_class" in override:
            return str(override["size_class"])
        return size_class_of(self.cards.get(model), self.profile)

    def base_ms(self, model: str) -> tuple[float, float]:
        """The model's (ttft_ms, per_token_ms) before the tail factors."""
        size = self.size_class(model)
        override = self.profile.models.get(model, {})
        ttft = float(override.get("ttft_ms", self.profile.ttft_ms[size]))
        per_token = float(override.get("per_token_ms", self.profile.per_token_ms[size]))
        return ttft, per_token

    def sample(self, model: str, prompt: str) -> tuple[float, float]:
        """Simulated (ttft_ms, per_token_ms) of ``model`` answering ``prompt``; deterministic."""
        return self.sample_hashed(model, prompt_sha256(prompt))

    def sample_hashed(self, model: str, prompt_hash: bytes) -> tuple[float, float]:
        """Like :meth:`sample`, with the prompt given as :func:`prompt_sha256` of its text."""
        ttft, per_token = self.base_ms(model)
        digest = hashlib.sha256(
            b"constellation-replay-latency\0%d\0%s\0%s" % (self.seed, model.encode("utf-8"), prompt_hash)
        ).digest()
        if self._ttft_tail is not None:
            ttft *= math.exp(self._ttft_tail.inv_cdf(_uniform(digest[:8])))
        elif self.profile.ttft_mu:
            ttft *= math.exp(self.profile.ttft_mu)
        if self._token_tail is not None:
            per_token *= math.exp(self._token_tail.inv_cdf(_uniform(digest[8:16])))
        elif self.profile.per_token_mu:
            per_token *= math.exp(self.profile.per_token_mu)
        return ttft, per_token

    @staticmethod
    def total_ms(ttft_ms: float, per_token_ms: float, output_tokens: int) -> float:
        """Simulated total time: ``ttft + per_token * (output_tokens - 1)`` (just ttft for <= 1 token)."""
        return ttft_ms + per_token_ms * max(0, output_tokens - 1)

    def simulate(self, model: str, prompt: str, output_tokens: int) -> SimulatedLatency:
        """Simulated ttft, per-token and total time of one answer of ``output_tokens`` tokens."""
        ttft, per_token = self.sample(model, prompt)
        return SimulatedLatency(ttft, per_token, self.total_ms(ttft, per_token, output_tokens))


def _uniform(eight_bytes: bytes) -> float:
    """A float strictly inside (0, 1) from 8 random bytes."""
    return (int.from_bytes(eight_bytes, "big") + 0.5) * _UNIT


# ------------------------------------------------------------------------------------------------ chunks


def chunk_text(text: str, tokens_per_chunk: int = 8, *, chars_per_token: float = CHARS_PER_TOKEN) -> list[str]:
    """Split ``text`` into pieces of about ``tokens_per_chunk`` estimated tokens.

    Pieces are about ``tokens_per_chunk * chars_per_token`` characters; a piece ends just after
    whitespace when there is some in its second half, so words are rarely cut. Pieces are sliced by
    Unicode code point, so a multi-byte UTF-8 character is never split, and ``"".join(pieces) == text``
    always. An empty text gives an empty list.

    Raises:
        ValueError: ``tokens_per_chunk`` < 1.
    """
    if tokens_per_chunk < 1:
        raise ValueError(f"tokens_per_chunk must be >= 1, got {tokens_per_chunk}")
    size = max(1, round(tokens_per_chunk * chars_per_token))
    pieces: list[str] = []
    start = 0
    length = len(text)
    while start < length:
        end = min(start + size, length)
        if end < length:
            floor = start + size // 2
            for i in range(end - 1, floor - 1, -1):
                if text[i].isspace():
                    end = i + 1
                    break
        pieces.append(text[start:end])
        start = end
    return pieces


@dataclass(frozen=True)
class ChunkStep:
    """One streamed response of a replay.

    Attributes:
        text: The new text (a delta).
        output_tokens: Output tokens sent so far, this chunk included.
        at_ms: SIMULATED milliseconds after the request arrived at which it is sent (unscaled):
            ``ttft + per_token * (output_tokens - 1)``.
    """

    text: str
    output_tokens: int
    at_ms: float


def stream_plan(replay: Replay, ttft_ms: float, per_token_ms: float, tokens_per_chunk: int = 8) -> list[ChunkStep]:
    """The chunks of a streamed replay with their simulated send times; never empty.

    The output tokens are spread over the chunks in proportion to their characters (cumulative counts,
    non-decreasing, the last equal to ``replay.output_tokens``), so the last chunk is sent at the
    simulated total time. An empty text gives one empty chunk carrying all the tokens.
    """
    pieces = chunk_text(replay.text, tokens_per_chunk) or [""]
    total_chars = len(replay.text)
    n_tokens = replay.output_tokens
    steps: list[ChunkStep] = []
    chars = 0
    previous = 0
    for i, piece in enumerate(pieces):
        chars += len(piece)
        if i == len(pieces) - 1:
            tokens = n_tokens
        else:
            tokens = min(n_tokens, max(previous, 1 if n_tokens else 0, round(n_tokens * chars / total_chars)))
        previous = tokens
        steps.append(ChunkStep(piece, tokens, LatencyModel.total_ms(ttft_ms, per_token_ms, tokens)))
    return steps


# ----------------------------------------------------------------------------------------------- capacity

DEFAULT_LOAD_S: Mapping[str, float] = {"small": 2.0, "medium": 5.0, "large": 12.0, "xl": 25.0}
"""SIMULATED time to load a recorded model, by size class, in unscaled seconds (the replay model waits this
times its ``time_scale`` in ``initialize``, so Triton's load call takes that long)."""


def load_seconds(
    latency: LatencyModel, models: Iterable[str], *, load_as: str = "", table: Mapping[str, float] | None = None
) -> tuple[str, float]:
    """The SIMULATED load time of a replay model instance: (size class, unscaled seconds).

    Args:
        latency: Gives each recorded model's size class.
        models: The recorded models the instance serves; the largest class among them is the one loaded,
            unless ``load_as`` names the model to load as (a replay model set up for one recorded model).
        table: Seconds by size class, merged into :data:`DEFAULT_LOAD_S`.

    Raises:
        ValueError: A negative time or an unknown size class in ``table``.
    """
    merged = {**DEFAULT_LOAD_S, **(table or {})}
    bad = sorted(k for k, v in merged.items() if k not in SIZE_CLASSES or not v >= 0)
    if bad:
        raise ValueError(f"load_time_s: classes {bad} are unknown or negative (classes: {SIZE_CLASSES})")
    names = [load_as] if load_as else list(models)
    if not names:
        return "small", float(merged["small"])
    size = max((latency.size_class(name) for name in names), key=SIZE_CLASSES.index)
    return size, float(merged[size])


class ConcurrencyCap:
    """At most ``limit`` requests in service at once in one model instance (a replica); the rest wait in
    arrival order, so latency grows with load. ``limit`` 0 means no cap. Use from one event loop.

    A waiter that is cancelled (its ``cancelled`` callback says so, asked every ``poll_s``) leaves the queue
    without ever being served.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"max_concurrency must be >= 0, got {limit}")
        self.limit = limit
        self.in_service = 0
        self.waiting = 0
        self._semaphore = asyncio.Semaphore(limit) if limit > 0 else None

    async def acquire(self, cancelled: Callable[[], bool], poll_s: float) -> bool:
        """Waits for a slot; True when one is held (call :meth:`release` after), False when cancelled first."""
        if self._semaphore is None:
            self.in_service += 1
            return True
        self.waiting += 1
        slot = asyncio.ensure_future(self._semaphore.acquire())
        try:
            while not slot.done():
                if cancelled():
                    slot.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await slot
                    if not slot.cancelled():  # it got the slot just before the cancel: hand it back
                        self._semaphore.release()
                    return False
                await asyncio.wait({slot}, timeout=poll_s)
            await slot
        finally:
            self.waiting -= 1
        self.in_service += 1
        return True

    def release(self) -> None:
        """Frees the slot of a request that is done."""
        self.in_service -= 1
        if self._semaphore is not None:
            self._semaphore.release()
