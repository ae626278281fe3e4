"""The Grafana dashboard in ``deploy/grafana/`` is well-formed and only queries metrics that exist.

Names come from the code itself: everything declared on :data:`constellation.metrics.REGISTRY` (the RPC
metrics, and dispatch's per-model metrics once ``services.dispatch.pipeline`` is imported), the metric
families the Triton models declare in their ``model.py``, and Triton's own documented metrics.
``tests/e2e/test_prometheus.py`` runs every expression against a real Prometheus scraping the mesh.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import services.dispatch.pipeline  # noqa: F401  (declares the per-model metrics on REGISTRY)
from constellation.metrics import REGISTRY
from services.inference.launcher import MODEL_REPOSITORY

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "constellation.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
METRIC = re.compile(r"\b(?:constellation|nv)_[a-z0-9_]+\b")

# Triton 2.51's own metrics on its metrics port (docs/user_guide/metrics.md; CPU build, no GPU metrics).
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count",
    "nv_pinned_memory_pool_total_bytes",
    "nv_pinned_memory_pool_used_bytes",
    "nv_cpu_utilization",
    "nv_cpu_memory_total_bytes",
    "nv_cpu_memory_used_bytes",
}

# The series names Prometheus stores for each kind of prometheus_client family.
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def registry_names() -> set[str]:
    """Every series name the services expose from REGISTRY (``_created`` series left out)."""
    return {family.name + suffix for family in REGISTRY.collect() for suffix in SUFFIXES.get(family.type, ("",))}


def model_names() -> set[str]:
    """Metric families the Triton models declare with ``pb_utils.MetricFamily(name=...)`` (in their
    ``model.py`` or the shared ``generation_metrics.py``)."""
    names: set[str] = set()
    for source in [*MODEL_REPOSITORY.glob("*/*/model.py"), MODEL_REPOSITORY.parent / "generation_metrics.py"]:
        names |= set(re.findall(r'MetricFamily\(\s*name="([a-z0-9_]+)"', source.read_text(encoding="utf-8")))
    return names


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def queried_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel.get("type") != "row"]


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in queried_panels(dashboard) for target in panel["targets"]]


def test_the_declared_names_are_found() -> None:
    assert {"constellation_rpc_handled_total", "constellation_model_time_to_first_token_seconds_bucket"} <= (
        registry_names()
    )
    assert {"constellation_generations_in_flight", "constellation_generations_total"} <= model_names()


def test_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable() -> None:
    dashboard = load()
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in queried_panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(target["datasource"] == DATASOURCE for target in panel["targets"]), panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


@pytest.mark.parametrize("expr", expressions(load()))
def test_every_expression_names_only_declared_metrics(expr: str) -> None:
    known = registry_names() | model_names() | TRITON_METRICS
    named = set(METRIC.findall(expr))
    assert named, f"no metric name in {expr!r}"
    assert named <= known, f"{sorted(named - known)} are declared nowhere (known: {sorted(known)})"
    for opening, closing in ("()", "[]", "{}"):
        assert expr.count(opening) == expr.count(closing), expr


def test_the_dashboard_covers_the_mesh() -> None:
    named = {name for expr in expressions(load()) for name in METRIC.findall(expr)}
    assert {
        "constellation_rpc_handled_total",
        "constellation_rpc_duration_seconds_bucket",
        "constellation_model_time_to_first_token_seconds_bucket",
        "constellation_model_time_per_output_token_seconds_sum",
        "constellation_model_calls_total",
        "constellation_cost_usd_total",
        "constellation_tokens_total",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "constellation_generations_in_flight",
    } <= named
