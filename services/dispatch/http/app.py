"""The OpenAI-compatible HTTP API of dispatch, served on dispatch's own event loop (no extra hop).

Routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``"stream": true``: ``data:
{chunk}`` lines, then ``data: [DONE]``) and ``GET /v1/models`` (``/v1/models/{id}``). A request runs
the same :meth:`Dispatcher.ask` as the gRPC ``Ask``; its deadline is dispatch's ``default_timeout_s``.
A client that disconnects cancels its request (the handler is cancelled, the Ask stream closed, the
model calls cancelled inside Triton).

Errors before the first byte are OpenAI error bodies with the HTTP status of their gRPC code; an error
after a stream started is sent as one ``data: {"error": ...}`` event and the stream ends without
``[DONE]``. Each request carries a tenant (``request[TENANT]``, its API key's tenant, "default" without keys) that the
cache, budgets and rate limits are kept by.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from opentelemetry import propagate, trace

from constellation import telemetry
from constellation.auth import current_tenant
from constellation.errors import ConstellationError, InvalidArgument, NotFound
from services.dispatch.events import Delta, Finished, PlanMade
from services.dispatch.http._errors import http_error
from services.dispatch.http._request import PROFILE_MODELS, ChatRequest, parse_chat
from services.dispatch.http._response import CachedCompletion, Facts
from services.dispatch.http.cache import CacheKey, Probe, SemanticCache
from services.dispatch.pipeline import Dispatcher

tracer = trace.get_tracer("constellation.dispatch.http")

TenantOf = Callable[[web.Request], str]
TENANT = web.RequestKey("tenant", str)
"""The request's tenant (what the cache is partitioned by), set before the query runs."""


def default_tenant(request: web.Request) -> str:
    """The tenant of the request's API key ("default" when the API runs without keys)."""
    return current_tenant()


def error_response(error: ConstellationError) -> web.Response:
    mapped = http_error(error)
    return web.json_response(mapped.body, status=mapped.status, headers=mapped.headers)


def pool_names(dispatcher: Dispatcher) -> list[str]:
    """The models callers may name: the pool (catalog and registry) and the default model."""
    names = [m.name for m in dispatcher.pool()]
    if dispatcher.config.default_model not in names:
        names.append(dispatcher.config.default_model)
    return names


def pool_fingerprint(dispatcher: Dispatcher) -> int:
    """Changes when a model joins or leaves the pool or changes price (the cache is then dropped)."""
    return hash(tuple(sorted((m.name, m.price_in_per_mtok, m.price_out_per_mtok) for m in dispatcher.pool())))


class ChatCompletions:
    """``POST /v1/chat/completions`` over one :class:`Dispatcher`, with an optional semantic cache.

    Cache calls (normalising, embedding, searching) run on one worker thread, never on the event loop,
    and one at a time (the encoder behind ``embed`` need not be thread-safe).
    """

    def __init__(self, dispatcher: Dispatcher, cache: SemanticCache[CachedCompletion] | None, tenant_of: TenantOf):
        self.dispatcher = dispatcher
        self.cache = cache
        self.tenant_of = tenant_of
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-cache")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        received_at = time.perf_counter()
        parent = propagate.extract(dict(request.headers))
        with tracer.start_as_current_span(
            "POST /v1/chat/completions", context=parent, kind=trace.SpanKind.SERVER
        ) as span:
            try:
                chat = await self._parse(request)
                span.set_attribute("constellation.model", chat.model)
                request[TENANT] = self.tenant_of(request)
                facts = Facts(f"chatcmpl-{uuid.uuid4().hex}", chat.model, telemetry.current_trace_id())
                probe = await self._lookup(request[TENANT], chat, facts)
                if facts.hit is not None:
                    return await self._replay(request, chat, facts)
                if chat.stream:
                    return await self._stream(request, chat, facts, probe, received_at)
                await self._run(chat, facts, received_at)
            except ConstellationError as error:
                span.record_exception(error)
                return error_response(error)
            await self._store(probe, facts)
            return web.json_response(facts.completion(), headers=facts.headers())

    async def _parse(self, request: web.Request) -> ChatRequest:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"the body is not valid JSON: {exc}", reason="INVALID_JSON") from None
        return parse_chat(body, self.dispatcher.config, frozenset(pool_names(self.dispatcher)))

    async def _lookup(self, tenant: str, chat: ChatRequest, facts: Facts) -> Probe | None:
        """The cache probe for a cacheable request (None otherwise); sets ``facts.hit`` on a hit."""
        cache = self.cache
        if cache is None:
            return None
        sampling = chat.query.sampling
        key = CacheKey(
            chat.model, sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.stop, sampling.seed
        )
        probe = cache.probe(chat.query.prompt, key, tenant=tenant)
        if probe is None:
            return None
        loop = _loop()
        version = pool_fingerprint(self.dispatcher)
        await loop.run_in_executor(self.executor, cache.pool_changed, version)
        hit, probe = await loop.run_in_executor(self.executor, cache.lookup, probe)
        facts.hit = hit
        return probe

    async def _store(self, probe: Probe | None, facts: Facts) -> None:
        cached = facts.cached()
        if self.cache is not None and probe is not None and cached is not None:
            await _loop().run_in_executor(self.executor, self.cache.store, probe, cached)

    async def _run(self, chat: ChatRequest, facts: Facts, received_at: float) -> None:
        """Runs the whole Ask, keeping the plan and the final event."""
        stream = self.dispatcher.ask(chat.query, deadline_s=None, received_at=received_at)
        async with aclosing(stream) as events:
            async for event in events:
                if isinstance(event, PlanMade):
                    facts.plan = event
                elif isinstance(event, Finished):
                    facts.finished = event

    async def _open(self, request: web.Request, facts: Facts) -> web.StreamResponse:
        """Starts the event stream (headers carry what is known: the plan) with the role chunk."""
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache", **facts.headers()}
        )
        await response.prepare(request)
        await _send(response, facts.chunk({"role": "assistant", "content": ""}, constellation=facts.extension()))
        return response

    async def _stream(
        self, request: web.Request, chat: ChatRequest, facts: Facts, probe: Probe | None, received_at: float
    ) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        stream = self.dispatcher.ask(chat.query, deadline_s=None, received_at=received_at)
        try:
            async with aclosing(stream) as events:
                async for event in events:
                    if isinstance(event, PlanMade):
                        facts.plan = event
                    elif isinstance(event, Finished):
                        facts.finished = event
                    elif isinstance(event, Delta) and event.text:
                        response = response or await self._open(request, facts)
                        await _send(response, facts.chunk({"content": event.text}))
        except ConstellationError as error:
            if response is None:
                raise
            await _send(response, http_error(error).body)
            return response
        response = response or await self._open(request, facts)
        await self._finish(response, chat, facts)
        await self._store(probe, facts)
        return response

    async def _finish(self, response: web.StreamResponse, chat: ChatRequest, facts: Facts) -> None:
        reason = facts.completion()["choices"][0]["finish_reason"]
        await _send(response, facts.chunk({}, reason, constellation=facts.extension()))
        if chat.include_usage:
            await _send(response, facts.usage_chunk())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()

    async def _replay(self, request: web.Request, chat: ChatRequest, facts: Facts) -> web.StreamResponse:
        """A cache hit: the stored answer, as one JSON body or as a stream of one content chunk."""
        if not chat.stream:
            return web.json_response(facts.completion(), headers=facts.headers())
        assert facts.hit is not None
        response = await self._open(request, facts)
        await _send(response, facts.chunk({"content": facts.hit.value.text}))
        await self._finish(response, chat, facts)
        return response

    async def close(self, _app: web.Application) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


def _loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def models_handler(dispatcher: Dispatcher) -> Callable[[web.Request], Any]:
    """``GET /v1/models`` and ``GET /v1/models/{id}``: the pool's models, then the profile models."""

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "constellation"}

    async def handle(request: web.Request) -> web.Response:
        names = [*pool_names(dispatcher), *PROFILE_MODELS]
        wanted = request.match_info.get("model")
        if wanted is None:
            return web.json_response({"object": "list", "data": [card(n) for n in names]})
        if wanted in names:
            return web.json_response(card(wanted))
        return error_response(NotFound(f"the model {wanted!r} does not exist", reason="MODEL_NOT_FOUND"))

    return handle


def create_http_app(
    dispatcher: Dispatcher,
    *,
    cache: SemanticCache[CachedCompletion] | None = None,
    tenant_of: TenantOf = default_tenant,
    middlewares: Sequence[Middleware] = (),
) -> web.Application:
    """The OpenAI-compatible API over ``dispatcher`` (shared with the gRPC servicer).

    Args:
        dispatcher: Runs the queries.
        cache: Answers greedy requests again without asking any model; None caches nothing.
        tenant_of: The tenant of a request (the cache's partition); by default its API key's tenant.
        middlewares: Run before every route (the API-key check, :func:`constellation.auth.http_middleware`).
    """
    app = web.Application(
        client_max_size=4 * dispatcher.config.max_prompt_chars + 65_536, middlewares=list(middlewares)
    )
    chat = ChatCompletions(dispatcher, cache, tenant_of)
    models = models_handler(dispatcher)
    app.router.add_post("/v1/chat/completions", chat.handle)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", models)
    app.on_cleanup.append(chat.close)
    return app


@dataclass
class RunningHttp:
    """A started HTTP server: its port, and how to stop it."""

    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        """Stops accepting, lets requests in flight end (up to the runner's shutdown timeout), cleans up."""
        await self.runner.cleanup()


async def start_http(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> RunningHttp:
    """Serves ``app`` on the running event loop at ``host:port`` (port 0 picks a free one).

    Handler cancellation is on, so a client that goes away cancels its request.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    for address in runner.addresses:
        bound = int(address[1])
    return RunningHttp(runner, bound)


@asynccontextmanager
async def running_http(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[RunningHttp]:
    """:func:`start_http`, stopped on leaving."""
    running = await start_http(app, host, port)
    try:
        yield running
    finally:
        await running.stop()
