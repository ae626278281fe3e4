"""``constellation scaler status`` and ``dry-run`` against a real scaler server on port 0."""

from __future__ import annotations

import asyncio
import json

import pytest

from apps import cli
from services.scaler.config import ScalerConfig
from services.scaler.main import SERVICE, running_scaler
from services.scaler.policy import Knobs


async def test_status_shows_each_model_with_the_reason_of_its_decision(capsys: pytest.CaptureFixture[str]) -> None:
    knobs = Knobs(concurrency=1, max_replicas=5, window_s=10, default_latency_s=2.0, up_cooldown_s=0)
    config = ScalerConfig(port=0, metrics_port=-1, actuator="keda", models=["llama"], model_knobs={"llama": knobs})
    async with running_scaler(config, loop=False) as running:
        running.scaler.record_arrivals("llama", 20)
        await running.scaler.tick()
        address = f"127.0.0.1:{running.port}"
        assert await asyncio.to_thread(cli.main, ["scaler", "status", "--address", address]) == 0
        table = capsys.readouterr().out
        assert "actuator keda" in table
        [row] = [line for line in table.splitlines() if line.startswith("llama")]
        assert "scale_up" in row and "4 in flight" in row
        assert await asyncio.to_thread(cli.main, ["scaler", "dry-run", "on", "--address", address]) == 0
        assert capsys.readouterr().out.strip() == "dry-run on"
        assert await asyncio.to_thread(cli.main, ["scaler", "status", "--json", "--address", address]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["dryRun"] is True and status["models"][0]["targetReplicas"] == 4


def test_the_service_main_takes_the_scaler_flags() -> None:
    config = SERVICE.load(["--port", "0", "--actuator", "keda", "--model", "a", "--model", "b", "--dry-run"])
    assert (config.port, config.actuator, config.models, config.dry_run) == (0, "keda", ["a", "b"], True)
    assert SERVICE.load([]).dry_run is False
