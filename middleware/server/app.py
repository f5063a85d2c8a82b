"""The FastAPI app: `create_app(settings, pipeline=None)`.

One process serves three faces over one pipeline:
- /v1/… — the REST API for storefront backends (api.py), OpenAPI docs at /v1/docs;
- everything else OpenSearch-shaped — the drop-in proxy (proxy.py);
- /healthz, /readyz, /metrics.

The models are wrapped once per app (state.py): query embeddings and rerank pairs from concurrent
requests go through caches and shared batches (batching.py). Searches run in a thread pool, never on
the event loop, and at most `server.max_queue` at once: the next one gets 429 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from middleware import __version__
from middleware.config import Settings
from middleware.pipeline import Pipeline
from middleware.server import api, events_api, heap, proxy
from middleware.server.auth import ApiKeyChecker, load_api_keys
from middleware.server.errors import ApiError, opensearch_error, redact, render, route_group, v1_error
from middleware.server.loader import BackgroundLoader
from middleware.server.state import ModelService, ServiceState

log = logging.getLogger(__name__)

WORKER_HEADER = "x-shopsearch-worker"  # on every response: the pid of the process that answered


def _metric_route(path: str, method: str) -> str:
    """A bounded label for a path (never the raw path: index names and ids are unbounded)."""
    group = route_group(path)
    if group != "proxy":
        return path if group != "v1" or path.count("/") <= 2 else "/".join(path.split("/")[:3])
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "info"
    for part in parts:
        if part.startswith("_"):
            return part
    return "index"


class ServiceMiddleware:
    """Auth, body size limit and request metrics, before any route runs (pure ASGI: cheap)."""

    def __init__(
        self,
        app: ASGIApp,
        get: Callable[[], ModelService | None],
        settings: Settings,
        render_error: Callable[[str, ApiError], JSONResponse] = render,
        route_label: Callable[[str, str], str] = _metric_route,
    ) -> None:
        self.app = app
        self.get = get
        self.settings = settings
        self.render_error = render_error  # the error shape the app's routes answer in
        self.route_label = route_label
        self.auth = ApiKeyChecker(load_api_keys(settings.server))  # checked even before models load
        # which process answered: with `serve --workers N`, each worker is a process of its own
        self.worker_header = (WORKER_HEADER.encode("latin-1"), str(os.getpid()).encode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.get()
        path: str = scope["path"]
        started = time.perf_counter()
        status: dict[str, Any] = {"code": 500, "started": False}

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                message["headers"] = [*message.get("headers", ()), self.worker_header]
            await send(message)

        try:
            await self._handle(scope, receive, send_recording, state, path)
        except Exception as exc:
            # Caught here, not left to the server: its traceback log could carry secrets from the message.
            # The log gets one redacted line; the client a 500 without internals.
            log.error("unhandled %s on %s %s: %s", type(exc).__name__, scope["method"], path, redact(str(exc))[:500])
            if status.get("started"):
                return
            status["code"] = 500
            message = "internal error; the service log has the details"
            response = self.render_error(path, ApiError(500, message, os_type="internal_server_error"))
            await response(scope, receive, send)
        finally:
            if state is not None:
                label = self.route_label(path, scope["method"])
                state.metrics.requests.labels(label, scope["method"], str(status["code"])).inc()
                state.metrics.request_seconds.labels(label).observe(time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, state: ModelService | None, path: str) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if route_group(path) != "health" and not self.auth.allows(headers):
            if state is not None:
                state.metrics.rejected.labels("unauthorized").inc()
            err = ApiError(
                401,
                "missing or invalid API key (Authorization: Bearer <key> or ApiKey <key>, or x-api-key)",
                os_type="security_exception",
                headers={"WWW-Authenticate": 'ApiKey, Basic realm="shopsearch"'},
            )
            await self.render_error(path, err)(scope, receive, send)
            return
        limit = self.settings.server.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._too_large(scope, receive, send, path, state, limit)
            return
        # read the body here, bounded, so chunked uploads cannot exceed the limit either
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(scope, receive, send, path, state, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(
        self, scope: Scope, receive: Receive, send: Send, path: str, state: ModelService | None, limit: int
    ) -> None:
        if state is not None:
            state.metrics.rejected.labels("body_too_large").inc()
        err = ApiError(413, f"request body exceeds server.max_body_bytes ({limit} bytes)")
        await self.render_error(path, err)(scope, receive, send)


def _validation_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    parts = []
    detail = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        field = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc) or "body"
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{field}: {msg}")
        detail.append({"loc": loc, "msg": msg, "type": e.get("type", "value_error")})
    message = "; ".join(parts) or "invalid request"
    if route_group(request.url.path) == "proxy":
        return opensearch_error(400, "illegal_argument_exception", message)
    first = detail[0]["loc"] if detail else []
    body: dict[str, Any] = {"message": message, "detail": detail}
    if first:
        body["param"] = ".".join(first[1:]) if first[0] in ("body", "query", "path") else ".".join(first)
    return JSONResponse(body, status_code=422)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return render(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the body is not valid JSON (or is nested too deeply)"
        headers = dict(exc.headers) if exc.headers else None
        if route_group(request.url.path) == "proxy":
            return opensearch_error(exc.status_code, "illegal_argument_exception", message, headers)
        return v1_error(exc.status_code, message, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the log; the client learns nothing about internals
        log.error("unhandled error on %s %s: %s", request.method, request.url.path, redact(repr(exc)))
        message = "internal error; the service log has the details"
        if route_group(request.url.path) == "proxy":
            return opensearch_error(500, "internal_server_error", message)
        return v1_error(500, message)


def _load_service(settings: Settings) -> ServiceState:
    """Models and backend from `settings`, warmed up: what a server without a pipeline of its own loads."""
    base = Pipeline.from_settings(settings)
    try:
        state = ServiceState(settings, base, owns_pipeline=True)
    except BaseException:
        base.close()
        raise
    if settings.server.warm_up:
        state.warm_up()
    return state


def create_app(settings: Settings | None = None, pipeline: Pipeline | None = None) -> FastAPI:
    """The service. Without `pipeline`, models and backend load in the background at startup
    (retried until they load): /readyz answers 503 with the reason meanwhile, as the models-only
    server does.

    A pipeline passed in stays the caller's (not closed on shutdown); `settings` governs the service.
    """
    settings = settings or Settings()
    holder: dict[str, ServiceState | None] = {"state": None}
    loader = BackgroundLoader(lambda: _load_service(settings), "the service")

    def install(state: ServiceState) -> None:
        holder["state"] = state
        app.state.service = state

    def freeze() -> None:
        heap.settle(settings.server.gc_young_threshold)

    async def load_in_background() -> None:
        state = await loader.load()
        loader.error = None
        freeze()
        install(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        given = holder["state"]
        task = None
        if given is None:
            task = asyncio.create_task(load_in_background())
        else:
            if settings.server.warm_up:
                await asyncio.to_thread(given.warm_up)
            freeze()
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            state = holder["state"]
            if state is not None:
                await state.close()

    app = FastAPI(
        title="shopsearch",
        version=__version__,
        description="Semantic product search: REST API (/v1) and an OpenSearch-compatible proxy.",
        docs_url="/v1/docs",
        redoc_url=None,
        openapi_url="/v1/openapi.json",
        lifespan=lifespan,
    )
    app.state.service = None
    app.state.loader = loader
    if pipeline is not None:
        install(ServiceState(settings, pipeline, owns_pipeline=False))

    _install_handlers(app)
    app.include_router(api.router)
    app.include_router(events_api.router)
    app.include_router(proxy.router)  # last: its routes are OpenSearch's path patterns
    app.add_middleware(ServiceMiddleware, get=lambda: holder["state"], settings=settings)
    return app
