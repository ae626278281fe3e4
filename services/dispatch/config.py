"""Dispatch configuration (``[dispatch]`` in the config file, ``CONSTELLATION_DISPATCH_*`` variables)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from constellation.config import ServiceConfig
from constellation.triton_conventions import Convention
from services.dispatch.budget import BudgetSettings


class ModelEntry(BaseModel):
    """How dispatch reaches one model of the pool, and what it costs.

    Attributes:
        triton_model: The Triton model that serves it; empty means the same name as the entry.
        parameters: KServe request parameters sent with every request (the replay model serves a
            recorded model named by ``recorded_model``).
        price_in_per_mtok: USD per million input tokens (self-hosted: your own cost estimate).
        price_out_per_mtok: USD per million output tokens.
        family: Model family, for routing priors.
        params_b: Parameters in billions, when known.
        capabilities: What the model can do (``code``, ``long_context``...), matched against
            ``Ceilings.required_capabilities``; empty means unknown (not excluded).
        convention: The Triton model's tensor convention: ``constellation`` (our python-backend models),
            ``vllm`` (Triton's vLLM backend) or ``tensorrtllm`` (a TensorRT-LLM ensemble).
        context_length: Tokens the model's context holds; 0: unknown (no prompt is refused for length).
    """

    model_config = ConfigDict(extra="forbid")

    triton_model: str = ""
    parameters: dict[str, str] = Field(default_factory=dict)
    price_in_per_mtok: float = Field(default=0.0, ge=0)
    price_out_per_mtok: float = Field(default=0.0, ge=0)
    family: str | None = None
    params_b: float | None = None
    capabilities: list[str] = Field(default_factory=list)
    convention: Convention = "constellation"
    context_length: int = Field(default=0, ge=0)


class DispatchConfig(ServiceConfig):
    """Settings of the dispatch service.

    Attributes:
        port: gRPC port of DispatchService (50051 by default).
        budgets: Per-tenant daily cost budgets and request rates (:mod:`services.dispatch.budget`); off by default.
        http_port: port of the OpenAI-compatible HTTP API, served in the same process and event loop on
            the same host as gRPC; -1 (the default for a bare service) serves none, 0 picks a free port.
            ``constellation up`` serves it on 8080.
        triton_url: Triton's gRPC endpoint, ``host:port``.
        default_model: The model asked when a request names none and no routing policy is configured.
        max_prompt_chars: Longest prompt accepted, in characters.
        max_tokens_limit: Largest ``sampling.max_tokens`` accepted (``SamplingParams.max_tokens`` in
            common.proto documents this default).
        default_max_tokens: ``max_tokens`` used when a request leaves it 0.
        default_timeout_s: Deadline for model calls when the caller set none, in seconds.
        classifier_url: ClassifierService ``host:port``; empty runs without classification.
        classify_timeout_s: Deadline of the classification call; on failure or timeout the request goes
            on unclassified (a classifier outage never loses a request).
        classify_embedding: Ask the classifier for the query embedding too. Off while no routing policy
            uses it: the embedding forces the encoder on every query (about 30 ms on 2 CPU cores).
        models: The pool: model name -> how to reach it and its price. A name not listed is sent to
            the Triton model of the same name, at no cost.
        models_file: A JSON file of more entries (``{"name": {...ModelEntry...}}``), merged over ``models``.
        router_artifact: The trained router (``constellation train router``): an artifact directory or
            a root holding ``router/CURRENT``. Empty: the default root's CURRENT when there is one.
        confusion_artifact: Confusion matrices for error-bounded queries (``constellation train
            confusion``): an artifact directory or a root holding ``confusion/CURRENT``. Empty: the
            default root's CURRENT when there is one, else error-bounded queries are refused.
        max_samples: Most calls of one model an error-bounded plan may make (temperature > 0 only).
        routing: Route requests that name no model over the pool (the catalog and the registry's
            models). Off, or with an empty pool, they go to ``default_model``.
        default_profile: Profile of requests that leave ``profile`` unspecified.
        max_fallbacks: How many next-best models a routed request may fall back to when its model fails.
        registry_url: RegistryService ``host:port``: live latency and health for routing, and every
            model call's outcome reported back. Empty: the catalog alone.
        registry_wait_s: How long startup waits for the registry's first snapshot before serving anyway.
        early_stop: End a fan-out wave as soon as its outcome is settled (a quorum agrees, or the leader
            cannot be overtaken) and cancel the members still running; off waits for every member.
        hedging: Send a backup request to the next-best model when a routed model has produced no first
            token by its p95 time to first token; the first to answer streams, the other is cancelled.
        hedge_after_ms: The wait used while a model's p95 is not yet known (0: no hedge until it is).
        hedge_factor: Multiplies the p95 (1.0 hedges about 5% of calls).
        hedge_min_samples: Own observations needed before dispatch trusts its p95 of a model.
        ranking_url: RankingService ``host:port``, which orders the candidates of open-answer fan-outs.
        rank_timeout_s: Deadline of a Rank call (also bounded by the request's own deadline).
        scaler_url: ScalerService ``host:port``: every model call is counted for it (fan-out members each),
            and a call to a cold or loading model waits for its load (``services.dispatch.capacity``).
        cold_queue_max: Calls that may wait for one loading model while a warm model could take them.
        fusion_url: FusionService ``host:port``: calibrated votes and generated answers for fan-outs.
            Empty: dispatch votes itself; a fusion failure also falls back to that vote.
        fuse_timeout_s: Deadline of a Fuse call (also bounded by the request's own deadline).
        triton_check_s: How often dispatch asks Triton whether it is live; its health follows the answer
            (NOT_SERVING while Triton is unreachable). 0: never (always SERVING).
    """

    service_name: ClassVar[str] = "dispatch"
    model_config = SettingsConfigDict(env_prefix="CONSTELLATION_DISPATCH_", env_nested_delimiter="__", extra="forbid")

    port: int = Field(default=50051, ge=0, le=65535)
    http_port: int = Field(default=-1, ge=-1, le=65535)
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)
    triton_url: str = "127.0.0.1:8001"
    default_model: str = "smollm2"
    max_prompt_chars: int = Field(default=32_000, ge=1)
    max_tokens_limit: int = Field(default=2048, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    default_timeout_s: float = Field(default=120.0, gt=0)
    classifier_url: str = ""
    classify_timeout_s: float = Field(default=0.5, gt=0)
    classify_embedding: bool = False
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    models_file: str = ""
    router_artifact: str = ""
    confusion_artifact: str = ""
    max_samples: int = Field(default=3, ge=1, le=16)
    routing: bool = True
    default_profile: Literal["quality", "cost", "speed", "balanced"] = "balanced"
    max_fallbacks: int = Field(default=2, ge=0, le=8)
    registry_url: str = ""
    registry_wait_s: float = Field(default=5.0, ge=0)
    early_stop: bool = True
    hedging: bool = True
    hedge_after_ms: float = Field(default=0.0, ge=0)
    hedge_factor: float = Field(default=1.0, gt=0)
    hedge_min_samples: int = Field(default=20, ge=1)
    ranking_url: str = ""
    rank_timeout_s: float = Field(default=2.0, gt=0)
    fusion_url: str = ""
    fuse_timeout_s: float = Field(default=20.0, gt=0)
    triton_check_s: float = Field(default=2.0, ge=0)
    scaler_url: str = ""
    cold_queue_max: int = Field(default=64, ge=1)

    def catalog(self) -> dict[str, ModelEntry]:
        """``models`` merged with the entries of ``models_file`` (read once, at call time)."""
        merged = dict(self.models)
        if self.models_file:
            raw = json.loads(Path(self.models_file).read_text(encoding="utf-8"))
            merged.update({name: ModelEntry.model_validate(entry) for name, entry in raw.items()})
        return merged
