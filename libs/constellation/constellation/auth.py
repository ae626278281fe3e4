"""API keys, roles, and the two edges that turn credentials into a :class:`Principal`.

A key looks like ``ck_<id>_<secret>``: the id (12 hex characters) finds the stored row, the secret
(32 random bytes, URL-safe base64) proves possession. Only ``sha256(salt || secret)`` and the salt are
stored. A salted fast hash, not a slow KDF and not an HMAC with a server pepper: the secret is 256 random
bits, so guessing it from a stolen digest is hopeless however fast the hash is, and a fast hash keeps
verification to microseconds on every call; a pepper would add a second secret every verifying service
must be given and rotated, for no gain against random secrets. The per-key salt makes equal digests
impossible across keys and rules out precomputed tables.

Roles: ``tenant`` (Ask, Plan, the HTTP API), ``admin`` (the registry's writes and key management, and
everything a tenant or a service may call), ``service`` (calls between the mesh's own services).
:data:`METHOD_ROLES` lists every RPC; a method not listed needs ``admin`` (deny by default); health and
reflection stay open so probes and grpcurl work without keys.

:class:`AuthInterceptor` (gRPC, ``authorization: Bearer <key>`` metadata) and :func:`http_middleware`
(aiohttp, ``Authorization: Bearer <key>``) answer UNAUTHENTICATED for no or unknown keys and
PERMISSION_DENIED for a role that may not make the call, both with ``ErrorInfo``; an accepted call runs
with its principal in :func:`current_principal`.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from inspect import isasyncgenfunction
from pathlib import Path
from typing import Any, Protocol

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware

from constellation.errors import ConstellationError, PermissionDenied, Unauthenticated, abort


class Role(StrEnum):
    """What a key may do."""

    TENANT = "tenant"
    ADMIN = "admin"
    SERVICE = "service"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, its tenant (budgets and metrics are kept per tenant) and its role."""

    key_id: str
    tenant: str
    role: Role


@dataclass(frozen=True)
class StoredKey:
    """One row of the key table (see ``services/registry/store.py``)."""

    key_id: str
    tenant: str
    role: Role
    salt: bytes
    digest: bytes
    created_at: float
    revoked_at: float | None = None


KEY_PREFIX = "ck"
BEARER = "bearer "
_TENANT_CALLS = frozenset({Role.TENANT, Role.ADMIN})
_SERVICE_CALLS = frozenset({Role.SERVICE, Role.ADMIN})
_ADMIN_CALLS = frozenset({Role.ADMIN})

METHOD_ROLES: dict[str, frozenset[Role]] = {
    "/constellation.v1.DispatchService/Ask": _TENANT_CALLS,
    "/constellation.v1.DispatchService/Plan": _TENANT_CALLS,
    "/constellation.v1.RegistryService/RegisterModel": _ADMIN_CALLS,
    "/constellation.v1.RegistryService/DeregisterModel": _ADMIN_CALLS,
    "/constellation.v1.RegistryService/CreateKey": _ADMIN_CALLS,
    "/constellation.v1.RegistryService/ListKeys": _ADMIN_CALLS,
    "/constellation.v1.RegistryService/RevokeKey": _ADMIN_CALLS,
    "/constellation.v1.RegistryService/GetModel": _SERVICE_CALLS,
    "/constellation.v1.RegistryService/ListModels": _SERVICE_CALLS,
    "/constellation.v1.RegistryService/WatchModels": _SERVICE_CALLS,
    "/constellation.v1.RegistryService/ReportOutcome": _SERVICE_CALLS,
    "/constellation.v1.RegistryService/ReportModelState": _SERVICE_CALLS,
    "/constellation.v1.ClassifierService/Classify": _SERVICE_CALLS,
    "/constellation.v1.ClassifierService/ClassifyBatch": _SERVICE_CALLS,
    "/constellation.v1.RankingService/Rank": _SERVICE_CALLS,
    "/constellation.v1.FusionService/Fuse": _SERVICE_CALLS,
    "/constellation.v1.ScalerService/GetStatus": _SERVICE_CALLS,
    "/constellation.v1.ScalerService/RecordArrivals": _SERVICE_CALLS,
    "/constellation.v1.ScalerService/EnsureReady": _SERVICE_CALLS,
    "/constellation.v1.ScalerService/SetDryRun": _ADMIN_CALLS,
}
"""Roles allowed per RPC. ``admin`` may make every call."""
HTTP_ROLES = _TENANT_CALLS
"""Roles allowed on the OpenAI-compatible HTTP API."""
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("constellation_principal", default=None)


def current_principal() -> Principal | None:
    """The principal of the call being served, or None when the server does not authenticate."""
    return _CURRENT.get()


def current_tenant(default: str = "default") -> str:
    """The calling tenant, or ``default`` when the call was not authenticated (auth off)."""
    principal = _CURRENT.get()
    return default if principal is None else principal.tenant


def hash_secret(secret: str, salt: bytes) -> bytes:
    """``sha256(salt || secret)``: what the key table stores (see the module doc for why)."""
    return hashlib.sha256(salt + secret.encode()).digest()


def new_key(tenant: str, role: Role) -> tuple[str, StoredKey]:
    """A fresh key: the full key (shown once, never stored) and the row to store."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    row = StoredKey(key_id, tenant, role, salt, hash_secret(secret, salt), time.time())
    return f"{KEY_PREFIX}_{key_id}_{secret}", row


def split_key(key: str) -> tuple[str, str]:
    """``(key id, secret)`` of a full key. Raises Unauthenticated when it is not a key at all."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        raise Unauthenticated("the credentials are not a Constellation API key", reason="MALFORMED_KEY")
    return parts[1], parts[2]


def bearer_token(value: str | None) -> str | None:
    """The key in an ``authorization`` value (``Bearer <key>``), or None when there is none."""
    if not value or not value.lower().startswith(BEARER):
        return None
    return value[len(BEARER) :].strip() or None


class KeyLookup(Protocol):
    """Finds a stored key by id (None when unknown)."""

    def key(self, key_id: str) -> StoredKey | None: ...


class SqliteKeys:
    """The key table of the registry's SQLite file, read-only, for services other than the registry.

    Opened per lookup (a few hundred microseconds); :class:`Authenticator` caches what it reads.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)

    def key(self, key_id: str) -> StoredKey | None:
        if not Path(self.path).is_file():
            return None
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as db:
            try:
                row = db.execute(
                    "SELECT key_id, tenant, role, salt, digest, created_at, revoked_at FROM api_keys WHERE key_id = ?",
                    (key_id,),
                ).fetchone()
            except sqlite3.OperationalError:  # no key table yet: no keys
                return None
        return None if row is None else row_to_key(row)

    def tenants(self) -> set[str]:
        """The tenants of the keys not revoked (empty when there is no table yet)."""
        if not Path(self.path).is_file():
            return set()
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as db:
            try:
                rows = db.execute("SELECT DISTINCT tenant FROM api_keys WHERE revoked_at IS NULL").fetchall()
            except sqlite3.OperationalError:
                return set()
        return {str(row[0]) for row in rows}


def keys_db_path(configured: str) -> str:
    """The key table's file: ``configured``, else the registry's default SQLite file."""
    from constellation.paths import default_cache_dir

    return configured or str(default_cache_dir() / "registry.sqlite")


def row_to_key(row: tuple[Any, ...]) -> StoredKey:
    """A key-table row ``(key_id, tenant, role, salt, digest, created_at, revoked_at)`` as a StoredKey."""
    return StoredKey(str(row[0]), str(row[1]), Role(row[2]), bytes(row[3]), bytes(row[4]), float(row[5]), row[6])


class Authenticator:
    """Turns a presented key into a :class:`Principal`.

    Rows are cached for ``cache_s`` seconds, so a revoked key stops working within that time.

    Args:
        lookup: Where stored keys are read.
        cache_s: Seconds a looked-up row (or its absence) is reused.
    """

    def __init__(self, lookup: KeyLookup, *, cache_s: float = 5.0) -> None:
        self.lookup = lookup
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, StoredKey | None]] = {}

    def _row(self, key_id: str) -> StoredKey | None:
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        row = self.lookup.key(key_id)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key_id] = (now, row)
        return row

    def authenticate(self, key: str | None) -> Principal:
        """The principal of ``key``. Raises Unauthenticated for no, malformed, unknown or revoked keys."""
        if key is None:
            raise Unauthenticated("this call needs an API key: send 'authorization: Bearer <key>'", reason="NO_KEY")
        key_id, secret = split_key(key)
        row = self._row(key_id)
        if row is None or not hmac.compare_digest(row.digest, hash_secret(secret, row.salt)):
            raise Unauthenticated("the API key is not known", reason="UNKNOWN_KEY")
        if row.revoked_at is not None:
            raise Unauthenticated("the API key was revoked", reason="REVOKED_KEY")
        return Principal(row.key_id, row.tenant, row.role)


def authorize(principal: Principal, allowed: frozenset[Role], what: str) -> None:
    """Raises PermissionDenied unless ``principal``'s role is in ``allowed``."""
    if principal.role not in allowed:
        raise PermissionDenied(
            f"a {principal.role} key may not call {what}",
            reason="ROLE_NOT_ALLOWED",
            metadata={"role": str(principal.role), "allowed": ",".join(sorted(allowed))},
        )


def roles_for(method: str) -> frozenset[Role] | None:
    """The roles that may call ``method`` (a full ``/package.Service/Method``); None: open to anyone."""
    if method.startswith(PUBLIC_PREFIXES):
        return None
    return METHOD_ROLES.get(method, _ADMIN_CALLS)


def _metadata_key(metadata: Any) -> str | None:
    for name, value in metadata or ():
        if name == "authorization":
            return bearer_token(value if isinstance(value, str) else value.decode())
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call's key and role before its handler runs (see the module doc).

    Args:
        authenticator: Verifies keys.
        service: The service name put in the errors' ``ErrorInfo``.
    """

    def __init__(self, authenticator: Authenticator, service: str = "") -> None:
        self.authenticator = authenticator
        self.service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        allowed = roles_for(method)
        if handler is None or allowed is None:
            return handler
        try:
            principal = self.authenticator.authenticate(_metadata_key(handler_call_details.invocation_metadata))
            authorize(principal, allowed, method)
        except ConstellationError as error:
            return _replace_behavior(handler, _rejecting(error, self.service, handler.response_streaming))
        return _replace_behavior(handler, _with_principal(_behavior(handler), principal))


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream  # type: ignore[no-any-return]
    )


def _rejecting(error: ConstellationError, service: str, streaming: bool) -> Callable[..., Any]:
    """A behavior that ends the call with ``error``; an async generator for streams (what the
    interceptors around it iterate)."""
    if streaming:

        async def reject_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await abort(context, error, service=service)
            yield  # pragma: no cover - abort raises

        return reject_stream

    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        await abort(context, error, service=service)

    return reject


def _with_principal(behavior: Callable[..., Any], principal: Principal) -> Callable[..., Any]:
    """``behavior`` run with ``principal`` as :func:`current_principal`."""
    if isasyncgenfunction(behavior):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            _CURRENT.set(principal)  # the call's own task: nothing to restore
            async for message in behavior(request, context):
                yield message

        return streaming

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _CURRENT.set(principal)
        return await behavior(request, context)

    return unary


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _replace_behavior(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(  # type: ignore[operator,no-any-return]
        behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


ErrorResponse = Callable[[ConstellationError], web.StreamResponse]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_middleware(
    authenticator: Authenticator, on_error: ErrorResponse, allowed: frozenset[Role] = HTTP_ROLES
) -> Middleware:
    """An aiohttp middleware: ``Authorization: Bearer <key>`` of a role in ``allowed``, or ``on_error``'s reply.

    Args:
        authenticator: Verifies keys.
        on_error: Renders UNAUTHENTICATED / PERMISSION_DENIED in the API's error shape.
        allowed: Roles that may use the routes.
    """

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            principal = authenticator.authenticate(bearer_token(request.headers.get("Authorization")))
            authorize(principal, allowed, f"{request.method} {request.path}")
        except ConstellationError as error:
            return on_error(error)
        _CURRENT.set(principal)  # the request's own task
        return await handler(request)

    return authenticate


def bearer_metadata(key: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata that presents ``key``."""
    return (("authorization", f"Bearer {key}"),)


class _BearerBase:
    def __init__(self, key: str) -> None:
        self.metadata = bearer_metadata(key)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*self.metadata)
        for name, value in details.metadata or ():
            metadata.add(name, value)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _BearerUnary(_BearerBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _BearerStream(_BearerBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


def bearer_interceptors(key: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send ``authorization: Bearer <key>`` on every unary and server-stream call."""
    return [_BearerUnary(key), _BearerStream(key)]
