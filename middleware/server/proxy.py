"""The drop-in OpenSearch proxy: an existing OpenSearch client points here instead of the cluster.

- `/{index}/_search` with user text (match, multi_match, query_string, …) runs the shopsearch pipeline and
  answers in OpenSearch's response shape; other searches go to the upstream cluster unchanged
  (`server.upstream_url`; with the OpenSearch backend, its cluster), or get 400 without one.
- With the embedded backend the service answers `/`, `_count`, `_doc`, `_mget`, `_cluster/health`,
  `_cat/indices` itself for `server.index_name`; otherwise read-only requests pass through.
- Index names are checked against `server.allowed_indices`; write and admin endpoints are refused (403)
  unless `server.enable_writes`; scripts are refused unless `server.allow_scripts`.
Errors use OpenSearch's shape: {"error": {"root_cause", "type", "reason"}, "status"}.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from middleware import __version__
from middleware.products import Filters
from middleware.schema import SearchRequest, SearchResponse
from middleware.server.aggs import run_aggs, suggest_section
from middleware.server.errors import ApiError
from middleware.server.limits import capped_deadline_ms
from middleware.server.requirements import allowed_ids, excluded_ids
from middleware.server.state import ServiceState, get_state
from middleware.server.translate import (
    Translated,
    Unsupported,
    count_request,
    json_depth_ok,
    names_local_index,
    parse_index_expression,
    parse_source,
    refuse_scripts,
    search_response,
    translate_search,
)

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

# an OpenSearch 2.x version: clients check `version.distribution` and accept 1.x–3.x numbers
COMPAT_VERSION = "2.19.1"
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


# ------------------------------------------------------------------------------------------- helpers


async def _json_body(request: Request) -> tuple[bytes, Any]:
    raw = await request.body()
    if not raw.strip():
        return raw, None
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply", os_type="parse_exception") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON: {str(err)[:200]}", os_type="parse_exception") from None
    if not json_depth_ok(body):
        raise ApiError(400, "the body is nested too deeply", os_type="parse_exception")
    return raw, body


def _params(request: Request) -> dict[str, str]:
    return dict(request.query_params)


def _answers_locally(state: ServiceState) -> bool:
    return state.settings.backend == "embedded"


def _local_names(state: ServiceState, names: list[str]) -> bool:
    local = state.settings.server.index_name
    if _answers_locally(state):
        return names_local_index(names, local)
    return names == [local]


def _index_path(names: list[str], *rest: str) -> str:
    parts = [",".join(names), *rest]
    return "/" + "/".join(quote(p, safe=",*") for p in parts)


async def _forward_or(
    state: ServiceState, request: Request, path: str, raw: bytes | None, missing: ApiError
) -> Response:
    if state.upstream is None:
        raise missing
    return await state.upstream.forward(
        request.method, path, list(request.query_params.multi_items()), raw, request.headers
    )


def _no_index(names: list[str]) -> ApiError:
    return ApiError(404, f"no such index [{','.join(names)}]", os_type="index_not_found_exception")


def _cluster_uuid(state: ServiceState) -> str:
    return hashlib.sha1(str(state.settings.data_dir.resolve()).encode()).hexdigest()[:22]


# -------------------------------------------------------------------------------------------- routes


@router.api_route("/", methods=["GET", "HEAD"])
async def info(request: Request) -> Response:
    state = get_state(request)
    if not _answers_locally(state):
        return await _forward_or(state, request, "/", None, ApiError(404, "no upstream"))
    return JSONResponse(
        {
            "name": "shopsearch",
            "cluster_name": "shopsearch",
            "cluster_uuid": _cluster_uuid(state),
            "version": {
                "distribution": "opensearch",
                "number": COMPAT_VERSION,
                "build_type": "shopsearch",
                "build_hash": "shopsearch-" + __version__,
                "build_date": "2025-01-01T00:00:00.000000Z",
                "build_snapshot": False,
                "lucene_version": "9.12.1",
                "minimum_wire_compatibility_version": "7.10.0",
                "minimum_index_compatibility_version": "7.0.0",
            },
            "tagline": "The OpenSearch Project: https://opensearch.org/",
            "shopsearch": {"version": __version__, "backend": state.settings.backend},
        }
    )


@router.api_route("/_search", methods=["GET", "POST"])
async def search_everything(request: Request) -> Response:
    raise ApiError(403, "searching every index is not allowed: name an index in the path", os_type="security_exception")


@router.api_route("/{index}/_search", methods=["GET", "POST"])
async def search(index: str, request: Request) -> Response:
    started = time.perf_counter()
    state = get_state(request)
    server = state.settings.server
    names = parse_index_expression(index, server)
    raw, body = await _json_body(request)
    if body is not None and not isinstance(body, dict):
        raise ApiError(400, "the search body must be a JSON object", os_type="parse_exception")
    params = _params(request)
    refuse_scripts(body, server)
    ubi, body = ubi_request(body)
    try:
        translated = translate_search(
            body, params, server, default_deadline_ms=capped_deadline_ms(state.settings, None)
        )
    except Unsupported as why:
        missing = ApiError(
            400,
            f"{why}; shopsearch answers searches with user text itself and passes others to an upstream "
            "OpenSearch (server.upstream_url), which is not configured",
        )
        return await _forward_or(state, request, _index_path(names, "_search"), raw, missing)
    if not _local_names(state, names) or _browse_goes_upstream(state, translated):
        return await _forward_or(state, request, _index_path(names, "_search"), raw, _no_index(names))

    translated = await _resolved(state, translated)
    req = translated.request
    req = _within_deadline_cap(state, req)
    if ubi is not None and ubi.get("client_id") and req.user_id is None:
        req = req.model_copy(update={"user_id": ubi["client_id"]})
    resp: SearchResponse | None = None
    if not translated.matches_nothing:
        ubi_ids = {"query_id": ubi.get("query_id"), "user_query": ubi.get("user_query")} if ubi else {}
        resp = await state.search(req, **ubi_ids)
    extras = await _extras(state, resp, translated)
    if ubi is not None:  # as OpenSearch's UBI plugin answers: the id events name this search by
        extras["ext"] = {"ubi": {"query_id": resp.query_id if resp is not None else ubi.get("query_id")}}
    return _search_answer(state, resp, translated, index=server.index_name, started=started, extras=extras)


UBI_FIELDS = {
    "query_id": 128,
    "client_id": 256,
    "user_query": 10_000,
    "object_id_field": 256,
    "application": 256,
}


def ubi_request(body: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """OpenSearch UBI's `ext.ubi` (query_id, client_id, user_query, ...), taken out of the body.

    A body whose `ext` holds anything else is left whole (the translation refuses `ext` by name).
    `query_attributes` is accepted and not logged."""
    if not body or not isinstance(body.get("ext"), dict) or set(body["ext"]) != {"ubi"}:
        return None, body
    ubi = body["ext"]["ubi"]
    if not isinstance(ubi, dict):
        raise ApiError(400, "must be an object", param="ext.ubi")
    for key, value in ubi.items():
        if key == "query_attributes":
            if not isinstance(value, dict):
                raise ApiError(400, "must be an object", param="ext.ubi.query_attributes")
            continue
        limit = UBI_FIELDS.get(key)
        if limit is None:
            raise ApiError(400, "unknown field of OpenSearch UBI's ext.ubi", param=f"ext.ubi.{key}")
        if not isinstance(value, str) or not 1 <= len(value) <= limit:
            raise ApiError(400, f"must be a string of 1 to {limit} characters", param=f"ext.ubi.{key}")
    return ubi, {k: v for k, v in body.items() if k != "ext"}


def _browse_goes_upstream(state: ServiceState, translated: Translated) -> bool:
    """A body without user text is the cluster's to answer when there is one (the pipeline browses otherwise)."""
    return not translated.request.query and state.upstream is not None


async def _resolved(state: ServiceState, translated: Translated) -> Translated:
    """Lexical requirements (operator and, phrases, prefixes, fuzziness) as the ids the search may return,
    and must_not text clauses as the ids it must leave out."""
    backend = state.base.backend

    async def narrowed(
        req: SearchRequest, requirements: list[Any], negatives: list[Any], nothing: bool
    ) -> tuple[SearchRequest, bool]:
        if nothing or not (requirements or negatives):
            return req, nothing
        base = req.filters if req.filters is not None else Filters()
        if negatives:
            excluded = await state.admitted(excluded_ids, backend, negatives, req.filters)
            if excluded:
                clauses = [*(base.exclude or ()), Filters(ids=excluded)]
                base = base.model_copy(update={"exclude": clauses})
        if requirements:
            ids = await state.admitted(allowed_ids, backend, requirements, base)
            if not ids:
                return req, True
            base = base.model_copy(update={"ids": ids})
        return req.model_copy(update={"filters": base}), False

    request, nothing = await narrowed(
        translated.request, translated.requirements, translated.negatives, translated.matches_nothing
    )
    update: dict[str, Any] = {"request": request, "matches_nothing": nothing, "requirements": [], "negatives": []}
    if translated.agg_request is not None:
        agg, agg_nothing = await narrowed(
            translated.agg_request,
            translated.agg_requirements,
            translated.agg_negatives,
            translated.agg_matches_nothing,
        )
        update |= {"agg_request": agg, "agg_matches_nothing": agg_nothing}
    return dataclasses.replace(translated, **update)


async def _extras(state: ServiceState, resp: SearchResponse | None, translated: Translated) -> dict[str, Any]:
    """The `aggregations` and `suggest` sections, over the set the response counted."""
    out: dict[str, Any] = {}
    backend = state.base.backend
    if translated.aggs is not None:
        match = resp._match if resp is not None else None
        if translated.agg_request is not None:  # post_filter narrowed the hits, not the aggregations
            whole = None if translated.agg_matches_nothing else await state.search(translated.agg_request, served=False)
            match = whole._match if whole is not None else None
        out["aggregations"] = await state.admitted(run_aggs, backend, match, translated.aggs)
    if translated.suggest is not None:
        out["suggest"] = await state.admitted(suggest_section, backend, state.popular, translated.suggest)
    return out


def _within_deadline_cap(state: ServiceState, req: SearchRequest) -> SearchRequest:
    """`timeout` is OpenSearch's best-effort bound: above max_deadline_ms the search runs within the cap."""
    deadline_ms = capped_deadline_ms(state.settings, req.deadline_ms, "timeout", refuse_above=False)
    return req.model_copy(update={"deadline_ms": deadline_ms})


def _search_answer(
    state: ServiceState,
    resp: SearchResponse | None,
    translated: Translated,
    *,
    index: str,
    started: float,
    extras: dict[str, Any] | None = None,
) -> JSONResponse:
    took_ms = (time.perf_counter() - started) * 1000.0
    retrieve_n = translated.request.retrieve_n or state.settings.retrieve_n
    body = search_response(resp, translated, index=index, took_ms=took_ms, retrieve_n=retrieve_n)
    body.update(extras or {})
    headers: dict[str, str] = {}
    if resp is not None:
        body["timed_out"] = bool(resp.degraded)  # part of the work was skipped: an incomplete answer
        if resp.degraded:
            headers["x-shopsearch-degraded"] = ",".join(resp.degraded)
        headers["server-timing"] = ", ".join(f"{k};dur={v:.3f}" for k, v in resp.timings_ms.items())
    return JSONResponse(body, headers=headers)


MAX_MSEARCH = 50  # searches in one _msearch body


@router.api_route("/_msearch", methods=["GET", "POST"])
async def msearch_any(request: Request) -> Response:
    return await _msearch(request, None)


@router.api_route("/{index}/_msearch", methods=["GET", "POST"])
async def msearch_index(index: str, request: Request) -> Response:
    return await _msearch(request, index)


def _error_item(err: ApiError) -> dict[str, Any]:
    cause = {"type": err.os_type, "reason": f"[{err.param}] {err.message}" if err.param else err.message}
    return {"error": {"root_cause": [cause], **cause}, "status": err.status}


async def _msearch(request: Request, index: str | None) -> Response:
    """NDJSON header/body pairs. Answered here when every search has user text for the local index,
    else the whole body goes to the upstream (or, without one, those searches get a 400 item)."""
    started = time.perf_counter()
    state = get_state(request)
    server = state.settings.server
    raw = await request.body()
    lines = [line for line in raw.decode("utf-8", "replace").splitlines() if line.strip()]
    if len(lines) % 2:
        raise ApiError(400, "an msearch body is header/body line pairs", param="body", os_type="parse_exception")
    if len(lines) // 2 > MAX_MSEARCH:
        raise ApiError(400, f"at most {MAX_MSEARCH} searches per request", param="body")
    plans: list[tuple[list[str], Translated | ApiError | Unsupported]] = []
    for i in range(0, len(lines), 2):
        try:
            header, body = json.loads(lines[i]), json.loads(lines[i + 1])
        except (ValueError, RecursionError):
            raise ApiError(400, f"line {i + 1}: not valid JSON", param="body", os_type="parse_exception") from None
        if not isinstance(header, dict) or not isinstance(body, dict) or not json_depth_ok(body):
            raise ApiError(400, f"line {i + 1}: header and body must be JSON objects", param="body")
        refuse_scripts(body, server)
        target = header.get("index", index)
        if isinstance(target, list):
            target = ",".join(str(t) for t in target)
        if not isinstance(target, str) or not target:
            raise ApiError(400, f"line {i + 1}: no index named", param="index")
        names = parse_index_expression(target, server)
        try:
            translated = translate_search(
                body, {}, server, default_deadline_ms=capped_deadline_ms(state.settings, None)
            )
            if not _local_names(state, names) or _browse_goes_upstream(state, translated):
                plans.append((names, Unsupported("not the local index, or no user text")))
                continue
            translated = await _resolved(state, translated)
            translated.request = _within_deadline_cap(state, translated.request)
            plans.append((names, translated))
        except (ApiError, Unsupported) as err:
            plans.append((names, err))
    if any(isinstance(p, Unsupported) for _, p in plans) and state.upstream is not None:
        path = "/_msearch" if index is None else _index_path(parse_index_expression(index, server), "_msearch")
        return await state.upstream.forward(
            request.method, path, list(request.query_params.multi_items()), raw, request.headers
        )

    async def answer(plan: Translated | ApiError | Unsupported) -> dict[str, Any]:
        if isinstance(plan, ApiError):
            return _error_item(plan)
        if isinstance(plan, Unsupported):
            return _error_item(ApiError(400, f"{plan}; no upstream OpenSearch configured (server.upstream_url)"))
        try:
            resp = None if plan.matches_nothing else await state.search(plan.request)
            extras = await _extras(state, resp, plan)
        except ApiError as err:
            return _error_item(err)
        answer = _search_answer(state, resp, plan, index=server.index_name, started=time.perf_counter(), extras=extras)
        item = json.loads(answer.body)
        return {**item, "status": 200}

    responses = await asyncio.gather(*(answer(p) for _, p in plans))
    return JSONResponse({"took": round((time.perf_counter() - started) * 1000.0), "responses": list(responses)})


@router.api_route("/{index}/_count", methods=["GET", "POST"])
async def count(index: str, request: Request) -> Response:
    state = get_state(request)
    names = parse_index_expression(index, state.settings.server)
    raw, body = await _json_body(request)
    refuse_scripts(body, state.settings.server)
    path = _index_path(names, "_count")
    if not (_answers_locally(state) and _local_names(state, names)):
        return await _forward_or(state, request, path, raw, _no_index(names))
    if body is not None and not isinstance(body, dict):
        raise ApiError(400, "the count body must be a JSON object", os_type="parse_exception")
    plain = isinstance(body, dict) and set(body) <= {"query"} and body.get("query") in (None, {"match_all": {}})
    shards = {"total": 1, "successful": 1, "skipped": 0, "failed": 0}
    if "q" not in request.query_params and (body is None or plain) and not request.query_params:
        total = await state.admitted(state.base.backend.count)
        return JSONResponse({"count": total, "_shards": shards})
    try:
        translated = count_request(body, _params(request), state.settings.server)
    except Unsupported as why:
        missing = ApiError(400, f"{why}; no upstream OpenSearch configured (server.upstream_url)")
        return await _forward_or(state, request, path, raw, missing)
    if _browse_goes_upstream(state, translated):
        return await _forward_or(state, request, path, raw, _no_index(names))
    translated = await _resolved(state, translated)
    resp = (
        None
        if translated.matches_nothing
        else await state.search(_within_deadline_cap(state, translated.request), served=False)
    )
    return JSONResponse({"count": resp.total if resp is not None else 0, "_shards": shards})


def _doc_answer(index: str, doc_id: str, product: dict[str, Any] | None, source_filter: Any) -> dict:
    if product is None:
        return {"_index": index, "_id": doc_id, "found": False}
    out: dict[str, Any] = {"_index": index, "_id": doc_id, "_version": 1, "_seq_no": 0, "_primary_term": 1}
    out["found"] = True
    source = source_filter.apply(product)
    if source is not None:
        out["_source"] = source
    return out


# `:path`: an id may hold "/" (sent as %2F, which the server decodes before routing)
@router.api_route("/{index}/_doc/{doc_id:path}", methods=["GET", "HEAD"])
async def get_doc(index: str, doc_id: str, request: Request) -> Response:
    state = get_state(request)
    names = parse_index_expression(index, state.settings.server)
    if len(names) != 1 or "*" in names[0]:
        raise ApiError(400, "a document is read from one index", param="index")
    if not (_answers_locally(state) and _local_names(state, names)):
        return await _forward_or(state, request, _index_path(names, "_doc", doc_id), None, _no_index(names))
    source = parse_source(None, _params(request))
    found = await state.admitted(state.base.backend.get, [doc_id])
    product = found[0].model_dump(mode="json") if found else None
    body = _doc_answer(state.settings.server.index_name, doc_id, product, source)
    return JSONResponse(body, status_code=200 if found else 404)


@router.api_route("/{index}/_source/{doc_id:path}", methods=["GET", "HEAD"])
async def get_source(index: str, doc_id: str, request: Request) -> Response:
    state = get_state(request)
    names = parse_index_expression(index, state.settings.server)
    if not (_answers_locally(state) and _local_names(state, names)):
        return await _forward_or(state, request, _index_path(names, "_source", doc_id), None, _no_index(names))
    found = await state.admitted(state.base.backend.get, [doc_id])
    if not found:
        raise ApiError(404, f"document [{doc_id[:200]}] not found", os_type="resource_not_found_exception")
    source = parse_source(None, _params(request)).apply(found[0].model_dump(mode="json"))
    return JSONResponse(source or {})


@router.api_route("/_mget", methods=["GET", "POST"])
async def mget_any(request: Request) -> Response:
    return await _mget(request, None)


@router.api_route("/{index}/_mget", methods=["GET", "POST"])
async def mget_index(index: str, request: Request) -> Response:
    return await _mget(request, index)


async def _mget(request: Request, index: str | None) -> Response:
    state = get_state(request)
    server = state.settings.server
    raw, body = await _json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "an mget body is an object with docs or ids", param="body")
    default = parse_index_expression(index, server) if index is not None else None
    wanted: list[tuple[str | None, str]] = []
    if isinstance(body.get("ids"), list):
        wanted = [(index, str(i)) for i in body["ids"]]
    elif isinstance(body.get("docs"), list):
        for i, doc in enumerate(body["docs"]):
            if not isinstance(doc, dict) or "_id" not in doc:
                raise ApiError(400, "each doc needs an _id", param=f"docs[{i}]")
            wanted.append((doc.get("_index", index), str(doc["_id"])))
    else:
        raise ApiError(400, "an mget body needs docs or ids", param="body")
    if not wanted:
        raise ApiError(400, "no documents asked for", param="docs")
    if len(wanted) > server.max_mget_docs:
        field = "ids" if isinstance(body.get("ids"), list) else "docs"
        raise ApiError(
            400,
            f"{len(wanted)} documents asked for; at most {server.max_mget_docs} (server.max_mget_docs)",
            param=field,
        )
    for i, (name, _) in enumerate(wanted):
        if name is None:
            raise ApiError(400, "no index named for the document", param=f"docs[{i}]._index")
        parse_index_expression(name, server)
    local = _answers_locally(state) and all(_local_names(state, [n or ""]) for n, _ in wanted)
    if not local:
        path = "/_mget" if default is None else _index_path(default, "_mget")
        return await _forward_or(state, request, path, raw, _no_index([n or "" for n, _ in wanted]))
    source = parse_source(body.get("_source"), _params(request))
    ids = [doc_id for _, doc_id in wanted]
    products = {p.id: p.model_dump(mode="json") for p in await state.admitted(state.base.backend.get, ids)}
    docs = [_doc_answer(server.index_name, doc_id, products.get(doc_id), source) for doc_id in ids]
    return JSONResponse({"docs": docs})


@router.api_route("/_cluster/health", methods=["GET"])
async def cluster_health(request: Request) -> Response:
    return await _health(request, None)


@router.api_route("/_cluster/health/{index}", methods=["GET"])
async def cluster_health_index(index: str, request: Request) -> Response:
    return await _health(request, index)


async def _health(request: Request, index: str | None) -> Response:
    state = get_state(request)
    names = parse_index_expression(index, state.settings.server) if index is not None else None
    if not _answers_locally(state) or (names is not None and not _local_names(state, names)):
        path = "/_cluster/health" + ("" if names is None else "/" + quote(",".join(names), safe=",*"))
        return await _forward_or(state, request, path, None, _no_index(names or []))
    return JSONResponse(
        {
            "cluster_name": "shopsearch",
            "status": "green",
            "timed_out": False,
            "number_of_nodes": 1,
            "number_of_data_nodes": 1,
            "discovered_master": True,
            "discovered_cluster_manager": True,
            "active_primary_shards": 1,
            "active_shards": 1,
            "relocating_shards": 0,
            "initializing_shards": 0,
            "unassigned_shards": 0,
            "delayed_unassigned_shards": 0,
            "number_of_pending_tasks": 0,
            "number_of_in_flight_fetch": 0,
            "task_max_waiting_in_queue_millis": 0,
            "active_shards_percent_as_number": 100.0,
        }
    )


@router.api_route("/_cat/{what:path}", methods=["GET"])
async def cat(what: str, request: Request) -> Response:
    state = get_state(request)
    parts = [p for p in what.split("/") if p]
    if not _answers_locally(state) or not parts or parts[0] != "indices":
        if parts and parts[0] not in {"indices", "count", "health", "aliases", "shards", "nodes", "segments"}:
            raise ApiError(403, f"_cat/{parts[0][:50]} is not a read endpoint the proxy serves")
        if parts and parts[0] in {"indices", "count", "aliases", "shards", "segments"}:
            # _cat/count/<expr> names indexes (aliases for _cat/aliases): the allowed set applies here too,
            # and without one OpenSearch answers for every index: scope it to the allowed set
            for part in parts[1:]:
                parse_index_expression(part, state.settings.server)
            if len(parts) == 1:
                parts.append(",".join(state.settings.server.allowed_indices))
        elif len(parts) > 1:
            raise ApiError(400, f"_cat/{parts[0][:50]} takes no index", param="path")
        path = "/_cat/" + "/".join(quote(p, safe=",*") for p in parts)
        return await _forward_or(state, request, path, None, ApiError(404, "only _cat/indices is answered here"))
    if len(parts) > 2:
        raise ApiError(400, "_cat/indices takes one index expression", param="index")
    if len(parts) == 2:
        names = parse_index_expression(parts[1], state.settings.server)
        if not _local_names(state, names):
            raise _no_index(names)
    stats = await state.admitted(state.base.backend.stats)
    total = await state.admitted(state.base.backend.count)
    size = str(stats.size_bytes)
    row = {
        "health": "green",
        "status": "open",
        "index": state.settings.server.index_name,
        "uuid": _cluster_uuid(state),
        "pri": "1",
        "rep": "0",
        "docs.count": str(total),
        "docs.deleted": "0",
        "store.size": size,
        "pri.store.size": size,
    }
    if request.query_params.get("format") == "json":
        return JSONResponse([row])
    line = " ".join(row.values())
    if request.query_params.get("v") in ("", "true"):
        line = " ".join(row.keys()) + "\n" + line
    return PlainTextResponse(line + "\n")


@router.api_route("/{index}", methods=["GET", "HEAD"])
async def index_info(index: str, request: Request) -> Response:
    state = get_state(request)
    names = parse_index_expression(index, state.settings.server)
    if not (_answers_locally(state) and _local_names(state, names)):
        return await _forward_or(state, request, _index_path(names), None, _no_index(names))
    name = state.settings.server.index_name
    return JSONResponse({name: {"aliases": {}, "mappings": {}, "settings": {"index": {"number_of_shards": "1"}}}})


@router.api_route("/{path:path}", methods=ALL_METHODS)
async def everything_else(path: str, request: Request) -> Response:
    """Write and admin endpoints: refused unless server.enable_writes, then passed to the upstream."""
    state = get_state(request)
    server = state.settings.server
    shown = f"{request.method} /{path[:200]}"
    if not server.enable_writes:
        raise ApiError(
            403,
            f"write and admin endpoints are refused by the shopsearch proxy: {shown} (server.enable_writes)",
            os_type="security_exception",
        )
    # segments from the raw path: an id holding "/" (sent as %2F) stays one segment upstream
    raw_path: bytes = request.scope.get("raw_path") or quote(path).encode()
    raw_segments = raw_path.split(b"?")[0].split(b"/")
    segments = [unquote_to_bytes(s).decode("utf-8", "replace") for s in raw_segments if s]
    if any(part in {".", ".."} for s in segments for part in s.split("/")):
        raise ApiError(400, "path segments . and .. are not allowed", param="path")
    if segments and not segments[0].startswith("_"):
        parse_index_expression(segments[0], server)
    raw, body = await _json_body(request)
    refuse_scripts(body, server)
    upstream_path = "/" + "/".join(quote(s, safe=",*") for s in segments)
    missing = ApiError(400, f"{shown}: no upstream OpenSearch configured (server.upstream_url)")
    return await _forward_or(state, request, upstream_path, raw, missing)
