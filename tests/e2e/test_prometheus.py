"""A real Prometheus server scrapes the mesh (dispatch and Triton) and answers PromQL about what was sent.

Needs the ``prometheus`` binary on PATH (Debian: ``apt-get install -y --no-install-recommends prometheus``);
skipped without it. The mesh serves the replay model on a tiny recorded pool, so every number checked
here (calls, cost, tokens) is known in advance. The Grafana dashboard's expressions are run against the
same server, so a panel that names a metric nobody exports fails here.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from apps.mesh import Mesh, MeshPorts, port_in_use
from constellation.client import DispatchClient, ask_request
from constellation.errors import NotFound
from constellation.net import free_port
from tests.pool_fixtures import RECORDS, write_pool

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="no `prometheus` binary on PATH (Debian: apt-get install -y --no-install-recommends prometheus)",
)

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "constellation.json"
MODELS = ("cheap", "mid", "strong")
PROMPTS = ("Question 2: what is the number?", "Question 3: what is the number?")  # one per round
COST = {model: RECORDS[2]["responses"][model]["cost_usd"] for model in MODELS}  # same for both prompts
SCRAPE_S = 1
WAIT_S = 30.0
METRIC = re.compile(r"\b(?:constellation|nv)_[a-z0-9_]+\b")


class Prometheus:
    """One ``prometheus`` process on a loopback port, with its own config and storage under ``directory``."""

    def __init__(self, directory: Path, targets: dict[str, str]):
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "prometheus.log"
        self.config_path = directory / "prometheus.yml"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()
            ],
        }
        self.config_path.write_text(json.dumps(config, indent=2))  # YAML is a superset of JSON
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert PROMETHEUS is not None
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process is not None and self.process.poll() is None, f"prometheus exited:\n{self.log_tail()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, f"prometheus not ready after {timeout_s:.0f} s:\n{self.log_tail()}"
            time.sleep(0.1)

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; returns ``data`` and fails the test on an error status."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # bad PromQL answers 400 with the parser's message
            body = json.loads(exc.read())
        assert body["status"] == "success", f"{params}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> dict[str, float]:
        """An instant query: each series' value, keyed by its labels as ``k=v,k=v`` (sorted)."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return {
            ",".join(f"{k}={v}" for k, v in sorted(item["metric"].items())): float(item["value"][1])
            for item in data["result"]
        }

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


async def eventually(
    prometheus: Prometheus, expr: str, accept: Callable[[dict[str, float]], bool], timeout_s: float = WAIT_S
) -> dict[str, float]:
    """Re-runs ``expr`` until ``accept`` takes its result (scrapes land every second); fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await asyncio.to_thread(prometheus.query, expr)
        if accept(result):
            return result
        assert time.monotonic() < deadline, f"{expr} = {result} after {timeout_s:.0f} s"
        await asyncio.sleep(0.25)


def total(result: dict[str, float]) -> float:
    return sum(result.values())


async def ask_all(client: DispatchClient, prompt: str) -> None:
    """One Ask per pool model for ``prompt``, each read to its final event."""
    for model in MODELS:
        events = [event async for event in client.ask(ask_request(prompt, model=model), timeout_s=30)]
        assert events[-1].WhichOneof("event") == "final", events[-1]


def dashboard_queries() -> list[str]:
    """Every panel expression of the Grafana dashboard, with its variables set as Grafana would."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    return [e.replace("$__rate_interval", "1m").replace("$model", ".*") for e in exprs]


async def test_prometheus_scrapes_the_mesh_and_answers_promql(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "tiny.jsonl.gz")
    models_file = tmp_path / "models.json"
    models_file.write_text(
        json.dumps({m: {"triton_model": "replay", "parameters": {"recorded_model": m}} for m in MODELS})
    )
    ports = MeshPorts(free_port(), free_port(), free_port(), free_port(), free_port())
    mesh = Mesh(
        ports,
        models=["replay"],
        run_dir=tmp_path / "run",
        say=lambda _: None,
        model_parameters={"replay": {"pool_paths": str(pool), "time_scale": "0"}},
        dispatch_args=["--models-file", str(models_file)],
    )
    prometheus_dir = tmp_path / "prometheus"
    prometheus_dir.mkdir()
    prometheus = Prometheus(
        prometheus_dir,
        {"dispatch": f"127.0.0.1:{ports.dispatch_metrics}", "triton": f"127.0.0.1:{ports.triton_metrics}"},
    )
    try:
        await asyncio.to_thread(mesh.start, 120.0)
        prometheus.start()
        await asyncio.to_thread(prometheus.wait_ready)
        up = await eventually(
            prometheus, "sum by (job) (up)", lambda r: len(r) == 2 and all(v == 1 for v in r.values())
        )
        assert up == {"job=dispatch": 1.0, "job=triton": 1.0}

        ok_asks = 'sum(constellation_rpc_handled_total{method="Ask",code="OK"})'
        async with DispatchClient(mesh.dispatch_address) as client:
            # Two rounds with a scrape between them, so that rate() sees the counters grow.
            await ask_all(client, PROMPTS[0])
            with pytest.raises(NotFound):  # one failed Ask, for the error-ratio panel
                async for _event in client.ask(ask_request(PROMPTS[0], model="gpt-17"), timeout_s=30):
                    pass
            await eventually(prometheus, ok_asks, lambda r: total(r) == len(MODELS))
            await ask_all(client, PROMPTS[1])
        sent = 2 * len(MODELS)

        await eventually(prometheus, ok_asks, lambda r: total(r) == sent)
        rate = await eventually(
            prometheus, 'sum(rate(constellation_rpc_handled_total{method="Ask",code="OK"}[1m]))', lambda r: total(r) > 0
        )
        assert total(rate) > 0
        not_found = await eventually(
            prometheus, 'sum by (code) (constellation_rpc_handled_total{method="Ask",code!="OK"})', lambda r: bool(r)
        )
        assert not_found == {"code=NOT_FOUND": 1.0}

        ttft = await eventually(
            prometheus,
            "histogram_quantile(0.99, sum by (le, model) (constellation_model_time_to_first_token_seconds_bucket))",
            lambda r: len(r) == len(MODELS),
        )
        assert set(ttft) == {f"model={m}" for m in MODELS}
        assert all(0 < v <= 10 for v in ttft.values()), ttft  # the replay runs at time_scale 0: milliseconds
        ttft_rate = await asyncio.to_thread(
            prometheus.query,
            "histogram_quantile(0.5, sum by (le, model) "
            "(rate(constellation_model_time_to_first_token_seconds_bucket[1m])))",
        )
        assert set(ttft_rate) == set(ttft) and all(0 < v <= 10 for v in ttft_rate.values()), ttft_rate

        cost = await eventually(
            prometheus, "sum by (model) (constellation_cost_usd_total)", lambda r: len(r) >= len(MODELS)
        )
        for model in MODELS:  # each model answered both prompts at its recorded cost
            assert cost[f"model={model}"] == pytest.approx(2 * COST[model])
        calls = await asyncio.to_thread(prometheus.query, "sum by (model, outcome) (constellation_model_calls_total)")
        # A made-up model name (gpt-17) is counted under "other": callers cannot grow the series.
        assert calls == {**{f"model={m},outcome=ok": 2.0 for m in MODELS}, "model=other,outcome=not_found": 1.0}
        tokens = await asyncio.to_thread(prometheus.query, "sum by (direction) (constellation_tokens_total)")
        assert tokens == {"direction=input": 20.0 * sent, "direction=output": 10.0 * sent}

        # Triton's own counters, scraped from its metrics port, agree with dispatch's.
        triton_ok = await eventually(
            prometheus, 'sum(nv_inference_request_success{model="replay"})', lambda r: total(r) == sent
        )
        assert total(triton_ok) == sent
        stops = await eventually(
            prometheus,
            'sum(constellation_generations_total{job="triton",model="replay",finish_reason="stop"})',
            lambda r: total(r) == sent,
        )
        assert total(stops) == sent
        in_flight = await asyncio.to_thread(prometheus.query, 'constellation_generations_in_flight{model="replay"}')
        assert list(in_flight.values()) == [0.0]

        # The Grafana dashboard: every metric it names is known to this Prometheus, every expression parses
        # and returns series.
        known = set(await asyncio.to_thread(prometheus.api, "label/__name__/values"))
        queries = dashboard_queries()
        named = {name for expr in queries for name in METRIC.findall(expr)}
        assert named <= known, f"dashboard metrics nobody exports: {sorted(named - known)}"
        for expr in queries:  # rate() needs two samples of a series: a fresh one may need another scrape
            await eventually(prometheus, expr, bool, timeout_s=10)
    finally:
        prometheus.stop()
        await asyncio.to_thread(mesh.stop)
    assert prometheus.process is not None and prometheus.process.poll() is not None
    assert not port_in_use(prometheus.port), f"port {prometheus.port} still bound after prometheus stopped"
    ours = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(str(prometheus_dir) in arg for arg in (p.info["cmdline"] or []))
    ]
    assert ours == [], f"prometheus processes left: {ours}"
    assert mesh.leftovers() == []
