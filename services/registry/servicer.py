"""RegistryService over gRPC: maps protobuf requests to :class:`~services.registry.registry.Registry` and back."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf import timestamp_pb2
from prometheus_client import Counter, Gauge

from constellation import auth
from constellation.errors import (
    ConstellationError,
    FieldViolation,
    InternalError,
    InvalidArgument,
    NotFound,
    abort,
)
from constellation.metrics import REGISTRY
from constellation.v1 import registry_pb2, registry_pb2_grpc
from services.registry.config import RegistryConfig
from services.registry.registry import Registry
from services.registry.store import ModelStore

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


_ROLES = {
    registry_pb2.KEY_ROLE_TENANT: auth.Role.TENANT,
    registry_pb2.KEY_ROLE_ADMIN: auth.Role.ADMIN,
    registry_pb2.KEY_ROLE_SERVICE: auth.Role.SERVICE,
}
_ROLE_VALUES = {role: value for value, role in _ROLES.items()}


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def key_info(key: auth.StoredKey) -> registry_pb2.KeyInfo:
    """A stored key as the API shows it (no salt, no digest)."""
    info = registry_pb2.KeyInfo(
        key_id=key.key_id, tenant=key.tenant, role=_ROLE_VALUES[key.role], created_at=_timestamp(key.created_at)
    )
    if key.revoked_at is not None:
        info.revoked_at.CopyFrom(_timestamp(key.revoked_at))
    return info


def create_key(store: ModelStore, tenant: str, role: registry_pb2.KeyRole.ValueType) -> tuple[str, auth.StoredKey]:
    """Makes and stores a key for ``tenant``; returns the full key (shown once) and its row.

    Raises:
        InvalidArgument: no tenant, or no role.
    """
    violations = []
    if not tenant.strip():
        violations.append(FieldViolation("tenant", "is required"))
    if role not in _ROLES:
        violations.append(FieldViolation("role", "must be KEY_ROLE_TENANT, KEY_ROLE_ADMIN or KEY_ROLE_SERVICE"))
    if violations:
        raise InvalidArgument("a key needs a tenant and a role", violations)
    full, row = auth.new_key(tenant.strip(), _ROLES[role])
    store.add_key(row)
    return full, row


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

    async def CreateKey(
        self, request: registry_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.CreateKeyResponse:
        try:
            full, row = create_key(self.registry.store, request.tenant, request.role)
        except ConstellationError as error:
            await abort(context, error, service="registry")
        log.info("registry: created %s key %s for tenant %s", row.role, row.key_id, row.tenant)
        return registry_pb2.CreateKeyResponse(key=full, info=key_info(row))

    async def ListKeys(
        self, request: registry_pb2.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListKeysResponse:
        return registry_pb2.ListKeysResponse(keys=[key_info(k) for k in self.registry.store.keys()])

    async def RevokeKey(
        self, request: registry_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RevokeKeyResponse:
        row = self.registry.store.revoke_key(request.key_id)
        if row is None:
            await abort(context, NotFound(f"no key {request.key_id!r}", reason="KEY_NOT_FOUND"), service="registry")
        log.info("registry: revoked key %s", request.key_id)
        return registry_pb2.RevokeKeyResponse(info=key_info(row))

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
