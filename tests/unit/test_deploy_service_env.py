"""The environment the chart gives each service is what that service's configuration reads: every
``CONSTELLATION_<SERVICE>_*`` variable names a field, and the configuration loads with them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from constellation.config import ServiceConfig, load_config
from deploy import check
from services.classifier.config import ClassifierConfig
from services.dispatch.config import DispatchConfig
from services.fusion.config import FusionConfig
from services.ranking.config import RankingConfig
from services.registry.config import RegistryConfig

CONFIGS: dict[str, type[ServiceConfig]] = {
    "dispatch": DispatchConfig,
    "classifier": ClassifierConfig,
    "ranking": RankingConfig,
    "fusion": FusionConfig,
    "registry": RegistryConfig,
}


def _service_env(value_set: str) -> dict[str, dict[str, str]]:
    """component -> {variable: value} of each Constellation workload the value set renders."""
    values = yaml.safe_load((Path(check.VALUE_SETS) / value_set).read_text(encoding="utf-8"))
    env: dict[str, dict[str, str]] = {}
    for obj in check.render(values):
        if obj["kind"] not in check.WORKLOAD_KINDS:
            continue
        component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        container: dict[str, Any] = obj["spec"]["template"]["spec"]["containers"][0]
        env[component] = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return env


@pytest.mark.parametrize("value_set", ["cpu-dev.yaml", "gpu-multi-keda.yaml"])
def test_every_service_variable_is_a_configuration_field(value_set: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _service_env(value_set)
    for component, cls in CONFIGS.items():
        prefix = str(cls.model_config.get("env_prefix"))
        variables = {k: v for k, v in env[component].items() if k.startswith(prefix)}
        unknown = {k for k in variables if k.removeprefix(prefix).lower().split("__")[0] not in cls.model_fields}
        assert not unknown, f"{component}: {unknown} set no field of {cls.__name__}"
        with monkeypatch.context() as patch:
            for name, value in variables.items():
                patch.setenv(name, value)
            config = load_config(cls, None)
        assert config.host == "0.0.0.0"
        assert config.security.insecure  # said explicitly: a pod binds every interface
        assert str(config.port) == variables[f"{prefix}PORT"]
        assert config.metrics_port > 0


def test_dispatch_finds_its_peers_and_the_first_model_group() -> None:
    dispatch = _service_env("gpu-multi-keda.yaml")["dispatch"]
    assert dispatch["CONSTELLATION_DISPATCH_REGISTRY_URL"] == "constellation-registry:50053"
    assert dispatch["CONSTELLATION_DISPATCH_TRITON_URL"] == "constellation-triton-llama-70b:8001"
    assert dispatch["CONSUL_HTTP_ADDR"] == "http://consul-server.consul.svc:8500"
