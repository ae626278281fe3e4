"""Offline checks of the Helm chart and the alert rules: ``python -m deploy.check`` (``make deploy-check``).

What runs, with no cluster and no network:

* ``helm lint --strict`` of ``deploy/helm/constellation`` (Helm's Go SDK, bundled by ``helm-python-sdk``);
* ``helm template`` with every value set under ``deploy/helm/values/*.yaml``; each rendered object is checked
  against Kubernetes' OpenAPI schemas in strict mode (``kubernetes-validate``, unknown fields rejected),
  KEDA ScaledObjects against KEDA's models (``cloudcoil-models-keda``, which must keep every field), the
  Triton model configurations against Triton's ``ModelConfig`` protobuf, and the chart's own rules
  (non-root, read-only root, GPUs on model groups, only the front door open to the outside);
* every file under ``deploy/helm/values/bad/`` must be rejected by ``values.schema.json``;
* ``promtool check rules`` and ``promtool test rules`` on the alert rules, and on the PrometheusRule
  that the chart renders.

What it cannot show (a real cluster can): that images pull, pods schedule on GPU nodes, Triton loads the
models, probes pass, NetworkPolicies are enforced by the CNI, and KEDA reaches the scaler.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
CHART = ROOT / "helm" / "constellation"
VALUE_SETS = ROOT / "helm" / "values"
BAD_VALUES = VALUE_SETS / "bad"
RULES = CHART / "files" / "prometheus-rules.yaml"
RULE_TESTS = ROOT / "prometheus" / "rules.test.yaml"
DASHBOARD = ROOT / "grafana" / "constellation.json"
CHART_DASHBOARD = CHART / "files" / "grafana-dashboard.json"
KUBERNETES_VERSION = "1.33.0"
"""The oldest Kubernetes the chart targets for validation: image volumes and native gRPC probes exist."""

CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}


@dataclass
class Report:
    """What the checks found: one line per check passed, one per problem."""

    passed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def ok(self, line: str) -> None:
        self.passed.append(line)

    def fail(self, line: str) -> None:
        self.problems.append(line)


def lint_chart(report: Report) -> None:
    """``helm lint --strict``: errors and warnings fail, informational findings do not."""
    import helm_python as helm

    result = helm.lint(str(CHART), strict=True, namespace="constellation")
    findings = [m for m in result["messages"] if m["severity"] >= 2] + [{"error": e} for e in result["errors"]]
    for finding in findings:
        report.fail(f"helm lint: {finding['error']}")
    if not findings:
        report.ok(f"helm lint --strict: clean ({len(result['messages'])} informational)")


def render(values: dict[str, Any], *, name: str = "constellation", namespace: str = "llm") -> list[dict[str, Any]]:
    """Every object ``helm template`` renders from ``values`` (schema validation included)."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name=name, namespace=namespace, is_install=True)
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


def validate_object(obj: dict[str, Any]) -> str | None:
    """The problem with one rendered object, or None when its schema accepts it."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key == ("keda.sh/v1alpha1", "ScaledObject"):
        return _validate_scaled_object(obj)
    if key in CUSTOM_KINDS:
        return None if isinstance(obj.get("spec"), dict) else "no spec"
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{exc.message} at {'.'.join(str(p) for p in exc.path)}"
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
        return f"no schema: {exc}"
    return None


def _validate_scaled_object(obj: dict[str, Any]) -> str | None:
    """KEDA's model accepts the object and drops none of its fields (a dropped field is a typo)."""
    import pydantic
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    try:
        model = ScaledObject.model_validate(obj)
    except pydantic.ValidationError as exc:
        return str(exc).splitlines()[0]
    kept = model.model_dump(by_alias=True, exclude_none=True, mode="json")
    lost = sorted(_paths(obj) - _paths(kept))
    return f"fields KEDA does not know: {lost}" if lost else None


def _paths(value: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf of a JSON-like value."""
    if isinstance(value, dict):
        return {p for k, v in value.items() for p in _paths(v, f"{prefix}.{k}" if prefix else str(k))}
    if isinstance(value, list):
        return {p for i, v in enumerate(value) for p in _paths(v, f"{prefix}[{i}]")}
    return {prefix}


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The containers (init containers included) of a Deployment or StatefulSet."""
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    yield from pod.get("initContainers", []) + pod.get("containers", [])


def policy_problems(objects: list[dict[str, Any]]) -> list[str]:
    """The chart's own rules, which no schema states."""
    problems = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in WORKLOAD_KINDS:
            pod = obj["spec"]["template"]["spec"]
            if not pod.get("securityContext", {}).get("runAsNonRoot"):
                problems.append(f"{name}: pod may run as root")
            for container in containers(obj):
                security = container.get("securityContext", {})
                if not security.get("readOnlyRootFilesystem") or security.get("allowPrivilegeEscalation", True):
                    problems.append(f"{name}/{container['name']}: writable root or privilege escalation")
                if not container.get("readinessProbe") or not container.get("livenessProbe"):
                    problems.append(f"{name}/{container['name']}: no readiness or liveness probe")
                is_triton = obj["metadata"]["labels"].get("app.kubernetes.io/component", "").startswith("triton-")
                if is_triton and "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {}):
                    problems.append(f"{name}: model group without an nvidia.com/gpu limit")
        if obj["kind"] == "NetworkPolicy":
            problems += _open_ingress(obj, name)
    return problems


def _open_ingress(policy: dict[str, Any], name: str) -> list[str]:
    """A rule open to every source must select dispatch alone (the front door)."""
    selected = policy["spec"]["podSelector"].get("matchLabels", {})
    open_rules = [rule for rule in policy["spec"].get("ingress", []) if not rule.get("from")]
    if open_rules and selected.get("app.kubernetes.io/component") != "dispatch":
        return [f"{name}: lets any source reach pods other than the front door"]
    return []


def triton_config_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Each ``*.config.pbtxt`` of the model-group ConfigMaps parses as Triton's ``ModelConfig``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    problems = []
    for obj in objects:
        if obj["kind"] != "ConfigMap" or not obj["metadata"]["name"].endswith("-models"):
            continue
        for key, text in obj.get("data", {}).items():
            try:
                if key.endswith(".config.pbtxt"):
                    config = text_format.Parse(text, model_config_pb2.ModelConfig())
                    if config.name != key.removesuffix(".config.pbtxt"):
                        problems.append(f"{obj['metadata']['name']}/{key}: names model {config.name!r}")
                elif key.endswith(".json"):
                    json.loads(text)
            except (text_format.ParseError, ValueError) as exc:
                problems.append(f"{obj['metadata']['name']}/{key}: {exc}")
    return problems


def check_value_set(path: Path, report: Report) -> list[dict[str, Any]]:
    """Renders one value set and checks every object; returns the objects."""
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        objects = render(values)
    except Exception as exc:  # the SDK's render and values errors share no narrower base
        report.fail(f"{path.name}: does not render: {exc}")
        return []
    bad = [f"{o.get('kind')}/{o.get('metadata', {}).get('name')}: {p}" for o in objects if (p := validate_object(o))]
    bad += policy_problems(objects) + triton_config_problems(objects)
    for problem in bad:
        report.fail(f"{path.name}: {problem}")
    if not bad:
        kinds = sorted({o["kind"] for o in objects})
        report.ok(f"{path.name}: {len(objects)} objects valid ({', '.join(kinds)})")
    return objects


def check_bad_values(report: Report) -> None:
    """Each file under ``values/bad`` must be refused by ``values.schema.json``."""
    import helm_python as helm

    files = sorted(BAD_VALUES.glob("*.yaml"))
    if not files:
        report.fail("no bad value files to check")
    with helm.Chart.load(str(CHART)) as chart:
        for path in files:
            try:
                chart.validate_schema(yaml.safe_load(path.read_text(encoding="utf-8")))
            except helm.HelmValuesError as exc:
                reason = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
                report.ok(f"bad/{path.name}: rejected ({reason[:120]})")
            else:
                report.fail(f"bad/{path.name}: accepted, but values.schema.json should reject it")


def check_rules(report: Report, rendered_rules: list[dict[str, Any]], promtool: str | None) -> None:
    """promtool on the rules file, its unit tests, and each rendered PrometheusRule's spec."""
    if promtool is None:
        report.fail("promtool not found (Debian: apt-get install prometheus)")
        return
    runs = [
        ("check rules", [promtool, "check", "rules", str(RULES)]),
        ("test rules", [promtool, "test", "rules", str(RULE_TESTS)]),
    ]
    with tempfile.TemporaryDirectory() as scratch:
        for index, rule in enumerate(rendered_rules):
            target = Path(scratch) / f"rendered-{index}.yaml"
            target.write_text(yaml.safe_dump(rule["spec"]), encoding="utf-8")
            runs.append((f"check rules (rendered PrometheusRule {index})", [promtool, "check", "rules", str(target)]))
        for label, command in runs:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
            if done.returncode == 0:
                report.ok(f"promtool {label}: ok")
            else:
                report.fail(f"promtool {label}: {(done.stdout + done.stderr).strip()[-800:]}")


def check_dashboard_copy(report: Report) -> None:
    """The chart ships a copy of the Grafana dashboard (Helm reads files inside the chart only)."""
    if DASHBOARD.read_bytes() == CHART_DASHBOARD.read_bytes():
        report.ok("grafana dashboard: the chart's copy matches deploy/grafana")
    else:
        report.fail(f"grafana dashboard: copy {DASHBOARD} to {CHART_DASHBOARD}")


def run(promtool: str | None) -> Report:
    """All the checks, in order; never stops at the first problem."""
    report = Report()
    lint_chart(report)
    rendered_rules: list[dict[str, Any]] = []
    for path in sorted(VALUE_SETS.glob("*.yaml")):
        objects = check_value_set(path, report)
        rendered_rules += [o for o in objects if o["kind"] == "PrometheusRule"]
    check_bad_values(report)
    check_rules(report, rendered_rules, promtool)
    check_dashboard_copy(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--promtool", default=shutil.which("promtool"), help="promtool binary (default: on PATH)")
    args = parser.parse_args(argv)
    report = run(args.promtool)
    for line in report.passed:
        print(f"ok    {line}")
    for line in report.problems:
        print(f"FAIL  {line}", file=sys.stderr)
    print(f"deploy-check: {len(report.passed)} passed, {len(report.problems)} failed")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
