"""Dispatch configuration (``[dispatch]`` in the config file, ``CONSTELLATION_DISPATCH_*`` variables)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from constellation.config import ServiceConfig


class ModelPrice(BaseModel):
    """List price of a model in USD per million tokens (self-hosted models: your own cost estimate)."""

    price_in_per_mtok: float = Field(default=0.0, ge=0)
    price_out_per_mtok: float = Field(default=0.0, ge=0)


class DispatchConfig(ServiceConfig):
    """Settings of the dispatch service.

    Attributes:
        port: gRPC port of DispatchService (50051 by default).
        triton_url: Triton's gRPC endpoint, ``host:port``.
        default_model: The model asked when a request names none and no routing policy is configured.
        max_prompt_chars: Longest prompt accepted, in characters.
        max_tokens_limit: Largest ``sampling.max_tokens`` accepted.
        default_max_tokens: ``max_tokens`` used when a request leaves it 0.
        default_timeout_s: Deadline for model calls when the caller set none, in seconds.
        prices: Price per model name, used for the cost in usage events.
    """

    service_name: ClassVar[str] = "dispatch"
    model_config = SettingsConfigDict(env_prefix="CONSTELLATION_DISPATCH_", env_nested_delimiter="__", extra="forbid")

    port: int = Field(default=50051, ge=0, le=65535)
    triton_url: str = "127.0.0.1:8001"
    default_model: str = "smollm2"
    max_prompt_chars: int = Field(default=32_000, ge=1)
    max_tokens_limit: int = Field(default=2048, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    default_timeout_s: float = Field(default=120.0, gt=0)
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
