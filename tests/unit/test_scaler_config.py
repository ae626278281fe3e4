"""The scaler's typed configuration: tiers, model tiers and per-model knobs from TOML, defaults elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from constellation.config import load_config
from constellation.errors import InvalidArgument
from services.scaler.config import ScalerConfig
from services.scaler.policy import Knobs, ScalingPolicy
from services.scaler.sources import ArrivalWindow, FixedLatency

TOML = """
[scaler]
actuator = "keda"
models = ["smollm2", "replay"]
[scaler.tiers.hot]
min_replicas = 1
max_replicas = 3
[scaler.model_tiers]
smollm2 = "hot"
[scaler.model_knobs.replay]
concurrency = 8
"""


def test_tiers_and_model_knobs_reach_the_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "constellation.toml"
    path.write_text(TOML, encoding="utf-8")
    monkeypatch.setenv("CONSTELLATION_SCALER_DRY_RUN", "true")
    config = load_config(ScalerConfig, path)
    assert (config.actuator, config.models, config.dry_run, config.port) == ("keda", ["smollm2", "replay"], True, 50056)
    policy = ScalingPolicy(
        demand=ArrivalWindow(lambda: 0.0),
        latency=FixedLatency({}),
        clock=lambda: 0.0,
        tiers=config.tiers,
        model_tiers=config.model_tiers,
        model_knobs=config.model_knobs,
    )
    assert policy.knobs_for("smollm2") == Knobs(min_replicas=1, max_replicas=3)
    assert policy.knobs_for("replay") == Knobs(concurrency=8)
    assert policy.knobs_for("other") == Knobs()


def test_a_bad_knob_names_its_field(tmp_path: Path) -> None:
    path = tmp_path / "constellation.toml"
    path.write_text("[scaler.tiers.hot]\nhysteresis = 1.5\n", encoding="utf-8")
    with pytest.raises(InvalidArgument, match="hysteresis"):
        load_config(ScalerConfig, path)
