"""Reads the SmolLM2 model's own Prometheus metrics from Triton's metrics port."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from services.inference.launcher import TritonServer

MODEL = "smollm2"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(triton: TritonServer) -> Samples:
    """Every ``constellation_*`` sample on Triton's /metrics, keyed by name and sorted labels."""
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("constellation_"):
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def in_flight(m: Samples, model: str = MODEL) -> float:
    return m[("constellation_generations_in_flight", (("model", model),))]


def tokens(m: Samples, model: str = MODEL) -> float:
    return m[("constellation_generated_tokens_total", (("model", model),))]


def generations(m: Samples, reason: str, model: str = MODEL) -> float:
    return m.get(("constellation_generations_total", (("finish_reason", reason), ("model", model))), 0.0)
