"""The custom Prometheus metrics every generating Triton model reports (on Triton's metrics port).

Imported by the python-backend models inside Triton's stub process, which passes in its
``triton_python_backend_utils`` module (it exists only there).
"""

from __future__ import annotations

from typing import Any

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class GenerationMetrics:
    """In-flight gauge, generated-token counter and closed-generation counter of one model.

    Attributes:
        in_flight: Gauge of requests accepted and not yet closed.
        tokens: Counter of tokens produced.
        generations: Counter per finish reason.
    """

    def __init__(self, pb_utils: Any, model_name: str):
        self._families: tuple[Any, ...] = (
            pb_utils.MetricFamily(
                name="constellation_generations_in_flight",
                description="Generation requests accepted and not yet closed (queued or generating)",
                kind=pb_utils.MetricFamily.GAUGE,
            ),
            pb_utils.MetricFamily(
                name="constellation_generated_tokens_total",
                description="Tokens sampled by the generation loop",
                kind=pb_utils.MetricFamily.COUNTER,
            ),
            pb_utils.MetricFamily(
                name="constellation_generations_total",
                description="Generation requests closed, by finish reason",
                kind=pb_utils.MetricFamily.COUNTER,
            ),
        )
        in_flight, tokens, generations = self._families
        labels = {"model": model_name}
        self.in_flight = in_flight.Metric(labels=labels)
        self.tokens = tokens.Metric(labels=labels)
        self.generations = {
            reason: generations.Metric(labels={**labels, "finish_reason": reason}) for reason in FINISH_REASONS
        }

    def close(self) -> None:
        """Drops the metric families (call from the model's ``finalize``)."""
        del self.in_flight, self.tokens, self.generations
        self._families = ()
