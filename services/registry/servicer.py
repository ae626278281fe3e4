"""RegistryService over gRPC: maps protobuf requests to :class:`~services.registry.registry.Registry` and back."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from prometheus_client import Counter, Gauge

from constellation.errors import ConstellationError, FieldViolation, InternalError, InvalidArgument, abort
from constellation.metrics import REGISTRY
from constellation.v1 import registry_pb2, registry_pb2_grpc
from services.registry.config import RegistryConfig
from services.registry.registry import Registry

log = logging.getLogger(__name__)

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name

OUTCOMES = Counter(
    "constellation_registry_outcomes_total",
    "Reported model-call outcomes, by whether they were accepted.",
    ["accepted"],
    registry=REGISTRY,
)
WATCHERS = Gauge("constellation_registry_watchers", "Open WatchModels streams.", registry=REGISTRY)
WATCHERS_DROPPED = Counter(
    "constellation_registry_watchers_dropped_total",
    "WatchModels streams ended with RESOURCE_EXHAUSTED because they fell behind.",
    registry=REGISTRY,
)


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """Thin gRPC layer over :class:`Registry`; domain errors end the call with a rich status.

    All handlers run on the server's event loop and finish without waiting on I/O except WatchModels,
    which streams until the client cancels or falls behind.
    """

    def __init__(self, registry: Registry, config: RegistryConfig):
        self.registry = registry
        self.config = config

    async def RegisterModel(
        self, request: registry_pb2.RegisterModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisterModelResponse:
        try:
            if not request.HasField("model"):
                raise InvalidArgument("a model record is required", [FieldViolation("model", "is required")])
            record, _added = self.registry.register(request.model)
        except ConstellationError as error:
            await abort(context, error, service="registry")
        except Exception as exc:
            log.exception("RegisterModel failed")
            await abort(context, InternalError(f"registration failed: {exc!r}"), service="registry")
        return registry_pb2.RegisterModelResponse(model=record)

    async def DeregisterModel(
        self, request: registry_pb2.DeregisterModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeregisterModelResponse:
        try:
            self.registry.deregister(request.name)
        except ConstellationError as error:
            await abort(context, error, service="registry")
        return registry_pb2.DeregisterModelResponse()

    async def GetModel(
        self, request: registry_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.GetModelResponse:
        try:
            record = self.registry.get(request.name)
        except ConstellationError as error:
            await abort(context, error, service="registry")
        return registry_pb2.GetModelResponse(model=record)

    async def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListModelsResponse:
        return registry_pb2.ListModelsResponse(
            models=self.registry.list(request.state, list(request.required_capabilities))
        )

    async def WatchModels(
        self, request: registry_pb2.WatchModelsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.WatchModelsResponse]:
        WATCHERS.inc()
        try:
            with self.registry.watch() as (snapshot, watcher):
                for record in snapshot:
                    yield registry_pb2.WatchModelsResponse(
                        change=registry_pb2.WatchModelsResponse.CHANGE_SNAPSHOT, model=record
                    )
                yield registry_pb2.WatchModelsResponse(change=registry_pb2.WatchModelsResponse.CHANGE_SNAPSHOT_END)
                while True:
                    try:
                        change, record = await watcher.next()
                    except ConstellationError as error:
                        WATCHERS_DROPPED.inc()
                        await abort(context, error, service="registry")
                    yield registry_pb2.WatchModelsResponse(change=change, model=record)  # type: ignore[arg-type]
        finally:
            WATCHERS.dec()

    async def ReportOutcome(
        self, request: registry_pb2.ReportOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ReportOutcomeResponse:
        count = len(request.outcomes)
        try:
            if count > self.config.max_outcomes:
                raise InvalidArgument(
                    f"a batch may hold at most {self.config.max_outcomes} outcomes",
                    [FieldViolation("outcomes", f"holds {count}; the limit is {self.config.max_outcomes}")],
                    reason="BATCH_TOO_LARGE",
                )
            accepted = self.registry.report(request.outcomes)
        except ConstellationError as error:
            await abort(context, error, service="registry")
        except Exception as exc:
            log.exception("ReportOutcome failed")
            await abort(context, InternalError(f"recording outcomes failed: {exc!r}"), service="registry")
        OUTCOMES.labels("true").inc(accepted)
        OUTCOMES.labels("false").inc(count - accepted)
        return registry_pb2.ReportOutcomeResponse(accepted=accepted)

    async def ReportModelState(
        self, request: registry_pb2.ReportModelStateRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ReportModelStateResponse:
        try:
            records = self.registry.set_state(
                request.model, request.state, load_time_ms=request.load_time_ms, replicas=request.replicas
            )
        except ConstellationError as error:
            await abort(context, error, service="registry")
        return registry_pb2.ReportModelStateResponse(models=records)
