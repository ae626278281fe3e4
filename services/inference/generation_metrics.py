"""The custom Prometheus metrics every generating Triton model reports (on Triton's metrics port).

Imported by the python-backend models inside Triton's stub process, which passes in its
``triton_python_backend_utils`` module (it exists only there).
"""

from __future__ import annotations

import threading
from typing import Any

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class GenerationMetrics:
    """In-flight gauge, generated-token counter and closed-generation counter of one model.

    Every accepted request calls :meth:`opened` once and :meth:`closed` once; both are thread-safe
    (the smollm2 model closes requests on worker threads, the replay model on the event loop).
    """

    def __init__(self, pb_utils: Any, model_name: str):
        self._pb_utils = pb_utils
        self._lock = threading.Lock()
        self.in_flight_count = 0
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

    def opened(self) -> None:
        """A request was accepted."""
        self._change_in_flight(+1)

    def closed(self, finish_reason: str) -> None:
        """A request was closed, for ``finish_reason`` (one of :data:`FINISH_REASONS`)."""
        self.generations[finish_reason].increment(1)
        self._change_in_flight(-1)

    def add_tokens(self, count: int) -> None:
        self.tokens.increment(count)

    def close_with_error(self, sender: Any, message: str, code: Any, tag: str) -> None:
        """Ends a request with ``TritonError(message, code)`` and the final flag, and counts it."""
        pb_utils = self._pb_utils
        try:
            sender.send(
                pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        except Exception as exc:
            pb_utils.Logger.log_warn(f"{tag}: could not send error {message!r}: {exc!r}")
        self.closed("error")

    def _change_in_flight(self, delta: int) -> None:
        with self._lock:
            self.in_flight_count += delta
            self.in_flight.set(self.in_flight_count)

    def close(self) -> None:
        """Drops the metric families (call from the model's ``finalize``)."""
        del self.in_flight, self.tokens, self.generations
        self._families = ()
