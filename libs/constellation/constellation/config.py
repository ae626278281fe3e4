"""Typed configuration: one settings class per service, built from a TOML file plus the environment.

Precedence, highest first: keyword arguments (tests), environment variables
(``CONSTELLATION_<SERVICE>_<FIELD>``, nested fields joined by ``__``), the service's table in a TOML
file (``[dispatch]`` in ``constellation.toml``, or the file named by ``CONSTELLATION_CONFIG``), then
the defaults in code. Nothing else in the code base reads ``os.environ`` for configuration, except
the standard ``OTEL_*`` variables, which the OpenTelemetry SDK reads itself.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from constellation.errors import InvalidArgument

CONFIG_ENV = "CONSTELLATION_CONFIG"
DEFAULT_CONFIG_FILE = "constellation.toml"


class _TomlTableSource(PydanticBaseSettingsSource):
    """Reads one table (the service's section) of a TOML file."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None, table: str):
        super().__init__(settings_cls)
        self._values: dict[str, Any] = {}
        if path is not None and path.is_file():
            with path.open("rb") as handle:
                try:
                    document = tomllib.load(handle)
                except tomllib.TOMLDecodeError as exc:
                    raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from exc
            section = document.get(table, {})
            if not isinstance(section, dict):
                raise InvalidArgument(f"config file {path}: [{table}] must be a table")
            self._values = section

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class SecurityConfig(BaseModel):
    """Keys and TLS of one service (``[<service>.security]``, ``CONSTELLATION_<SERVICE>_SECURITY__<FIELD>``).

    Attributes:
        auth: Require an API key on every call (roles: :mod:`constellation.auth`). Off by default.
        keys_db: SQLite file holding the key table (the registry's store); empty: the registry's default.
        service_key: API key (role ``service``) this service sends on its calls to other services.
        insecure: Allow binding a non-loopback address without ``auth`` (refused otherwise).
        tls_cert: PEM certificate the server presents (and, with ``mtls``, its clients present too:
            ``tls_client_cert`` when set); empty: plain-text gRPC.
        tls_key: PEM private key of ``tls_cert``.
        tls_ca: PEM CA that signed the peers' certificates (verifies servers; with ``mtls``, clients).
        tls_client_cert: PEM certificate this service's clients present (mTLS); empty: ``tls_cert``.
        tls_client_key: Private key of ``tls_client_cert``.
        mtls: The server requires a client certificate signed by ``tls_ca``.
        tls_server_name: Name checked against servers' certificates instead of the dialled host.
        triton_tls: Dial Triton over TLS too (Triton started with ``--grpc-use-ssl``).
    """

    model_config = ConfigDict(extra="forbid")

    auth: bool = False
    keys_db: str = ""
    service_key: str = ""
    insecure: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    mtls: bool = False
    tls_server_name: str = ""
    triton_tls: bool = False


class ServiceConfig(BaseSettings):
    """Settings every service has. Subclasses set ``service_name`` and the env prefix.

    Attributes:
        host: Address to bind. Loopback by default; ``0.0.0.0`` or ``[::]`` to serve beyond the host.
        port: gRPC port; 0 picks a free one (tests).
        metrics_port: Prometheus ``/metrics`` HTTP port; 0 picks a free one, -1 disables it.
        shutdown_grace_s: The drain window: seconds in-flight calls (LLM streams) get to finish once
            new calls are refused; a stream still running a moment before it ends gets a last message
            with an UNAVAILABLE status.
        shutdown_notice_s: After a stop signal, seconds health reports NOT_SERVING while calls are still
            accepted, so that load balancers stop sending before calls are refused.
        traces_file: When set, finished spans are also appended to this JSON-lines file.
        consul_http_addr: A Consul agent's HTTP address (``http://127.0.0.1:8500``; also read from the
            standard ``CONSUL_HTTP_ADDR``). When set, the service registers itself there with a gRPC
            health check while it runs, and dispatch discovers the services it has no address for.
        advertise_host: The host other machines reach this service at, registered in Consul; empty:
            ``host`` (or the machine's name when ``host`` binds every interface).
        security: API keys and TLS (:class:`SecurityConfig`); all off by default.
    """

    service_name: ClassVar[str] = "service"
    config_file: ClassVar[Path | None] = None

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    metrics_port: int = Field(default=-1, ge=-1, le=65535)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    shutdown_notice_s: float = Field(default=1.0, ge=0)
    log_level: str = "INFO"
    traces_file: str = ""
    consul_http_addr: str = Field(default="", validation_alias=AliasChoices("consul_http_addr", "CONSUL_HTTP_ADDR"))
    advertise_host: str = ""
    security: SecurityConfig = Field(default_factory=SecurityConfig)

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid")

    @property
    def advertised_host(self) -> str:
        """``advertise_host``, else ``host``, else (binding every interface) this machine's name."""
        if self.advertise_host:
            return self.advertise_host
        if self.host in ("0.0.0.0", "::", "[::]", ""):
            return socket.gethostname()
        return self.host

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = cls.config_file
        if path is None:
            named = os.environ.get(CONFIG_ENV)
            path = Path(named) if named else Path(DEFAULT_CONFIG_FILE)
        return (init_settings, env_settings, _TomlTableSource(settings_cls, path, cls.service_name))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


S = TypeVar("S", bound=ServiceConfig)


def load_config(cls: type[S], path: Path | str | None = None, **overrides: Any) -> S:
    """Builds ``cls`` from ``path`` (or the default file), the environment, then ``overrides``.

    Overrides that are None (command-line flags not given) are ignored.

    Raises:
        InvalidArgument: the file or a variable holds a value of the wrong type or range; the message
            names the field and the variable that would set it.
    """
    from pydantic import ValidationError

    prefix = str(cls.model_config.get("env_prefix", ""))
    overrides = {key: value for key, value in overrides.items() if value is not None}

    class _Bound(cls):  # type: ignore[valid-type,misc]
        config_file = Path(path) if path is not None else None

    try:
        loaded = _Bound(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            lines.append(f"{field} ({prefix}{field.upper().replace('.', '__')}): {err['msg']}")
        raise InvalidArgument(f"invalid {cls.service_name} configuration: " + "; ".join(lines)) from exc
    return loaded  # type: ignore[no-any-return]
