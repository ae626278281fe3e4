"""Fusion configuration (``[fusion]`` in the config file, ``CONSTELLATION_FUSION_*`` variables)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from constellation.config import ServiceConfig


class FusionConfig(ServiceConfig):
    """Settings of the fusion service.

    Attributes:
        port: gRPC port of FusionService (50055 by default).
        triton_url: ``host:port`` of the Triton gRPC endpoint that serves the fuser model.
        fuser_model: Triton model that writes fused open answers when a request names none. The default
            ``smollm2`` is the real SmolLM2-135M-Instruct of ``services/inference`` (tiny: expect its fused
            answers to be weaker than a large model's candidates; name a stronger model in production).
        fuser_models: Further Triton models a request may name in ``FuseRequest.fuser_model`` (the default
            ``fuser_model`` always may). Any other name is INVALID_ARGUMENT: a caller's typo must not turn
            silently into a top-candidate answer, and callers must not make fusion load arbitrary models.
        fuse_timeout_s: Longest the fuser may take, in seconds; the caller's remaining deadline, less
            ``deadline_reserve_s``, shortens it further. On timeout the top candidate is returned.
        deadline_reserve_s: Time kept back from the caller's deadline to send the fallback answer, in seconds.
        prompt_budget_chars: Most characters of the fuser's prompt (query, instructions and candidates);
            candidates are trimmed to share what the query and instructions leave. About 4 characters per
            token for English text.
        max_fused_candidates: Most top-ranked candidates the fuser reads.
        fuser_max_tokens: Most tokens the fuser writes when the request's sampling sets none.
        fuser_temperature: Fuser temperature when the request sets none (0: greedy, repeatable).
        fuser_price_in_per_mtok: Price of the fuser's input tokens in USD per million, for ``usage.cost_usd``
            (0 for a self-hosted model with no per-token price).
        fuser_price_out_per_mtok: Same for output tokens.
        artifact: Calibrator for the vote's confidence: an artifact directory or one holding ``CURRENT``.
            Empty: the current one under ``$CONSTELLATION_CACHE_DIR/artifacts``. Without one, confidence is
            the weighted share of the winning answer (uncalibrated) and the service logs so.
        uncalibrated_threshold: ``uncertain`` threshold on the weighted share when no calibrator is loaded.
        max_candidates: Most candidates in one request.
        max_prompt_chars: Longest prompt accepted, in characters.
    """

    service_name: ClassVar[str] = "fusion"
    model_config = SettingsConfigDict(env_prefix="CONSTELLATION_FUSION_", env_nested_delimiter="__", extra="forbid")

    port: int = Field(default=50055, ge=0, le=65535)
    triton_url: str = "127.0.0.1:8001"
    fuser_model: str = "smollm2"
    fuser_models: list[str] = Field(default_factory=list, max_length=64)
    fuse_timeout_s: float = Field(default=120.0, gt=0)
    deadline_reserve_s: float = Field(default=0.2, ge=0)
    prompt_budget_chars: int = Field(default=6000, ge=500)
    max_fused_candidates: int = Field(default=4, ge=1, le=16)
    fuser_max_tokens: int = Field(default=256, ge=1, le=4096)
    fuser_temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    fuser_price_in_per_mtok: float = Field(default=0.0, ge=0.0)
    fuser_price_out_per_mtok: float = Field(default=0.0, ge=0.0)
    artifact: str = ""
    uncalibrated_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    max_candidates: int = Field(default=64, ge=1)
    max_prompt_chars: int = Field(default=1_000_000, ge=1)
