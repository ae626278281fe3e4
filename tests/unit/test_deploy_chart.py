"""The Helm chart renders, validates and keeps its own rules (offline; ``make deploy-check`` runs it all)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import check

VALUES = Path(check.VALUE_SETS)


def _render(name: str) -> list[dict[str, Any]]:
    return check.render(yaml.safe_load((VALUES / name).read_text(encoding="utf-8")))


def _by(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.mark.parametrize("value_set", ["cpu-dev.yaml", "gpu-vllm.yaml", "gpu-multi-keda.yaml"])
def test_every_rendered_object_is_valid(value_set: str) -> None:
    report = check.Report()
    objects = check.check_value_set(VALUES / value_set, report)
    assert report.problems == []
    assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy"} <= {o["kind"] for o in objects}


def test_services_use_grpc_health_probes_and_the_registry_keeps_its_volume() -> None:
    objects = _render("cpu-dev.yaml")
    deployments = _by(objects, "Deployment")
    assert set(deployments) == {f"constellation-{n}" for n in ("dispatch", "classifier", "ranking", "fusion", "scaler")}
    for deployment in deployments.values():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["grpc"]["port"] == container["ports"][0]["containerPort"]
    registry = _by(objects, "StatefulSet")["constellation-registry"]
    assert registry["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_keda_scales_each_model_group_through_the_scaler() -> None:
    objects = _render("gpu-multi-keda.yaml")
    scaled = _by(objects, "ScaledObject")
    assert set(scaled) == {f"constellation-triton-{g}" for g in ("llama-70b", "mistral-7b", "small-pool")}
    mistral = scaled["constellation-triton-mistral-7b"]["spec"]
    assert (mistral["minReplicaCount"], mistral["maxReplicaCount"]) == (0, 8)
    trigger = mistral["triggers"][0]
    assert trigger["type"] == "external"
    assert trigger["metadata"]["scalerAddress"] == "constellation-scaler.llm.svc:50056"
    assert _by(objects, "HorizontalPodAutoscaler") == {}
    # KEDA owns the replica count: the Deployments leave it unset.
    assert all("replicas" not in d["spec"] for n, d in _by(objects, "Deployment").items() if "triton" in n)


def test_model_groups_land_on_gpu_nodes_with_their_backend_configs() -> None:
    objects = _render("gpu-multi-keda.yaml")
    trt = _by(objects, "Deployment")["constellation-triton-llama-70b"]["spec"]["template"]["spec"]
    assert trt["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert trt["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert trt["tolerations"][0]["key"] == "nvidia.com/gpu"
    configs = _by(objects, "ConfigMap")
    ensemble = configs["constellation-triton-llama-70b-models"]["data"]["llama-3.1-70b-instruct.config.pbtxt"]
    assert all(name in ensemble for name in ('"text_input"', '"max_tokens"', '"stream"', '"text_output"'))
    vllm = configs["constellation-triton-mistral-7b-models"]["data"]
    assert 'backend: "vllm"' in vllm["mistral-7b-instruct.config.pbtxt"]
    assert check.triton_config_problems(objects) == []


def test_a_broken_triton_config_is_reported() -> None:
    objects = _render("gpu-vllm.yaml")
    broken = copy.deepcopy(objects)
    for obj in broken:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].endswith("-models"):
            obj["data"] = {key: text.replace("max_batch_size", "max_batch") for key, text in obj["data"].items()}
    assert check.triton_config_problems(broken)


def test_only_the_front_door_is_open_to_the_outside() -> None:
    objects = _render("gpu-multi-keda.yaml")
    assert check.policy_problems(objects) == []
    policies = _by(objects, "NetworkPolicy")
    front = policies["constellation-front-door"]["spec"]
    assert front["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "dispatch"
    assert sorted(p["port"] for p in front["ingress"][0]["ports"]) == [8080, 50051]
    opened = copy.deepcopy(policies["constellation-internal"])
    opened["spec"]["ingress"] = [{}]
    assert check.policy_problems([opened])


def test_a_root_or_writable_container_is_reported() -> None:
    deployment = copy.deepcopy(_by(_render("cpu-dev.yaml"), "Deployment")["constellation-ranking"])
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    assert check.policy_problems([deployment]) == [
        "Deployment/constellation-ranking/ranking: writable root or privilege escalation"
    ]


def test_schema_and_keda_validation_catch_typos() -> None:
    objects = _render("gpu-multi-keda.yaml")
    deployment = copy.deepcopy(next(iter(_by(objects, "Deployment").values())))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 1}
    assert "grpcc" in (check.validate_object(deployment) or "")
    scaled = copy.deepcopy(next(iter(_by(objects, "ScaledObject").values())))
    scaled["spec"]["minReplicaCountt"] = 1
    assert "minReplicaCountt" in (check.validate_object(scaled) or "")


def test_bad_values_are_rejected_by_the_schema() -> None:
    report = check.Report()
    check.check_bad_values(report)
    assert report.problems == []
    assert len(report.passed) == len(list(check.BAD_VALUES.glob("*.yaml"))) >= 5


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    objects = _render("gpu-vllm.yaml")
    report = check.Report()
    check.check_rules(report, [o for o in objects if o["kind"] == "PrometheusRule"], shutil.which("promtool"))
    assert report.problems == []
    assert len(report.passed) == 3
