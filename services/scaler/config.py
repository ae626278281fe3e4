"""Scaler configuration (``[scaler]`` in the config file, ``CONSTELLATION_SCALER_*`` variables).

Example::

    [scaler]
    actuator = "triton"
    triton_url = "127.0.0.1:8001"
    models = ["smollm2", "replay"]
    [scaler.tiers.default]
    idle_to_zero_s = 300
    [scaler.tiers.hot]
    min_replicas = 1
    [scaler.model_tiers]
    smollm2 = "hot"
    [scaler.model_knobs.replay]
    concurrency = 8
    max_replicas = 2
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from constellation.config import ServiceConfig
from services.scaler.policy import Knobs

ActuatorKind = Literal["triton", "keda"]


class ScalerConfig(ServiceConfig):
    """Settings of the scaler service.

    Attributes:
        port: gRPC port of ScalerService and KEDA's ExternalScaler (50056 by default).
        actuator: ``triton`` (explicit model control of one local Triton) or ``keda`` (targets served to KEDA).
        triton_url: Triton's gRPC ``host:port`` (``triton`` actuator).
        model_repository: The repository that Triton serves, to read configs of unloaded models; empty: the
            configs Triton reports once a model was seen loaded.
        registry_address: Registry ``host:port`` for live latency statistics; empty: each tier's
            ``default_latency_s``.
        output_tokens: Typical answer length, to turn per-token latency into a request's latency.
        models: Models managed from the start (others join with their first arrival).
        interval_s: Seconds between two rounds of decisions.
        dry_run: Decide and report, never apply (a request for a model at zero still loads it).
        load_timeout_s: Deadline of one Triton load, in seconds.
        keda_metric_prefix: Metric names served to KEDA are ``<prefix><model>``.
        tiers: Knobs per tier; ``default`` applies to models without a tier.
        model_tiers: Model -> tier.
        model_knobs: Knobs of single models (replacing their tier's).
    """

    service_name: ClassVar[str] = "scaler"
    model_config = SettingsConfigDict(
        env_prefix="CONSTELLATION_SCALER_", env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    port: int = Field(default=50056, ge=0, le=65535)
    actuator: ActuatorKind = "triton"
    triton_url: str = "127.0.0.1:8001"
    model_repository: str = ""
    registry_address: str = ""
    output_tokens: int = Field(default=128, ge=1)
    models: list[str] = Field(default_factory=list)
    interval_s: float = Field(default=5.0, gt=0.0)
    dry_run: bool = False
    load_timeout_s: float = Field(default=300.0, gt=0.0)
    keda_metric_prefix: str = "constellation-replicas-"
    tiers: dict[str, Knobs] = Field(default_factory=dict)
    model_tiers: dict[str, str] = Field(default_factory=dict)
    model_knobs: dict[str, Knobs] = Field(default_factory=dict)
