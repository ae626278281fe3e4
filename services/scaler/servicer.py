"""The scaler over gRPC: ``constellation.v1.ScalerService`` and KEDA's ``externalscaler.ExternalScaler``.

Both are thin mappings onto :class:`~services.scaler.scaler.Scaler` and its
:class:`~services.scaler.actuators.TargetBoard`.

KEDA's side: a ScaledObject names the model in its trigger metadata (``model: <name>``; without it, the
ScaledObject's own name is taken as the model). ``GetMetricSpec`` asks for a target of 1 per replica and
``GetMetrics`` returns the target replicas, so the HPA's ``ceil(value / target)`` is exactly our target;
``IsActive`` is true while the target is above zero (KEDA scales the Deployment to and from zero on it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from constellation.errors import ConstellationError, InvalidArgument, abort
from constellation.keda import externalscaler_pb2, externalscaler_pb2_grpc
from constellation.v1 import scaler_pb2, scaler_pb2_grpc
from services.scaler.actuators import TargetBoard
from services.scaler.policy import Action, Decision
from services.scaler.scaler import Scaler

log = logging.getLogger(__name__)

SERVICE_NAME = scaler_pb2.DESCRIPTOR.services_by_name["ScalerService"].full_name
EXTERNAL_SCALER_NAME = externalscaler_pb2.DESCRIPTOR.services_by_name["ExternalScaler"].full_name

ACTIONS: dict[Action, scaler_pb2.ScalingAction.ValueType] = {
    "hold": scaler_pb2.SCALING_ACTION_HOLD,
    "scale_up": scaler_pb2.SCALING_ACTION_SCALE_UP,
    "scale_down": scaler_pb2.SCALING_ACTION_SCALE_DOWN,
    "scale_to_zero": scaler_pb2.SCALING_ACTION_SCALE_TO_ZERO,
    "scale_from_zero": scaler_pb2.SCALING_ACTION_SCALE_FROM_ZERO,
}


def decision_message(decision: Decision, applied: bool, wall_offset_s: float) -> scaler_pb2.ScalingDecision:
    """``decision`` as protobuf; ``wall_offset_s`` turns its monotonic time into wall-clock time."""
    decided_at = Timestamp()
    decided_at.FromNanoseconds(int((decision.at + wall_offset_s) * 1e9))
    return scaler_pb2.ScalingDecision(
        model=decision.model,
        current_replicas=decision.current,
        target_replicas=decision.target,
        raw_replicas=decision.raw,
        action=ACTIONS[decision.action],
        reason=decision.reason,
        arrival_rate_per_s=decision.rate_per_s,
        latency_ms=decision.latency_s * 1000.0,
        decided_at=decided_at,
        applied=applied,
    )


class ScalerServicer(scaler_pb2_grpc.ScalerServiceServicer):
    """ScalerService over one :class:`Scaler`.

    Args:
        scaler: The control loop.
        wall_offset_s: ``time.time() - clock()`` for the scaler's clock, to stamp decisions.
    """

    def __init__(self, scaler: Scaler, wall_offset_s: float) -> None:
        self.scaler = scaler
        self.wall_offset_s = wall_offset_s

    async def GetStatus(
        self, request: scaler_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> scaler_pb2.GetStatusResponse:
        response = scaler_pb2.GetStatusResponse(
            dry_run=self.scaler.dry_run, actuator=self.scaler.actuator.name, interval_s=self.scaler.interval_s
        )
        for name, capacity in sorted(self.scaler.capacity.items()):
            item = response.models.add(
                model=name,
                tier=self.scaler.policy.tier_of(name),
                replicas=capacity.replicas,
                target_replicas=capacity.target,
                idle_s=self.scaler.policy.idle_s(name),
            )
            if capacity.last is not None:
                item.last_decision.CopyFrom(decision_message(capacity.last, capacity.applied, self.wall_offset_s))
        return response

    async def SetDryRun(
        self, request: scaler_pb2.SetDryRunRequest, context: grpc.aio.ServicerContext
    ) -> scaler_pb2.SetDryRunResponse:
        if self.scaler.dry_run != request.dry_run:
            log.info("scaler: dry-run %s", "on" if request.dry_run else "off")
        self.scaler.dry_run = request.dry_run
        return scaler_pb2.SetDryRunResponse(dry_run=self.scaler.dry_run)

    async def RecordArrivals(
        self, request: scaler_pb2.RecordArrivalsRequest, context: grpc.aio.ServicerContext
    ) -> scaler_pb2.RecordArrivalsResponse:
        if any(not arrival.model for arrival in request.arrivals):
            await abort(context, InvalidArgument("every arrival needs a model name"), service=SERVICE_NAME)
        recorded = 0
        for arrival in request.arrivals:
            count = max(1, arrival.count)
            self.scaler.record_arrivals(arrival.model, count)
            recorded += count
        return scaler_pb2.RecordArrivalsResponse(recorded=recorded)

    async def EnsureReady(
        self, request: scaler_pb2.EnsureReadyRequest, context: grpc.aio.ServicerContext
    ) -> scaler_pb2.EnsureReadyResponse:
        try:
            if not request.model:
                raise InvalidArgument("model is required")
            ready = await self.scaler.ensure_ready(request.model)
        except ConstellationError as error:
            await abort(context, error, service=SERVICE_NAME)
        return scaler_pb2.EnsureReadyResponse(
            replicas=ready.replicas, cold_start=ready.cold_start, waited_s=ready.waited_s
        )


class ExternalScalerServicer(externalscaler_pb2_grpc.ExternalScalerServicer):
    """KEDA's external scaler over the published targets.

    Args:
        board: Targets per model (published by the KEDA actuator).
        metric_prefix: Metric names are ``<prefix><model>``.
    """

    def __init__(self, board: TargetBoard, metric_prefix: str = "constellation-replicas-") -> None:
        self.board = board
        self.metric_prefix = metric_prefix

    @staticmethod
    def model_of(ref: externalscaler_pb2.ScaledObjectRef) -> str:
        """The model a ScaledObject follows: its ``model`` metadata, else its name."""
        return ref.scalerMetadata.get("model") or ref.name

    def _target(self, ref: externalscaler_pb2.ScaledObjectRef) -> int:
        return self.board.get(self.model_of(ref)) or 0

    async def IsActive(
        self, request: externalscaler_pb2.ScaledObjectRef, context: grpc.aio.ServicerContext
    ) -> externalscaler_pb2.IsActiveResponse:
        return externalscaler_pb2.IsActiveResponse(result=self._target(request) > 0)

    async def StreamIsActive(
        self, request: externalscaler_pb2.ScaledObjectRef, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[externalscaler_pb2.IsActiveResponse]:
        """Sends the current activity at once, then each change of it, until KEDA closes the stream."""
        version = self.board.version
        active = self._target(request) > 0
        yield externalscaler_pb2.IsActiveResponse(result=active)
        while True:
            version = await self.board.changed(version)
            now = self._target(request) > 0
            if now != active:
                active = now
                yield externalscaler_pb2.IsActiveResponse(result=active)

    async def GetMetricSpec(
        self, request: externalscaler_pb2.ScaledObjectRef, context: grpc.aio.ServicerContext
    ) -> externalscaler_pb2.GetMetricSpecResponse:
        spec = externalscaler_pb2.MetricSpec(
            metricName=self.metric_prefix + self.model_of(request), targetSize=1, targetSizeFloat=1.0
        )
        return externalscaler_pb2.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(
        self, request: externalscaler_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> externalscaler_pb2.GetMetricsResponse:
        target = self._target(request.scaledObjectRef)
        name = request.metricName or self.metric_prefix + self.model_of(request.scaledObjectRef)
        value = externalscaler_pb2.MetricValue(metricName=name, metricValue=target, metricValueFloat=float(target))
        return externalscaler_pb2.GetMetricsResponse(metricValues=[value])
