"""`shopsearch serve --models-only`: the models as a model server, no store.

It answers the APIs our remote clients (and other tools) speak:
- OpenAI: `POST /v1/embeddings`, `GET /v1/models`;
- text-embeddings-inference: `POST /embed`, `POST /rerank` (`raw_scores`: logits), `GET /info`;
- Cohere / Jina: `POST /v1/rerank`;
- `/healthz`, `/readyz`, `/metrics`.

Every model call goes through the service's caches and shared batching queue (state.py), so one GPU
box serves many middleware replicas. The server embeds exactly the text it receives: the query
instruction is the client's business (our remote embedder adds it on queries only), so the embedder is
loaded without one. API keys are the server's (`Authorization: Bearer <key>` works, as OpenAI clients
send it). Errors take OpenAI's shape under /v1 and TEI's elsewhere.

Models load in the background: /readyz answers 503 with the one-line error while a model cannot load,
and loading is retried until it succeeds, so a model server that starts before its files (or its GPU)
are ready recovers without a restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from middleware import __version__
from middleware.config import Settings
from middleware.server import heap
from middleware.server.api import RerankBody, RerankResponse, answer_rerank
from middleware.server.errors import ApiError, redact
from middleware.server.loader import BackgroundLoader
from middleware.server.metrics import CONTENT_TYPE_LATEST
from middleware.server.state import ModelService

log = logging.getLogger(__name__)

router = APIRouter()

MODEL_ROUTES = frozenset(
    {"/v1/embeddings", "/v1/models", "/v1/rerank", "/embed", "/rerank", "/info", "/healthz", "/readyz", "/metrics"}
)


def _error_body(path: str, status: int, message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    if path == "/v1" or path.startswith("/v1/"):  # OpenAI's error object
        return {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return {"error": message, "error_type": kind}  # text-embeddings-inference's


def render_model_error(path: str, err: ApiError) -> JSONResponse:
    message = f"{err.param}: {err.message}" if err.param else err.message
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}.get(
        err.status, "validation" if err.status in (413, 422) else "server_error"
    )
    return JSONResponse(
        _error_body(path, err.status, message, kind, err.param), status_code=err.status, headers=err.headers
    )


def _service(request: Request) -> ModelService:
    state = getattr(request.app.state, "service", None)
    if state is None:
        loader: BackgroundLoader[Any] | None = getattr(request.app.state, "loader", None)
        problem = loader.error if loader is not None and loader.error else "models are still loading"
        raise ApiError(503, f"not ready: {problem}", headers={"Retry-After": "1"})
    return state  # type: ignore[no-any-return]


def _need_embedder(state: ModelService) -> Any:
    if state.embedder is None:
        raise ApiError(404, "this server serves no embedder (embedder=none)")
    return state.embedder


def _texts(value: str | list[str], field: str, limit: int) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ApiError(400, "must not be empty", param=field)
    if len(texts) > limit:
        raise ApiError(400, f"at most {limit} texts per request (server.max_embed_inputs)", param=field)
    return texts


def _token_count(state: ModelService, texts: list[str]) -> int:
    """Tokens the model read (OpenAI's `usage`): counted by the model's own tokenizer."""
    assert state.embedder is not None
    tokenize = getattr(state.embedder.inner, "tokenize_queries", None)
    if not callable(tokenize):
        return 0
    return sum(len(e.ids) for e in tokenize(texts))


# --------------------------------------------------------------------------------------------- OpenAI


class OpenAIEmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    input: str | list[str] = Field(description="one text or a list (token ids are not accepted)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


@router.post("/v1/embeddings", tags=["openai"])
async def openai_embeddings(body: OpenAIEmbeddingsBody, request: Request) -> JSONResponse:
    """OpenAI's embeddings API: `data[i].embedding`, L2-normalised, of exactly the texts sent."""
    state = _service(request)
    embedder = _need_embedder(state)
    if body.model != embedder.model_id:
        raise ApiError(404, f"model {body.model!r} is not served here (it serves: {embedder.model_id})", param="model")
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise ApiError(400, f"this model gives {embedder.dim}-d vectors only", param="dimensions")
    texts = _texts(body.input, "input", state.settings.server.max_embed_inputs)

    def work() -> tuple[np.ndarray, int]:
        return np.asarray(embedder.encode_queries(texts), dtype=np.float32), _token_count(state, texts)

    vectors, tokens = await state.admitted(work)
    data: list[dict[str, Any]] = []
    for i, vector in enumerate(vectors):
        value: Any = (
            base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            if body.encoding_format == "base64"
            else vector.tolist()
        )
        data.append({"object": "embedding", "index": i, "embedding": value})
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": embedder.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


@router.get("/v1/models", tags=["openai"])
async def openai_models(request: Request) -> dict[str, Any]:
    state = _service(request)
    served = [w.model_id for w in (state.embedder, state.reranker) if w is not None]
    created = int(state.started)
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": "shopsearch"} for name in served],
    }


# ------------------------------------------------------------------------------------ TEI and Cohere


class TeiEmbedBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: str | list[str]
    normalize: bool = True
    truncate: bool | None = None  # accepted: texts are always cut to the model's length
    truncation_direction: Literal["right", "Right"] | None = None


@router.post("/embed", tags=["tei"])
async def tei_embed(body: TeiEmbedBody, request: Request) -> JSONResponse:
    """text-embeddings-inference's embed route: `[[..], ..]`, one vector per input."""
    state = _service(request)
    embedder = _need_embedder(state)
    if not body.normalize:
        raise ApiError(400, "vectors are always L2-normalised here; send normalize: true", param="normalize")
    texts = _texts(body.inputs, "inputs", state.settings.server.max_embed_inputs)
    vectors = await state.admitted(embedder.encode_queries, texts)
    return JSONResponse(np.asarray(vectors, dtype=np.float32).tolist())


@router.post("/rerank", tags=["tei"])
async def tei_rerank(body: RerankBody, request: Request) -> Response:
    """text-embeddings-inference's rerank route: `[{index, score}]`, best first (`raw_scores`: logits)."""
    if body.texts is None:
        raise ApiError(400, "send texts (TEI's shape); Cohere's shape is POST /v1/rerank", param="texts")
    return _as_response(await answer_rerank(_service(request), body))


@router.post("/v1/rerank", tags=["cohere"])
async def cohere_rerank(body: RerankBody, request: Request) -> Response:
    """Cohere's (and Jina's, vLLM's) rerank API: `results[{index, relevance_score}]`, best first."""
    return _as_response(await answer_rerank(_service(request), body))


def _as_response(answer: RerankResponse | JSONResponse) -> Response:
    if isinstance(answer, Response):
        return answer
    return JSONResponse(answer.model_dump(mode="json", exclude_none=True))


@router.get("/info", tags=["tei"])
async def tei_info(request: Request) -> dict[str, Any]:
    """What text-embeddings-inference's /info says: the model's name, kind and limits."""
    state = _service(request)
    srv = state.settings.server
    main = state.embedder if state.embedder is not None else state.reranker
    assert main is not None
    inner = main.inner
    model_type: dict[str, Any] = (
        {"embedding": {"pooling": str(getattr(inner, "pooling", "unknown"))}}
        if state.embedder is not None
        else {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    )
    return {
        "model_id": main.model_id,
        "model_dtype": str(getattr(inner, "precision", "unknown")),
        "model_type": model_type,
        "max_input_length": int(getattr(inner, "max_length", 0) or 0),
        "max_batch_tokens": srv.batch_max_tokens,
        "max_client_batch_size": srv.max_embed_inputs,
        "max_concurrent_requests": srv.max_queue,
        "reranker_model_id": state.reranker.model_id if state.reranker is not None else None,
        "router": "shopsearch",
        "version": __version__,
    }


# ---------------------------------------------------------------------------------------- operations


@router.get("/healthz", tags=["operations"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"])
async def readyz(request: Request) -> JSONResponse:
    """200 once every configured model is loaded; 503 with the one-line reason before."""
    state = getattr(request.app.state, "service", None)
    if state is None:
        loader: BackgroundLoader[Any] | None = getattr(request.app.state, "loader", None)
        check = loader.error if loader is not None and loader.error else "loading"
        return JSONResponse({"ready": False, "checks": {"models": check}}, status_code=503)
    checks = {name: w.model_id for name, w in (("embedder", state.embedder), ("reranker", state.reranker)) if w}
    return JSONResponse({"ready": True, "checks": checks})


@router.get("/metrics", tags=["operations"])
async def metrics(request: Request) -> Response:
    state = _service(request)
    state.metrics.in_flight.set(state.limiter.in_flight)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ------------------------------------------------------------------------------------------- the app


def models_only_settings(settings: Settings) -> Settings:
    """The settings the model server loads its models with: no query instruction (the text sent is
    the text embedded)."""
    return settings.model_copy(update={"query_instruction": ""})


class ModelLoader(BackgroundLoader[ModelService]):
    """Loads the configured models of a models-only server."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(self._load_models, "models")
        self.settings = models_only_settings(settings)

    def _load_models(self) -> ModelService:
        from middleware.models import load_embedder, load_reranker

        embedder = load_embedder(self.settings)
        try:
            reranker = load_reranker(self.settings)
        except BaseException:
            close = getattr(embedder, "close", None)
            if callable(close):
                close()
            raise
        if embedder is None and reranker is None:
            raise ValueError("embedder and reranker are both none: a models-only server has nothing to serve")
        return ModelService(self.settings, embedder, reranker, owns_models=True)


def _warm_up(state: ModelService) -> None:
    """One call per model before taking traffic: onnxruntime's first run is slow."""
    started = time.perf_counter()
    if state.embedder is not None:
        state.embedder.encode_queries(["warm up 预热"])
    if state.reranker is not None:
        state.reranker.score("warm up", ["预热"])
    log.info("models-only warm-up took %.0f ms", (time.perf_counter() - started) * 1000.0)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return render_model_error(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            loc = [str(p) for p in e.get("loc", ())]
            field = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc) or "body"
            parts.append(f"{field}: {str(e.get('msg', 'invalid')).removeprefix('Value error, ')}")
        path = request.url.path
        return JSONResponse(_error_body(path, 422, "; ".join(parts) or "invalid request", "validation"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path} on this model server"
        return JSONResponse(
            _error_body(request.url.path, exc.status_code, message, "invalid_request_error"),
            status_code=exc.status_code,
            headers=dict(exc.headers) if exc.headers else None,
        )


def _route_label(path: str, method: str) -> str:
    return path if path in MODEL_ROUTES else "other"  # bounded: never the raw path


def create_models_app(settings: Settings | None = None, service: ModelService | None = None) -> FastAPI:
    """The model server. Without `service`, the models load in the background at startup (retried
    until they load; /readyz says why not meanwhile). A service passed in stays the caller's."""
    from middleware.server.app import ServiceMiddleware

    settings = settings or Settings()
    holder: dict[str, Any] = {"state": service}
    loader = ModelLoader(settings)

    async def load_in_background() -> None:
        state = await loader.load()
        if settings.server.warm_up:
            try:
                await asyncio.to_thread(_warm_up, state)
            except Exception as err:  # a model that loads but cannot answer keeps readiness false
                loader.error = f"warm-up failed: {redact(str(err))[:300]}"
                state.close_models()
                log.error("%s", loader.error)
                return
        loader.error = None
        heap.settle(settings.server.gc_young_threshold)
        holder["state"] = state
        app.state.service = state

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None if holder["state"] is not None else asyncio.create_task(load_in_background())
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            state = holder["state"]
            if state is not None and service is None:
                await state.close()

    app = FastAPI(
        title="shopsearch models",
        version=__version__,
        description="shopsearch's models over OpenAI, text-embeddings-inference and Cohere APIs.",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.loader = loader
    _install_handlers(app)
    app.include_router(router)
    app.add_middleware(
        ServiceMiddleware,
        get=lambda: holder["state"],
        settings=settings,
        render_error=render_model_error,
        route_label=_route_label,
    )
    return app
