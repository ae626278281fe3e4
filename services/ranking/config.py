"""Ranking configuration (``[ranking]`` in the config file, ``CONSTELLATION_RANKING_*`` variables)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from constellation.config import ServiceConfig


class RankingConfig(ServiceConfig):
    """Settings of the ranking service.

    Attributes:
        port: gRPC port of RankingService (50054 by default).
        artifact: Trained pair ranker: an artifact directory, or one holding ``CURRENT``. Empty: the
            current one under ``$CONSTELLATION_CACHE_DIR/artifacts`` (``~/.cache/constellation/artifacts``).
            When none is there the service orders candidates by the first stage alone and logs so.
        encoder: Load all-MiniLM-L6-v2 (centrality and the pairwise ranker need it). False: agreement
            and form checks only, no torch in the process.
        encoder_threads: torch intra-op threads for the encoder (process-wide); 1 leaves the other core
            to the event loop and gRPC; 0 keeps torch's default (one per core).
        keep_fraction: Share of a large candidate set the first stage keeps when a request leaves ``keep``
            at 0 (at least 2 are always kept).
        prune_from: Sets with fewer candidates than this are not pruned unless the request sets ``keep``.
        max_candidates: Most candidates per request (more: INVALID_ARGUMENT).
        max_text_chars: Longest prompt or candidate text accepted, in characters (the encoder reads only
            the first and last ~128 word pieces of each anyway).
        queue_max: Most requests waiting for the ranking worker; beyond it calls fail with RESOURCE_EXHAUSTED.
    """

    service_name: ClassVar[str] = "ranking"
    model_config = SettingsConfigDict(env_prefix="CONSTELLATION_RANKING_", env_nested_delimiter="__", extra="forbid")

    port: int = Field(default=50054, ge=0, le=65535)
    artifact: str = ""
    encoder: bool = True
    encoder_threads: int = Field(default=1, ge=0, le=256)
    keep_fraction: float = Field(default=0.35, gt=0.0, le=1.0)
    prune_from: int = Field(default=8, ge=2)
    max_candidates: int = Field(default=64, ge=1, le=64)
    max_text_chars: int = Field(default=200_000, ge=1)
    queue_max: int = Field(default=256, ge=1)
