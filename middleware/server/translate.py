"""OpenSearch search bodies → SearchRequest, and SearchResponse → OpenSearch's response shape.

Pure functions, no I/O. A body the pipeline can answer carries user text (match, match_phrase,
multi_match, query_string, simple_query_string; also inside bool.must / bool.should) and filters the
Filters model can express (term/terms on brand/category, range on price, in_stock / stock > 0, ids).
Anything else raises `Unsupported` (the proxy passes it to the upstream cluster, or answers 400);
a bad parameter raises `ApiError` naming it (always 400).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from middleware.config import ServerSettings
from middleware.products import MAX_QUERY_CHARS, Filters
from middleware.schema import HighlightRequest, SearchRequest, SearchResponse
from middleware.server.aggs import Agg, CompletionSuggest, Unsupported, parse_aggs, parse_highlight, parse_suggest
from middleware.server.errors import ApiError

TEXT_QUERIES = ("match", "match_phrase", "multi_match", "query_string", "simple_query_string")
# keys refused unless passing scripts through is enabled: each runs code on the cluster
SCRIPT_KEYS = frozenset(
    {"script", "script_score", "script_fields", "scripted_metric", "_script", "runtime_mappings", "stored_script"}
)
# body keys that do not change which products come back or how they rank
HARMLESS_KEYS = frozenset({"track_total_hits", "timeout", "explain", "track_scores", "version"})
MAX_JSON_DEPTH = 64
MAX_DEADLINE_MS = 600_000.0  # SearchRequest's bound on deadline_ms


__all__ = ["Unsupported"]  # defined with the aggregations (they raise it too); caught by the proxy


# ----------------------------------------------------------------------------------------- safety


def json_depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return True


def find_script(value: Any, path: str = "") -> str | None:
    """The JSON path of the first script-bearing key, if any."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                here = f"{where}.{key}" if where else str(key)
                if key in SCRIPT_KEYS:
                    return here
                stack.append((child, here))
        elif isinstance(node, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(node))
    return None


def refuse_scripts(body: Any, server: ServerSettings) -> None:
    where = find_script(body)
    if where is not None and not server.allow_scripts:
        raise ApiError(
            400,
            "scripts are refused: they run code on the cluster (set server.allow_scripts to pass them to the upstream)",
            param=where,
            os_type="illegal_argument_exception",
        )


# ------------------------------------------------------------------------------------ index names

# OpenSearch index names: lower case, no \ / ? " < > | space , # : ; `*` is a wildcard
_INDEX_NAME = re.compile(r"^[a-z0-9*][a-z0-9_\-+.*]{0,254}$")


def parse_index_expression(expression: str, server: ServerSettings) -> list[str]:
    """The names in `a,b`, each valid and inside server.allowed_indices, else ApiError (400/403)."""
    names = [n for n in expression.split(",")]
    for name in names:
        if name.startswith("_") or name.startswith("-"):
            raise ApiError(
                403,
                f"index [{name}] is not allowed: name an index in server.allowed_indices",
                os_type="security_exception",
            )
        if not _INDEX_NAME.match(name) or name in {".", ".."} or ".." in name:
            raise ApiError(400, f"invalid index name [{name[:100]}]", os_type="invalid_index_name_exception")
        # a wildcard name is allowed when every index it can expand to is allowed
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in server.allowed_indices):
            raise ApiError(
                403,
                f"index [{name}] is not allowed (server.allowed_indices)",
                os_type="security_exception",
            )
    return names


def names_local_index(names: list[str], local: str) -> bool:
    return all(fnmatch.fnmatchcase(local, name) for name in names)


# ------------------------------------------------------------------------------------------ _source


@dataclass
class SourceFilter:
    enabled: bool = True
    includes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)

    def apply(self, doc: Mapping[str, Any]) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        if not self.includes and not self.excludes:
            return dict(doc)
        return _filter_source(doc, "", self.includes, self.excludes)


def _filter_source(doc: Mapping[str, Any], prefix: str, includes: list[str], excludes: list[str]) -> dict:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if any(fnmatch.fnmatchcase(path, p) for p in excludes):
            continue
        included = not includes or any(fnmatch.fnmatchcase(path, p) for p in includes)
        if isinstance(value, Mapping) and not included:
            # an include such as "attributes.color" reaches inside
            if any(p.startswith(path + ".") or p.startswith("*") for p in includes):
                inner = _filter_source(value, path + ".", includes, excludes)
                if inner:
                    out[key] = inner
            continue
        if included:
            out[key] = _filter_source(value, path + ".", [], excludes) if isinstance(value, Mapping) else value
    return out


def _str_list(value: Any, param: str) -> list[str]:
    if isinstance(value, str):
        return [v for v in value.split(",") if v]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ApiError(400, "must be a string or a list of strings", param=param)


def parse_source(body_value: Any, params: Mapping[str, str]) -> SourceFilter:
    sf = SourceFilter()
    value = body_value
    if value is None and "_source" in params:
        raw = params["_source"]
        value = {"true": True, "false": False}.get(raw.lower(), raw)
    if isinstance(value, bool):
        sf.enabled = value
    elif isinstance(value, (str, list)):
        sf.includes = _str_list(value, "_source")
    elif isinstance(value, dict):
        unknown = set(value) - {"includes", "excludes", "include", "exclude"}
        if unknown:
            raise ApiError(400, f"unknown key [{sorted(unknown)[0]}]", param="_source")
        sf.includes = _str_list(value.get("includes", value.get("include", [])), "_source.includes")
        sf.excludes = _str_list(value.get("excludes", value.get("exclude", [])), "_source.excludes")
    elif value is not None:
        raise ApiError(400, "must be a boolean, a string, a list or an object", param="_source")
    if "_source_includes" in params:
        sf.includes = _str_list(params["_source_includes"], "_source_includes")
    if "_source_excludes" in params:
        sf.excludes = _str_list(params["_source_excludes"], "_source_excludes")
    return sf


# ----------------------------------------------------------------------------------------- filters


class _FilterBuilder:
    def __init__(self) -> None:
        self.values: dict[str, set[str] | None] = {"brand": None, "category": None, "ids": None}
        self.price_min: float | None = None
        self.price_max: float | None = None
        self.in_stock: bool | None = None
        self.contradiction = False  # clauses no product can satisfy

    def any_of(self, name: str, values: list[Any]) -> None:
        found = {str(v) for v in values}
        current = self.values[name]
        merged = found if current is None else current & found
        if not merged:
            self.contradiction = True
        self.values[name] = merged

    def to_filters(self) -> dict[str, Any] | None:
        out: dict[str, Any] = {k: sorted(v) for k, v in self.values.items() if v is not None}
        if self.price_min is not None:
            out["price_min"] = self.price_min
        if self.price_max is not None:
            out["price_max"] = self.price_max
        if self.price_min is not None and self.price_max is not None and self.price_min > self.price_max:
            self.contradiction = True
            out.pop("price_min")
        if self.in_stock:
            out["in_stock"] = True
        return out or None


_FIELD = {"brand": "brand", "brand.keyword": "brand", "category": "category", "category.keyword": "category",
          "id": "ids", "id.keyword": "ids", "_id": "ids"}  # fmt: skip


def _single(clause: Any, kind: str) -> tuple[str, Any]:
    if not isinstance(clause, dict):
        raise ApiError(400, "must be an object", param=f"query.{kind}")
    fields = [k for k in clause if k not in {"boost", "_name"}]
    if len(fields) != 1:
        raise ApiError(400, "must name exactly one field", param=f"query.{kind}")
    return fields[0], clause[fields[0]]


def _add_filter(builder: _FilterBuilder, clause: Any, where: str) -> None:
    if not isinstance(clause, dict) or len(clause) != 1:
        raise ApiError(400, "each clause must be an object with one query type", param=where)
    kind, spec = next(iter(clause.items()))
    if kind == "match_all":
        return
    if kind in ("term", "terms"):
        name, value = _single(spec, kind)
        if kind == "term" and isinstance(value, dict):
            value = value.get("value")
        values = value if kind == "terms" else [value]
        if not isinstance(values, list) or any(isinstance(v, (dict, list)) or v is None for v in values):
            raise ApiError(400, "values must be scalars", param=f"{where}.{kind}.{name}")
        if name == "in_stock" and kind == "term":
            if values[0] is True or str(values[0]).lower() == "true":
                builder.in_stock = True
                return
            raise Unsupported("term in_stock: false (only-out-of-stock) is not a shopsearch filter")
        target = _FIELD.get(name)
        if target is None:
            raise Unsupported(f"{kind} filter on [{name}] is not a shopsearch filter")
        builder.any_of(target, values)
        return
    if kind == "ids":
        if not isinstance(spec, dict) or not isinstance(spec.get("values"), list):
            raise ApiError(400, "needs a list under values", param=f"{where}.ids")
        builder.any_of("ids", spec["values"])
        return
    if kind == "range":
        name, bounds = _single(spec, kind)
        if not isinstance(bounds, dict):
            raise ApiError(400, "must be an object of bounds", param=f"{where}.range.{name}")
        _add_range(builder, name, bounds, f"{where}.range.{name}")
        return
    if kind == "bool":
        if not isinstance(spec, dict):
            raise ApiError(400, "must be an object", param=f"{where}.bool")
        for key, sub in spec.items():
            if key in ("filter", "must"):
                for i, c in enumerate(sub if isinstance(sub, list) else [sub]):
                    _add_filter(builder, c, f"{where}.bool.{key}[{i}]")
            elif key in ("boost", "_name", "adjust_pure_negative") or (
                key in ("should", "must_not") and sub in ([], {})
            ):
                continue
            else:
                raise Unsupported(f"bool.{key} inside a filter is not a shopsearch filter")
        return
    raise Unsupported(f"filter clause [{kind}] is not a shopsearch filter")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ApiError(400, "must be a number", param=where)
    try:
        number = float(value)
    except ValueError:
        raise ApiError(400, "must be a number", param=where) from None
    if not math.isfinite(number):
        raise ApiError(400, "must be a finite number", param=where)
    return number


def _add_range(builder: _FilterBuilder, name: str, bounds: dict[str, Any], where: str) -> None:
    known = {"gte", "gt", "lte", "lt", "boost", "format"}
    if set(bounds) - known:
        raise Unsupported(f"range option [{sorted(set(bounds) - known)[0]}] on [{name}]")
    if name == "price":
        # Filters bounds are inclusive: a strict bound becomes the next float past it
        low = [_number(bounds[k], f"{where}.{k}") for k in ("gte",) if k in bounds]
        low += [math.nextafter(_number(bounds["gt"], f"{where}.gt"), math.inf)] if "gt" in bounds else []
        high = [_number(bounds[k], f"{where}.{k}") for k in ("lte",) if k in bounds]
        high += [math.nextafter(_number(bounds["lt"], f"{where}.lt"), -math.inf)] if "lt" in bounds else []
        for v in low:
            builder.price_min = max(v, builder.price_min) if builder.price_min is not None else v
        for v in high:
            builder.price_max = min(v, builder.price_max) if builder.price_max is not None else v
        if builder.price_max is not None and builder.price_max < 0:
            builder.contradiction = True
            builder.price_max = None
        if builder.price_min is not None and builder.price_min < 0:
            builder.price_min = None  # prices are never negative: no restriction
        return
    if name == "stock":
        in_stock_only = (set(bounds) - {"boost", "format"} == {"gt"} and _number(bounds["gt"], where) == 0) or (
            set(bounds) - {"boost", "format"} == {"gte"} and _number(bounds["gte"], where) == 1
        )
        if in_stock_only:
            builder.in_stock = True
            return
        raise Unsupported("range on stock other than gt 0 / gte 1 is not a shopsearch filter")
    raise Unsupported(f"range filter on [{name}] is not a shopsearch filter")


# ------------------------------------------------------------------------------------------ queries


def _text_of(kind: str, spec: Any, where: str) -> str:
    if kind in ("match", "match_phrase"):
        _, value = _single(spec, kind)
        if isinstance(value, dict):
            value = value.get("query")
    else:
        if not isinstance(spec, dict):
            raise ApiError(400, "must be an object", param=f"{where}.{kind}")
        value = spec.get("query")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ApiError(400, "query text must be a string", param=f"{where}.{kind}.query")
    return value


def _walk_query(query: Any, texts: list[str], builder: _FilterBuilder, where: str) -> None:
    if not isinstance(query, dict) or len(query) != 1:
        raise ApiError(400, "must be an object with exactly one query type", param=where)
    kind, spec = next(iter(query.items()))
    if kind in TEXT_QUERIES:
        texts.append(_text_of(kind, spec, where))
        return
    if kind == "bool":
        if not isinstance(spec, dict):
            raise ApiError(400, "must be an object", param=f"{where}.bool")
        for key, sub in spec.items():
            clauses = sub if isinstance(sub, list) else [sub]
            if key == "must":
                for i, c in enumerate(clauses):
                    if isinstance(c, dict) and len(c) == 1 and next(iter(c)) in (*TEXT_QUERIES, "bool"):
                        _walk_query(c, texts, builder, f"{where}.bool.must[{i}]")
                    else:
                        _add_filter(builder, c, f"{where}.bool.must[{i}]")
            elif key == "should":
                for i, c in enumerate(clauses):
                    if isinstance(c, dict) and len(c) == 1 and next(iter(c)) in TEXT_QUERIES:
                        _walk_query(c, texts, builder, f"{where}.bool.should[{i}]")
                    else:
                        raise Unsupported("bool.should may only hold text queries for the pipeline")
            elif key == "filter":
                for i, c in enumerate(clauses):
                    _add_filter(builder, c, f"{where}.bool.filter[{i}]")
            elif key == "must_not":
                if clauses not in ([], [{}]):
                    raise Unsupported("bool.must_not is not a shopsearch filter")
            elif key in ("minimum_should_match", "boost", "_name", "adjust_pure_negative"):
                continue
            else:
                raise ApiError(400, f"unknown bool key [{key}]", param=f"{where}.bool.{key}")
        return
    if kind in ("term", "terms", "range", "ids", "match_all"):
        _add_filter(builder, query, where)
        return
    raise Unsupported(f"query type [{kind}] is not answered by the shopsearch pipeline")


# ---------------------------------------------------------------------------------------- requests


@dataclass
class Translated:
    request: SearchRequest
    source: SourceFilter
    matches_nothing: bool = False  # contradictory filters: answer zero hits without searching
    track_total_hits: bool | int = True
    aggs: list[Agg] | None = None  # answered over the response's match set (aggs.run_aggs)
    suggest: list[CompletionSuggest] | None = None


def filter_clause(clause: Any, where: str) -> tuple[Filters | None, bool]:
    """One filter clause (a filter aggregation's) as Filters, and whether it can match nothing."""
    builder = _FilterBuilder()
    _add_filter(builder, clause, where)
    found = builder.to_filters()
    return (Filters(**found) if found else None), builder.contradiction


def _int_param(value: Any, param: str) -> int:
    if isinstance(value, bool):
        raise ApiError(400, "must be a non-negative integer", param=param)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, "must be a non-negative integer", param=param) from None
    if isinstance(value, float) and not value.is_integer():
        raise ApiError(400, "must be a non-negative integer", param=param)
    if number < 0:
        raise ApiError(400, "must be a non-negative integer", param=param)
    return number


_TIME = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(nanos|micros|ms|s|m|h|d)?\s*$")
_TIME_MS = {"nanos": 1e-6, "micros": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0,
            "d": 86_400_000.0, None: 1.0}  # fmt: skip


def parse_time_ms(value: Any, param: str) -> float:
    """OpenSearch time values: "300ms", "1s", "2m" (a bare number is milliseconds)."""
    match = _TIME.match(str(value))
    if isinstance(value, bool) or match is None:
        raise ApiError(400, 'must be a time value such as "300ms" or "2s"', param=param)
    ms = float(match.group(1)) * _TIME_MS[match.group(2)]
    if ms <= 0:
        raise ApiError(400, "must be greater than 0", param=param)
    return ms


def _sort_is_score(sort: Any) -> bool:
    items = sort if isinstance(sort, list) else [sort]
    for item in items:
        if item == "_score":
            continue
        if isinstance(item, dict) and list(item) == ["_score"]:
            order = item["_score"]
            if order == "desc" or (isinstance(order, dict) and order.get("order", "desc") == "desc"):
                continue
        return False
    return True


def translate_search(
    body: Mapping[str, Any] | None,
    params: Mapping[str, str],
    server: ServerSettings,
    *,
    default_deadline_ms: float | None = None,
) -> Translated:
    """A SearchRequest for the pipeline, or Unsupported / ApiError."""
    body = dict(body or {})  # the routes have checked it is a JSON object
    refuse_scripts(body, server)
    # paging applies to every search, answered here or upstream
    size = _int_param(body["size"], "size") if "size" in body else _int_param(params.get("size", 10), "size")
    from_ = _int_param(body["from"], "from") if "from" in body else _int_param(params.get("from", 0), "from")
    if size > server.max_size:
        raise ApiError(400, f"must be at most {server.max_size} (server.max_size)", param="size")
    if from_ > server.max_from:
        raise ApiError(400, f"must be at most {server.max_from} (server.max_from)", param="from")
    source = parse_source(body.get("_source"), params)

    for key in body:
        if key in {"query", "size", "from", "_source", "sort", "aggs", "aggregations", "highlight", "suggest"}:
            continue
        if key in HARMLESS_KEYS:
            continue
        raise Unsupported(f"[{key}] is not answered by the shopsearch pipeline")
    if "sort" in body and not _sort_is_score(body["sort"]):
        raise Unsupported("sorting by anything but _score is not answered by the shopsearch pipeline")
    if "sort" in params and params["sort"] not in ("_score", "_score:desc"):
        raise Unsupported("sorting by anything but _score is not answered by the shopsearch pipeline")

    texts: list[str] = []
    builder = _FilterBuilder()
    if "query" in body:
        _walk_query(body["query"], texts, builder, "query")
    elif "q" in params:
        texts.append(params["q"])
    text = " ".join(t.strip() for t in texts if t.strip())
    if not text:
        raise Unsupported("the query carries no user text (match, multi_match, query_string, simple_query_string)")
    filters = builder.to_filters()
    if "aggs" in body and "aggregations" in body:
        raise ApiError(400, "give aggs or aggregations, not both", param="aggregations")
    aggs_key = "aggs" if "aggs" in body else "aggregations"
    aggs = parse_aggs(body[aggs_key], aggs_key, filter_clause) if aggs_key in body else None
    highlight: HighlightRequest | None = None
    if "highlight" in body:
        tags, fields = parse_highlight(body["highlight"])
        highlight = HighlightRequest(
            pre_tag=tags.pre,
            post_tag=tags.post,
            fragment_size=tags.fragment_chars,
            number_of_fragments=tags.fragments,
            fields=fields,
        )
    suggest = parse_suggest(body["suggest"]) if "suggest" in body else None

    deadline_ms = default_deadline_ms
    timeout = body.get("timeout", params.get("timeout"))
    if timeout is not None:
        # OpenSearch accepts any timeout ("20m"); above max_deadline_ms the route answers 400 naming it
        deadline_ms = min(parse_time_ms(timeout, "timeout"), MAX_DEADLINE_MS)
    explain = body.get("explain", params.get("explain", False))
    explain = explain is True or str(explain).lower() == "true"
    try:
        request = SearchRequest.model_validate(
            {
                "query": text[:MAX_QUERY_CHARS],  # longer text is cut, never refused
                "filters": filters,
                "from": from_,
                "size": size,
                "explain": explain,
                "deadline_ms": deadline_ms,
                "highlight": highlight if highlight is not None else False,
            }
        )
    except ValidationError as err:  # a value the proxy let through but the model bounds: 400, never 500
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, str(first["msg"]).removeprefix("Value error, "), param=param) from None
    return Translated(
        request=request,
        source=source,
        matches_nothing=builder.contradiction,
        track_total_hits=body.get("track_total_hits", True),
        aggs=aggs,
        suggest=suggest,
    )


# ---------------------------------------------------------------------------------------- responses


def search_response(
    resp: SearchResponse | None,
    translated: Translated,
    *,
    index: str,
    took_ms: float,
    retrieve_n: int,
) -> dict[str, Any]:
    """OpenSearch's search response for the pipeline's answer (None: nothing can match)."""
    hits: list[dict[str, Any]] = []
    total = 0
    if resp is not None:
        total = resp.total
        for hit in resp.hits:
            doc: dict[str, Any] = {"_index": index, "_id": hit.id, "_score": hit.score}
            source = translated.source.apply(hit.product)
            if source is not None:
                doc["_source"] = source
            if hit.highlight:
                doc["highlight"] = hit.highlight
            if hit.explain is not None:
                doc["_explanation"] = {
                    "value": hit.score,
                    "description": "shopsearch per-stage scores",
                    "details": [],
                    "shopsearch": hit.explain.model_dump(),
                }
            hits.append(doc)
    relation = resp.relation if resp is not None else "eq"
    max_score = max((h["_score"] for h in hits), default=None)
    return {
        "took": round(took_ms),
        "timed_out": False,
        "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
        "hits": {"total": {"value": total, "relation": relation}, "max_score": max_score, "hits": hits},
    }
