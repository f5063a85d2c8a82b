"""OpenSearch `aggs`, `highlight` and completion `suggest` sections, answered over the pipeline's match set.

Aggregations answered here: terms (brand, category), range, min / max / avg / sum / stats (price, sales,
stock), filter and filters (with sub-aggregations of these kinds). They count over the products the
search's response counts (its lexical matches after filters plus its vector hits), as OpenSearch's aggs
count over the query's matches. Any other aggregation type, option or field raises `Unsupported`
naming it: the proxy passes the search to the upstream cluster, or answers 400 without one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from middleware import storefront
from middleware.backends.base import NUMERIC_FACET_FIELDS, Backend, FacetSpec, HighlightTags, MatchSet
from middleware.products import Filters
from middleware.server.errors import ApiError

MAX_AGGS = 50  # aggregations in one body, sub-aggregations included
_NAME = re.compile(r"^[^\[\]>]{1,100}$")  # OpenSearch: no [ ] > in an aggregation name
_TERM_FIELDS = {"brand": "brand", "brand.keyword": "brand", "category": "category", "category.keyword": "category"}
_METRICS = ("min", "max", "avg", "sum", "stats")


class Unsupported(Exception):
    """The body asks for something the pipeline does not answer; the reason says what."""


@dataclass
class Agg:
    name: str
    kind: str  # terms | range | min | max | avg | sum | stats | filter | filters
    target: str | None = None  # the product field
    size: int = 10
    ranges: list[tuple[float | None, float | None, str | None]] = field(default_factory=list)
    filters: Filters | None = None  # filter: the clause; empty Filters: match everything
    contradiction: bool = False
    named: dict[str, tuple[Filters | None, bool]] | None = None  # filters: name -> (filters, contradiction)
    anonymous: list[tuple[Filters | None, bool]] | None = None  # filters given as a list
    subs: list[Agg] = field(default_factory=list)


def parse_aggs(value: Any, where: str, filter_parser: Any, counter: list[int] | None = None) -> list[Agg]:
    """`filter_parser(clause, where) -> (Filters | None, contradiction)` translates filter clauses."""
    counter = counter if counter is not None else [0]
    if not isinstance(value, dict):
        raise ApiError(400, "must be an object of named aggregations", param=where)
    out: list[Agg] = []
    for name, spec in value.items():
        here = f"{where}.{name}"
        counter[0] += 1
        if counter[0] > MAX_AGGS:
            raise ApiError(400, f"at most {MAX_AGGS} aggregations", param=where)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ApiError(400, "invalid aggregation name", param=here)
        if not isinstance(spec, dict):
            raise ApiError(400, "must be an object", param=here)
        kinds = [k for k in spec if k not in ("aggs", "aggregations", "meta")]
        if len(kinds) != 1:
            raise ApiError(400, "must hold exactly one aggregation type", param=here)
        kind = kinds[0]
        body = spec[kind]
        agg = _parse_one(name, kind, body, f"{here}.{kind}", filter_parser)
        sub = spec.get("aggs", spec.get("aggregations"))
        if sub is not None:
            if kind not in ("filter", "filters"):
                raise Unsupported(f"sub-aggregations under a [{kind}] aggregation ({here}) are not answered here")
            agg.subs = parse_aggs(sub, f"{here}.aggs", filter_parser, counter)
        out.append(agg)
    return out


def _options(body: Any, where: str, allowed: set[str], kind: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "must be an object", param=where)
    unknown = set(body) - allowed
    if unknown:
        raise Unsupported(f"option [{sorted(unknown)[0]}] of a [{kind}] aggregation ({where}) is not answered here")
    return body


def _bound(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ApiError(400, "must be a number", param=where)
    try:
        return float(value)
    except ValueError:
        raise ApiError(400, "must be a number", param=where) from None


def _parse_one(name: str, kind: str, body: Any, where: str, filter_parser: Any) -> Agg:
    if kind == "terms":
        opts = _options(body, where, {"field", "size", "min_doc_count", "shard_size"}, kind)
        target = _TERM_FIELDS.get(str(opts.get("field")))
        if target is None:
            raise Unsupported(f"a terms aggregation on [{opts.get('field')}] ({where}) is not answered here")
        if opts.get("min_doc_count", 1) != 1:
            raise Unsupported(f"terms min_doc_count other than 1 ({where}) is not answered here")
        size = opts.get("size", 10)
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 1000:
            raise ApiError(400, "must be an integer from 1 to 1000", param=f"{where}.size")
        return Agg(name, kind, target=target, size=size)
    if kind == "range":
        opts = _options(body, where, {"field", "ranges", "keyed"}, kind)
        if opts.get("keyed", False) is not False:
            raise Unsupported(f"a keyed range aggregation ({where}) is not answered here")
        target = str(opts.get("field"))
        if target not in NUMERIC_FACET_FIELDS:
            raise Unsupported(f"a range aggregation on [{target}] ({where}) is not answered here")
        ranges = opts.get("ranges")
        if not isinstance(ranges, list) or not ranges or len(ranges) > storefront.MAX_RANGES:
            raise ApiError(400, f"needs a list of 1 to {storefront.MAX_RANGES} ranges", param=f"{where}.ranges")
        parsed = []
        for i, r in enumerate(ranges):
            if not isinstance(r, dict) or set(r) - {"from", "to", "key"}:
                raise ApiError(400, "each range is an object of from, to, key", param=f"{where}.ranges[{i}]")
            key = r.get("key")
            if key is not None and not isinstance(key, str):
                raise ApiError(400, "must be a string", param=f"{where}.ranges[{i}].key")
            parsed.append(
                (
                    _bound(r.get("from"), f"{where}.ranges[{i}].from"),
                    _bound(r.get("to"), f"{where}.ranges[{i}].to"),
                    key,
                )
            )
        return Agg(name, kind, target=target, ranges=parsed)
    if kind in _METRICS:
        opts = _options(body, where, {"field"}, kind)
        target = str(opts.get("field"))
        if target not in NUMERIC_FACET_FIELDS:
            raise Unsupported(f"a {kind} aggregation on [{target}] ({where}) is not answered here")
        return Agg(name, kind, target=target)
    if kind == "filter":
        filters, contradiction = filter_parser(body, where)
        return Agg(name, kind, filters=filters, contradiction=contradiction)
    if kind == "filters":
        opts = _options(body, where, {"filters"}, kind)
        given = opts.get("filters")
        if isinstance(given, dict):
            return Agg(name, kind, named={k: filter_parser(v, f"{where}.filters.{k}") for k, v in given.items()})
        if isinstance(given, list):
            return Agg(name, kind, anonymous=[filter_parser(v, f"{where}.filters[{i}]") for i, v in enumerate(given)])
        raise ApiError(400, "needs filters: an object or a list of filter clauses", param=f"{where}.filters")
    raise Unsupported(f"aggregation type [{kind}] ({where}) is not answered by the shopsearch pipeline")


def _and(base: Filters | None, extra: Filters | None) -> tuple[Filters | None, bool]:
    """Both restrictions as one Filters, and whether they contradict. Unsupported when the
    conjunction cannot be one Filters (two category any-of lists, neither inside the other)."""
    if extra is None or extra.is_empty():
        return base, False
    if base is None or base.is_empty():
        return extra, False
    merged = base.model_dump()
    for name in ("brand", "ids", "category"):
        a, b = getattr(base, name), getattr(extra, name)
        if a is None or b is None:
            merged[name] = a if b is None else b
        elif name == "category" and not (set(a) <= set(b) or set(b) <= set(a)):
            raise Unsupported("a category filter aggregation inside another category filter is not answered here")
        else:
            both = sorted(set(a) & set(b)) if name != "category" else (a if set(a) <= set(b) else b)
            if not both:
                return None, True
            merged[name] = both
    lows = [v for v in (base.price_min, extra.price_min) if v is not None]
    highs = [v for v in (base.price_max, extra.price_max) if v is not None]
    merged["price_min"] = max(lows) if lows else None
    merged["price_max"] = min(highs) if highs else None
    if lows and highs and merged["price_min"] > merged["price_max"]:
        return None, True
    merged["in_stock"] = True if (base.in_stock or extra.in_stock) else None
    excluded = [c.model_dump() for c in (*(base.exclude or ()), *(extra.exclude or ()))]
    merged["exclude"] = excluded or None  # a product either side excludes stays out
    return Filters(**merged), False


def run_aggs(backend: Backend, match: MatchSet | None, aggs: list[Agg]) -> dict[str, Any]:
    """OpenSearch's `aggregations` section over `match` (None: nothing matches)."""
    out: dict[str, Any] = {}
    facet_aggs = [a for a in aggs if a.kind not in ("filter", "filters")]
    if facet_aggs:
        if match is None:
            facets = [None] * len(facet_aggs)
        else:
            specs = [_spec(a) for a in facet_aggs]
            facets = list(backend.facets(match, specs))
        for agg, facet in zip(facet_aggs, facets, strict=True):
            out[agg.name] = _facet_shape(agg, facet)
    for agg in aggs:
        if agg.kind == "filter":
            out[agg.name] = _bucket(backend, match, agg.filters, agg.contradiction, agg.subs)
        elif agg.kind == "filters":
            if agg.named is not None:
                buckets: Any = {k: _bucket(backend, match, f, c, agg.subs) for k, (f, c) in agg.named.items()}
            else:
                buckets = [_bucket(backend, match, f, c, agg.subs) for f, c in agg.anonymous or []]
            out[agg.name] = {"buckets": buckets}
    return {a.name: out[a.name] for a in aggs}


def _bucket(
    backend: Backend, match: MatchSet | None, extra: Filters | None, contradiction: bool, subs: list[Agg]
) -> dict[str, Any]:
    inner: MatchSet | None = None
    if match is not None and not contradiction:
        filters, empty = _and(match.filters, extra)
        inner = None if empty else MatchSet(match.text, filters, match.ids)
    count = backend.count_matches(inner) if inner is not None else 0
    return {"doc_count": count, **run_aggs(backend, inner, subs)}


def _spec(agg: Agg) -> FacetSpec:
    assert agg.target is not None
    if agg.kind == "terms":
        return FacetSpec(field=agg.target, size=agg.size)
    if agg.kind == "range":
        return FacetSpec(field=agg.target, ranges=tuple((a, b) for a, b, _ in agg.ranges))
    return FacetSpec(field=agg.target, stats=True)


def _key(start: float | None, end: float | None) -> str:
    return f"{'*' if start is None else float(start)}-{'*' if end is None else float(end)}"


def _facet_shape(agg: Agg, facet: Any) -> dict[str, Any]:
    if agg.kind == "terms":
        values = facet.values if facet is not None else []
        return {
            "doc_count_error_upper_bound": 0,
            "sum_other_doc_count": facet.other if facet is not None else 0,
            "buckets": [{"key": v.value, "doc_count": v.count} for v in values],
        }
    if agg.kind == "range":
        counts = [r.count for r in facet.ranges] if facet is not None else [0] * len(agg.ranges)
        buckets = []
        for (start, end, key), count in zip(agg.ranges, counts, strict=True):
            bucket: dict[str, Any] = {"key": key or _key(start, end)}
            if start is not None:
                bucket["from"] = float(start)
            if end is not None:
                bucket["to"] = float(end)
            bucket["doc_count"] = count
            buckets.append(bucket)
        return {"buckets": buckets}
    stats = facet.stats if facet is not None else None
    count = stats.count if stats is not None else 0
    values = {
        "count": count,
        "min": stats.min if stats is not None and count else None,
        "max": stats.max if stats is not None and count else None,
        "avg": stats.avg if stats is not None and count else None,
        "sum": stats.sum if stats is not None else 0.0,
    }
    if agg.kind == "stats":
        return values
    return {"value": values[agg.kind]}


# --------------------------------------------------------------------------------------- highlight

_HIGHLIGHT_KEYS = {"fields", "pre_tags", "post_tags", "fragment_size", "number_of_fragments", "encoder", "type",
                   "require_field_match"}  # fmt: skip


def parse_highlight(value: Any, where: str = "highlight") -> tuple[HighlightTags, list[str]]:
    """OpenSearch's highlight section: tags (one pre and one post tag, from the allowed set),
    fragment_size, number_of_fragments, fields among title and description."""
    if not isinstance(value, dict):
        raise ApiError(400, "must be an object", param=where)
    unknown = set(value) - _HIGHLIGHT_KEYS
    if unknown:
        raise Unsupported(f"highlight option [{sorted(unknown)[0]}] is not answered here")
    if value.get("encoder", "html") not in ("html", "default"):
        raise ApiError(400, "must be html or default (fragments are always HTML-escaped)", param=f"{where}.encoder")
    pre_tags = value.get("pre_tags", ["<em>"])
    post_tags = value.get("post_tags", None)
    for key, tags in (("pre_tags", pre_tags), ("post_tags", post_tags)):
        if tags is not None and (not isinstance(tags, list) or len(tags) != 1 or not isinstance(tags[0], str)):
            raise ApiError(400, "give exactly one tag (a list of one string)", param=f"{where}.{key}")
    try:
        pre, post = storefront.check_tags(pre_tags[0], post_tags[0] if post_tags else None, where)
    except storefront.StorefrontError as err:
        param = err.param.replace(".pre_tag", ".pre_tags").replace(".post_tag", ".post_tags")
        raise ApiError(400, err.message, param=param) from None
    fields = value.get("fields", {})
    if isinstance(fields, list):  # [{"title": {}}, ...] is accepted by OpenSearch too
        merged: dict[str, Any] = {}
        for item in fields:
            if not isinstance(item, dict):
                raise ApiError(400, "must be an object of fields", param=f"{where}.fields")
            merged.update(item)
        fields = merged
    if not isinstance(fields, dict) or not fields:
        raise ApiError(400, "must name fields to highlight", param=f"{where}.fields")
    names = []
    for name, opts in fields.items():
        if name not in ("title", "description"):
            raise Unsupported(f"highlighting field [{name}] is not answered here (title and description are)")
        if opts not in ({}, None):
            raise Unsupported(f"per-field highlight options ({where}.fields.{name}) are not answered here")
        names.append(name)
    numbers = {}
    for key, default in (("fragment_size", 100), ("number_of_fragments", 3)):
        number = value.get(key, default)
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 10_000:
            raise ApiError(400, "must be an integer from 1 to 10000", param=f"{where}.{key}")
        numbers[key] = number
    tags = HighlightTags(
        pre=pre, post=post, fragment_chars=numbers["fragment_size"], fragments=numbers["number_of_fragments"]
    )
    return tags, names


# ----------------------------------------------------------------------------------------- suggest


@dataclass(frozen=True)
class CompletionSuggest:
    name: str
    prefix: str
    size: int


def parse_suggest(value: Any, where: str = "suggest") -> list[CompletionSuggest]:
    """Completion suggesters (`prefix` + `completion: {field, size}`); term and phrase suggesters are
    refused by name."""
    if not isinstance(value, dict):
        raise ApiError(400, "must be an object of named suggesters", param=where)
    global_text = value.get("text")
    out = []
    for name, spec in value.items():
        if name == "text":
            continue
        here = f"{where}.{name}"
        if not isinstance(spec, dict):
            raise ApiError(400, "must be an object", param=here)
        for kind in ("term", "phrase"):
            if kind in spec:
                raise Unsupported(f"the {kind} suggester ({here}) is not answered here (completion is)")
        if "completion" not in spec:
            raise ApiError(400, "needs a completion section", param=here)
        completion = spec["completion"]
        if not isinstance(completion, dict) or set(completion) - {"field", "size", "skip_duplicates"}:
            raise Unsupported(f"completion options other than field, size ({here}) are not answered here")
        prefix = spec.get("prefix", spec.get("text", global_text))
        if not isinstance(prefix, str) or not prefix.strip():
            raise ApiError(400, "needs a prefix string", param=f"{here}.prefix")
        size = completion.get("size", 5)
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 50:
            raise ApiError(400, "must be an integer from 1 to 50", param=f"{here}.completion.size")
        out.append(CompletionSuggest(name, prefix[: storefront.MAX_SUGGEST_CHARS], size))
    return out


def suggest_section(
    backend: Backend, popular: storefront.PopularQueries | None, suggesters: list[CompletionSuggest]
) -> dict[str, Any]:
    """OpenSearch's `suggest` section: per suggester one entry for its prefix with text options."""
    out: dict[str, Any] = {}
    for s in suggesters:
        found = storefront.suggest(backend, popular, s.prefix, s.size)
        options = [{"text": f.text, "_score": float(f.count), "shopsearch": {"kind": f.kind}} for f in found]
        out[s.name] = [{"text": s.prefix, "offset": 0, "length": len(s.prefix), "options": options}]
    return out
