"""REST API for storefront backends: /v1/search, /v1/suggest, /v1/rerank, /v1/embed, products, rules,
experiments, health, metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from middleware import experiments, storefront
from middleware import rules as merch
from middleware.backends.base import EmbedderMismatch, WriterBusy
from middleware.products import MAX_DESCRIPTION_CHARS, MAX_QUERY_CHARS, Product, SignalUpdate
from middleware.schema import SearchRequest, SearchResponse, SuggestResponse
from middleware.server.errors import ApiError
from middleware.server.limits import capped_deadline_ms, check_caps, check_paging
from middleware.server.metrics import CONTENT_TYPE_LATEST
from middleware.server.state import ModelService, ServiceState, get_state

router = APIRouter()


class SearchBody(SearchRequest):
    """SearchRequest as the API accepts it: a query of any length (cut to server.max_query_chars)."""

    query: str | None = Field(
        None, description="user text (longer than server.max_query_chars is truncated); empty: browse the filters"
    )
    page: int | None = Field(None, ge=1, description="1-based page of `size` hits (instead of `from`)")


def _prepare(state: ServiceState, body: SearchBody) -> SearchRequest:
    """The request as the pipeline runs it: checked, cut to the caps, its A/B variant's overlay applied."""
    settings = state.settings
    if body.page is not None:
        if body.from_:
            raise ApiError(400, "give either page or from, not both", param="page")
        body = body.model_copy(update={"from_": (body.page - 1) * body.size})
    check_paging(settings.server, body.size, body.from_)
    try:
        storefront.check_request(body)
    except storefront.StorefrontError as err:
        raise ApiError(400, err.message, param=err.param) from None
    active = state.base.experiments.active()
    req, _ = experiments.expose(active, body, settings)
    check_caps(settings, req)
    return req.model_copy(  # (the copy keeps the exposure the response will name)
        update={
            # longer text is cut, never refused
            "query": (req.query or "")[: min(MAX_QUERY_CHARS, settings.server.max_query_chars)],
            "deadline_ms": capped_deadline_ms(settings, req.deadline_ms),
        }
    )


@router.post("/v1/search", response_model=SearchResponse, tags=["search"])
async def search(body: SearchBody, request: Request) -> SearchResponse:
    """Hybrid retrieval → fusion → rerank → business score. `degraded` lists stages skipped."""
    state = get_state(request)
    return await state.search(_prepare(state, body))


MAX_SUGGEST_SIZE = 50


@router.get("/v1/suggest", response_model=SuggestResponse, tags=["search"])
async def suggest(
    request: Request,
    q: str = Query(min_length=1, max_length=storefront.MAX_SUGGEST_CHARS, description="what the shopper has typed"),
    size: int = Query(8, ge=1, le=MAX_SUGGEST_SIZE),
) -> SuggestResponse:
    """Completions of `q`: popular past queries this process has answered with hits (counted per
    process, bounded, lost on restart), then catalog prefixes: title words, brands, categories."""
    state = get_state(request)
    started = time.perf_counter()
    found = await state.admitted(storefront.suggest, state.base.backend, state.popular, q, size)
    return SuggestResponse(query=q, suggestions=found, took_ms=round((time.perf_counter() - started) * 1000.0, 3))


class RerankDocument(BaseModel):
    text: str


class RerankBody(BaseModel):
    """Cohere's shape (`documents`, `top_n`, `return_documents`) or text-embeddings-inference's
    (`texts`, `raw_scores`, `truncate`, `return_text`); the answer takes the shape of the request.
    Texts are always cut to the model's length (`truncate: false` is not an error here)."""

    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1)
    model: str | None = Field(None, description="Cohere's field: when given, the served reranker's name")
    documents: list[str | RerankDocument] | None = Field(None, min_length=1, description="Cohere's field")
    texts: list[str] | None = Field(None, min_length=1, description="TEI's field")
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    raw_scores: bool = False  # TEI: logits instead of sigmoid scores
    truncate: bool | None = None  # TEI: accepted; texts are always cut to the model's length
    truncation_direction: Literal["right", "Right"] | None = None  # TEI: only the end is cut
    return_text: bool = False  # TEI: each result carries its text

    @model_validator(mode="after")
    def _one_shape(self) -> RerankBody:
        if (self.documents is None) == (self.texts is None):
            raise ValueError("give either documents (Cohere's shape) or texts (TEI's shape)")
        tei_only = self.raw_scores or self.return_text or self.truncate is not None
        if self.documents is not None and tei_only:
            raise ValueError("raw_scores, truncate and return_text go with texts (TEI's shape)")
        if self.texts is not None and (self.return_documents or self.top_n is not None):
            raise ValueError("top_n and return_documents go with documents (Cohere's shape)")
        return self

    def all_texts(self) -> list[str]:
        if self.texts is not None:
            return list(self.texts)
        assert self.documents is not None
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(BaseModel):
    model: str
    results: list[RerankResult]


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


@router.post("/v1/rerank", response_model=RerankResponse | list[TeiRank], tags=["models"])
async def rerank(body: RerankBody, request: Request) -> RerankResponse | JSONResponse:
    """Score documents against a query with the cross-encoder (0–1, higher is more relevant; TEI's
    `raw_scores`: the logits). Cohere's request gets Cohere's answer, TEI's gets TEI's."""
    return await answer_rerank(get_state(request), body)


async def answer_rerank(state: ModelService, body: RerankBody) -> RerankResponse | JSONResponse:
    """The rerank answer, for this service's routes and the models-only server's."""
    if state.reranker is None:
        raise ApiError(503, "the reranker is disabled (SHOPSEARCH_RERANKER=none)")
    if body.model is not None and body.model != state.reranker.model_id:
        served = state.reranker.model_id
        raise ApiError(404, f"model {body.model!r} is not served here (it serves: {served})", param="model")
    texts = body.all_texts()
    field = "texts" if body.texts is not None else "documents"
    limit = state.settings.server.max_rerank_documents
    if len(texts) > limit:
        raise ApiError(400, f"at most {limit} documents (server.max_rerank_documents)", param=field)
    query = body.query[: state.settings.server.max_query_chars]
    if body.raw_scores:
        if state.logit_reranker is None:
            raise ApiError(400, "this reranker gives no raw scores", param="raw_scores")
        scores = await state.admitted(state.logit_reranker.score, query, texts)
    else:
        scores = await state.admitted(state.reranker.score, query, texts)
    order = sorted(range(len(texts)), key=lambda i: (-float(scores[i]), i))
    if body.texts is not None:  # TEI leaves `text` out unless asked for
        ranks = [TeiRank(index=i, score=float(scores[i]), text=texts[i] if body.return_text else None) for i in order]
        return JSONResponse([r.model_dump(exclude_none=True) for r in ranks])
    if body.top_n is not None:
        order = order[: body.top_n]
    return RerankResponse(
        model=state.reranker.model_id,
        results=[
            RerankResult(
                index=i,
                relevance_score=float(scores[i]),
                document=RerankDocument(text=texts[i]) if body.return_documents else None,
            )
            for i in order
        ],
    )


class EmbedBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    input: str | list[str] = Field(
        validation_alias=AliasChoices("input", "inputs"), description="one text or a list (alias: inputs)"
    )
    kind: Literal["query", "document"] = "query"

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if (isinstance(value, str) and not value) or (isinstance(value, list) and not value):
            raise ValueError("must not be empty")
        return value


class Embedding(BaseModel):
    index: int
    embedding: list[float]


class EmbedResponse(BaseModel):
    model: str
    dim: int
    data: list[Embedding]


@router.post("/v1/embed", response_model=EmbedResponse, tags=["models"])
async def embed(body: EmbedBody, request: Request) -> EmbedResponse:
    """Embeddings (L2-normalised). `kind: query` adds the model's query instruction."""
    state = get_state(request)
    if state.embedder is None:
        raise ApiError(503, "the embedder is disabled (SHOPSEARCH_EMBEDDER=none)")
    texts = [body.input] if isinstance(body.input, str) else body.input
    limit = state.settings.server.max_embed_inputs
    if len(texts) > limit:
        raise ApiError(400, f"at most {limit} texts (server.max_embed_inputs)", param="input")
    # a document is cut where the store cuts a description
    cut = state.settings.server.max_query_chars if body.kind == "query" else MAX_DESCRIPTION_CHARS
    texts = [t[:cut] for t in texts]
    fn = state.embedder.encode_queries if body.kind == "query" else state.embedder.encode_documents
    vectors = np.asarray(await state.admitted(fn, texts), dtype=np.float32)
    return EmbedResponse(
        model=state.embedder.model_id,
        dim=int(vectors.shape[1]) if vectors.ndim == 2 else 0,
        data=[Embedding(index=i, embedding=v.tolist()) for i, v in enumerate(vectors)],
    )


# ------------------------------------------------------------------------------------------ products


def _writes_enabled(state: ServiceState) -> None:
    if not state.settings.server.enable_writes:
        raise ApiError(403, "writes are disabled (server.enable_writes)", os_type="security_exception")


class ProductsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    products: list[Product] = Field(min_length=1, max_length=10_000)


class DeleteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[str] = Field(min_length=1, max_length=10_000)


class SignalsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    updates: list[SignalUpdate] = Field(min_length=1, max_length=100_000)


# `:path`: an id may hold "/" (sent as %2F, which the server decodes before routing)
@router.get("/v1/products/{product_id:path}", tags=["products"])
async def get_product(product_id: str, request: Request) -> dict[str, Any]:
    state = get_state(request)
    found = await state.admitted(state.base.backend.get, [product_id])
    if not found:
        raise ApiError(404, f"no product with id {product_id[:200]!r}", param="product_id", location="path")
    return found[0].model_dump(mode="json")


@router.post("/v1/products", tags=["products"])
async def upsert_products(body: ProductsBody, request: Request) -> dict[str, Any]:
    """Insert or replace products (text changes re-embed them). Off unless server.enable_writes."""
    state = get_state(request)
    _writes_enabled(state)

    def write() -> int:
        from loaders.indexer import Indexer  # the one write path: the loader's rules for every product

        try:
            Indexer(state.embedder).upsert(body.products, state.base.backend)
        except EmbedderMismatch as err:  # the store holds another embedder's vectors: not an outage (503)
            raise ApiError(409, str(err), os_type="illegal_argument_exception") from None
        return len(body.products)

    return {"upserted": await state.admitted(write, bounded=False)}


@router.post("/v1/products/delete", tags=["products"])
async def delete_products(body: DeleteBody, request: Request) -> dict[str, Any]:
    state = get_state(request)
    _writes_enabled(state)
    return {"deleted": await state.admitted(state.base.backend.delete, body.ids, bounded=False)}


@router.delete("/v1/products/{product_id:path}", tags=["products"])
async def delete_product(product_id: str, request: Request) -> dict[str, Any]:
    state = get_state(request)
    _writes_enabled(state)
    deleted = await state.admitted(state.base.backend.delete, [product_id], bounded=False)
    if not deleted:
        raise ApiError(404, f"no product with id {product_id[:200]!r}", param="product_id", location="path")
    return {"deleted": deleted}


@router.post("/v1/force-merge", tags=["products"])
async def force_merge(request: Request) -> dict[str, Any]:
    """Merge the lexical index into one segment (after loads or many small writes: searches get faster).
    Writes go on meanwhile and become searchable when it ends. Off unless server.enable_writes."""
    state = get_state(request)
    _writes_enabled(state)

    def merge() -> dict[str, Any]:
        started = time.monotonic()
        try:
            before, after = state.base.backend.force_merge()
        except WriterBusy as err:  # the worker holding the writer did not start the merge asked of it
            raise ApiError(409, str(err), os_type="illegal_state_exception", headers={"Retry-After": "1"}) from None
        return {"segments_before": before, "segments_after": after, "seconds": round(time.monotonic() - started, 2)}

    return await state.admitted(merge, bounded=False)


# ------------------------------------------------------------------------------------------ synonyms


class SynonymsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[str] = Field(
        max_length=100_000, description='Solr-format lines: "a, b, c" (equivalent) or "a, b => c" (replacement)'
    )


def _synonym_store(state: ServiceState) -> Any:
    from middleware.query_expansion import SynonymStore, synonyms_path

    return SynonymStore(synonyms_path(state.settings))


@router.get("/v1/synonyms", tags=["synonyms"])
async def get_synonyms(request: Request) -> dict[str, Any]:
    """The query-time synonym set, one Solr line per rule."""
    state = get_state(request)
    _writes_enabled(state)
    rules = _synonym_store(state).lines()
    return {"rules": rules, "count": len(rules)}


@router.put("/v1/synonyms", tags=["synonyms"])
async def put_synonyms(body: SynonymsBody, request: Request) -> dict[str, Any]:
    """Replace the synonym set; every worker's next query uses it (no reindex). Off unless server.enable_writes."""
    from middleware.query_expansion import parse_synonyms

    state = get_state(request)
    _writes_enabled(state)
    rules, errors = parse_synonyms(body.rules)
    if errors:
        err = errors[0]
        raise ApiError(400, f"rules[{err.line - 1}]: {err.message}", param=f"rules[{err.line - 1}]")
    return {"rules": _synonym_store(state).replace(rules)}


@router.post("/v1/signals", tags=["products"])
async def update_signals(body: SignalsBody, request: Request) -> dict[str, Any]:
    """Price / sales / stock changes: no re-embedding, no rerank-cache change."""
    state = get_state(request)
    _writes_enabled(state)
    missing = await state.admitted(state.base.backend.update_signals, body.updates, bounded=False)
    return {"updated": len(body.updates) - len(missing), "not_found": missing}


# ------------------------------------------------------------------------------------------- rules


def _rule_store(state: ServiceState) -> merch.RuleStore:
    return state.base.rules


async def _on_store(what: str, fn: Any, *args: Any) -> Any:
    """A JSON record store call (rules, experiments) off the event loop; an unreadable file is a 500
    naming it, not a traceback."""
    try:
        return await asyncio.to_thread(fn, *args)
    except (OSError, ValueError) as err:
        message = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise ApiError(500, f"the {what} file cannot be read or written: {message}") from None


async def _on_rules(fn: Any, *args: Any) -> Any:
    return await _on_store("rules", fn, *args)


@router.get("/v1/rules", tags=["rules"])
async def list_rules(request: Request) -> dict[str, Any]:
    """Every merchandising rule, in id order (disabled and out-of-window ones included)."""
    store = _rule_store(get_state(request))
    rules = await _on_rules(store.all)
    return {"rules": [r.model_dump(mode="json") for r in rules]}


@router.get("/v1/rules/{rule_id}", tags=["rules"])
async def get_rule(rule_id: str, request: Request) -> dict[str, Any]:
    rule = await _on_rules(_rule_store(get_state(request)).get, rule_id)
    if rule is None:
        raise ApiError(404, f"no rule with id {rule_id[:200]!r}", param="rule_id", location="path")
    return rule.model_dump(mode="json")


@router.put("/v1/rules/{rule_id}", tags=["rules"])
async def put_rule(rule_id: str, request: Request, body: Any = Body(...)) -> dict[str, Any]:  # noqa: B008
    """Create or replace a rule (the path names it; a body `id` must agree). Off unless server.enable_writes."""
    state = get_state(request)
    _writes_enabled(state)
    if not isinstance(body, dict):
        raise ApiError(400, "a rule is a JSON object", param="rule")
    if "id" in body and body["id"] != rule_id:
        raise ApiError(400, f"the body's id {str(body['id'])[:200]!r} differs from the path's", param="id")
    try:
        rule = merch.Rule.model_validate({**body, "id": rule_id})
    except ValidationError as err:
        name, message = merch.rule_error(err)
        raise ApiError(400, f"{name}: {message}", param=name) from None
    store = _rule_store(state)
    if len(await _on_rules(store.all)) >= merch.MAX_RULES and await _on_rules(store.get, rule_id) is None:
        raise ApiError(400, f"at most {merch.MAX_RULES} rules", param="rule")
    await _on_rules(store.put, [rule])
    return {"rule": rule.model_dump(mode="json")}


@router.delete("/v1/rules/{rule_id}", tags=["rules"])
async def delete_rule(rule_id: str, request: Request) -> dict[str, Any]:
    state = get_state(request)
    _writes_enabled(state)
    if not await _on_rules(_rule_store(state).delete, rule_id):
        raise ApiError(404, f"no rule with id {rule_id[:200]!r}", param="rule_id", location="path")
    return {"deleted": 1}


# ------------------------------------------------------------------------------------- experiments
# Experiments change what shoppers are served and reveal how: every route, reads too, is closed unless
# server.enable_writes (like the synonym set's).


async def _on_experiments(fn: Any, *args: Any) -> Any:
    return await _on_store("experiments", fn, *args)


@router.get("/v1/experiments", tags=["experiments"])
async def list_experiments(request: Request) -> dict[str, Any]:
    """Every A/B experiment, in id order (stopped ones included). Off unless server.enable_writes."""
    state = get_state(request)
    _writes_enabled(state)
    found = await _on_experiments(state.base.experiments.all)
    return {"experiments": [e.model_dump(mode="json") for e in found]}


@router.get("/v1/experiments/{experiment_id}", tags=["experiments"])
async def get_experiment(experiment_id: str, request: Request) -> dict[str, Any]:
    state = get_state(request)
    _writes_enabled(state)
    found = await _on_experiments(state.base.experiments.get, experiment_id)
    if found is None:
        raise ApiError(404, f"no experiment with id {experiment_id[:200]!r}", param="experiment_id", location="path")
    return found.model_dump(mode="json")


@router.put("/v1/experiments/{experiment_id}", tags=["experiments"])
async def put_experiment(experiment_id: str, request: Request, body: Any = Body(...)) -> dict[str, Any]:  # noqa: B008
    """Create or replace an experiment (the path names it; a body `id` must agree). 409 when its window
    overlaps another enabled experiment's. Off unless server.enable_writes."""
    state = get_state(request)
    _writes_enabled(state)
    if not isinstance(body, dict):
        raise ApiError(400, "an experiment is a JSON object", param="experiment")
    if "id" in body and body["id"] != experiment_id:
        raise ApiError(400, f"the body's id {str(body['id'])[:200]!r} differs from the path's", param="id")
    try:
        found = experiments.Experiment.model_validate({**body, "id": experiment_id})
        found.check_settings(state.settings)
    except ValidationError as err:
        name, message = experiments.experiment_error(err)
        raise ApiError(400, f"{name}: {message}", param=name) from None
    except ValueError as err:
        raise ApiError(400, str(err), param=str(err).partition(": ")[0]) from None
    try:
        await asyncio.to_thread(state.base.experiments.put, found)
    except ValueError as err:
        if "overlaps experiment" in str(err):
            raise ApiError(409, str(err), param="active_from") from None
        raise ApiError(400, str(err), param="experiment") from None
    except OSError as err:
        raise ApiError(500, f"the experiments file cannot be written: {err}") from None
    return {"experiment": found.model_dump(mode="json")}


@router.delete("/v1/experiments/{experiment_id}", tags=["experiments"])
async def delete_experiment(experiment_id: str, request: Request) -> dict[str, Any]:
    """Remove an experiment (to end one and keep it for its report, PUT it with `enabled: false`)."""
    state = get_state(request)
    _writes_enabled(state)
    if not await _on_experiments(state.base.experiments.delete, experiment_id):
        raise ApiError(404, f"no experiment with id {experiment_id[:200]!r}", param="experiment_id", location="path")
    return {"deleted": 1}


# -------------------------------------------------------------------------------------- operations


@router.get("/healthz", tags=["operations"])
async def healthz() -> dict[str, str]:
    """The process answers (liveness)."""
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"])
async def readyz(request: Request) -> JSONResponse:
    """Models loaded and backend reachable (readiness): 200, else 503 naming what is missing."""
    state = getattr(request.app.state, "service", None)
    if state is None:  # loading in the background (app.py): the last failure's line, if any
        loader = getattr(request.app.state, "loader", None)
        check = loader.error if loader is not None and loader.error else "loading"
        return JSONResponse({"ready": False, "checks": {"startup": check}}, status_code=503)
    settings = state.settings
    checks: dict[str, str] = {}
    if settings.embedder_enabled:
        checks["embedder"] = "ok" if state.embedder is not None else "not loaded"
    if settings.reranker_enabled:
        checks["reranker"] = "ok" if state.reranker is not None else "not loaded"
    try:
        count = await asyncio.wait_for(state.run(state.base.backend.count), timeout=2.0)
        checks["backend"] = "ok"
        checks["products"] = str(count)
    except TimeoutError:
        checks["backend"] = "no answer within 2 s"
    except Exception as err:  # readiness reports, it never raises
        from middleware.server.errors import redact

        checks["backend"] = f"unreachable: {redact(str(err))[:200]}"
    ready = all(v == "ok" for k, v in checks.items() if k != "products")
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics", tags=["operations"])
async def metrics(request: Request) -> Response:
    state = get_state(request)
    state.metrics.in_flight.set(state.limiter.in_flight)
    if state.query_log is not None:
        for outcome in ("logged", "dropped", "failed"):
            state.metrics.query_log.labels(outcome).set(getattr(state.query_log, outcome))
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
