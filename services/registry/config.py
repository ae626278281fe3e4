"""Registry configuration (``[registry]`` in the config file, ``CONSTELLATION_REGISTRY_*`` variables)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from constellation.config import ServiceConfig
from constellation.paths import default_cache_dir


def default_db_path() -> Path:
    """``<cache dir>/registry.sqlite`` (``$CONSTELLATION_CACHE_DIR`` or ``~/.cache/constellation``)."""
    return default_cache_dir() / "registry.sqlite"


class RegistryConfig(ServiceConfig):
    """Settings of the registry service.

    Attributes:
        port: gRPC port of RegistryService (50053 by default).
        db: The SQLite file; empty means ``~/.cache/constellation/registry.sqlite``; ``:memory:`` keeps
            nothing across restarts.
        seed_file: A pool file (TOML or JSON) upserted at every start; empty loads nothing.
        ewma_alpha: Weight of the newest observation in the latency means, in (0, 1].
        latency_window: Observations kept per model for the latency percentiles.
        error_window: Recent calls the error rate is computed over.
        error_rate_threshold: Error rate at or above which a model turns UNHEALTHY ...
        min_calls: ... once the window holds at least this many calls.
        max_consecutive_failures: Failures in a row (timeouts included) that turn a model UNHEALTHY.
        probe_interval_s: Seconds between readiness probes of every model with a backend endpoint.
        unhealthy_probe_interval_s: Seconds between probes of the UNHEALTHY models.
        probe_timeout_s: Deadline of one Triton ``ModelReady`` call, in seconds.
        min_unhealthy_s: Least seconds a model stays UNHEALTHY before a ready probe brings it back.
        probes: Run the active prober at all (false: only outcomes and registrations change state).
        watch_queue_max: Changes one WatchModels subscriber may fall behind before it is dropped with
            RESOURCE_EXHAUSTED.
        watch_coalesce_s: Least seconds between two statistics-only UPDATED changes of one model.
        max_outcomes: Most outcomes in one ReportOutcome call (more: INVALID_ARGUMENT).
        probe_allow: Hosts (any port) or ``host:port`` pairs the prober may dial; loopback by default.
        triton_url: Triton's configured address, always on the prober's allow-list.
        consul_http_addr: Consul agent HTTP address (``http://127.0.0.1:8500``); also read from
            ``CONSTELLATION_REGISTRY_CONSUL_HTTP_ADDR`` or the standard ``CONSUL_HTTP_ADDR``. Empty: no
            Consul. With it, model records are mirrored to Consul KV as well (``advertise_host``: see
            :class:`~constellation.config.ServiceConfig`).
    """

    service_name: ClassVar[str] = "registry"
    model_config = SettingsConfigDict(
        env_prefix="CONSTELLATION_REGISTRY_", env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    port: int = Field(default=50053, ge=0, le=65535)
    db: str = ""
    seed_file: str = ""
    ewma_alpha: float = Field(default=0.1, gt=0.0, le=1.0)
    latency_window: int = Field(default=512, ge=1, le=1_000_000)
    error_window: int = Field(default=20, ge=1, le=100_000)
    error_rate_threshold: float = Field(default=0.5, gt=0.0, le=1.0)
    min_calls: int = Field(default=4, ge=1)
    max_consecutive_failures: int = Field(default=5, ge=1)
    probe_interval_s: float = Field(default=10.0, gt=0.0)
    unhealthy_probe_interval_s: float = Field(default=1.0, gt=0.0)
    probe_timeout_s: float = Field(default=1.0, gt=0.0)
    min_unhealthy_s: float = Field(default=5.0, ge=0.0)
    probes: bool = True
    watch_queue_max: int = Field(default=1024, ge=1)
    watch_coalesce_s: float = Field(default=0.5, ge=0.0)
    max_outcomes: int = Field(default=4096, ge=1)
    probe_allow: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost", "::1"])
    triton_url: str = "127.0.0.1:8001"
    consul_http_addr: str = Field(
        default="",
        validation_alias=AliasChoices(
            "consul_http_addr", "CONSTELLATION_REGISTRY_CONSUL_HTTP_ADDR", "CONSUL_HTTP_ADDR"
        ),
    )

    @property
    def db_path(self) -> str:
        return self.db or str(default_db_path())
