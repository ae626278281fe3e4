"""Dispatch's OpenAI-compatible HTTP API and the front door's semantic cache.

Mount it beside the gRPC server, on the same event loop::

    app = create_http_app(dispatcher, cache=SemanticCache(embed))
    async with running_http(app, "127.0.0.1", 8080) as http:
        ...
"""

from services.dispatch.http.app import RunningHttp, create_http_app, running_http, start_http
from services.dispatch.http.cache import CacheKey, SemanticCache

__all__ = ["CacheKey", "RunningHttp", "SemanticCache", "create_http_app", "running_http", "start_http"]
