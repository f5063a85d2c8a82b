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

from middleware import paging
from middleware.config import ServerSettings
from middleware.products import MAX_QUERY_CHARS, Filters
from middleware.schema import HighlightRequest, SearchRequest, SearchResponse
from middleware.server.aggs import Agg, CompletionSuggest, Unsupported, parse_aggs, parse_highlight, parse_suggest
from middleware.server.errors import ApiError
from middleware.server.requirements import FIELD_TEXT, Kind, Requirement, words

TEXT_QUERIES = ("match", "match_phrase", "match_phrase_prefix", "multi_match", "query_string", "simple_query_string")
# keys refused unless passing scripts through is enabled: each runs code on the cluster
SCRIPT_KEYS = frozenset(
    {"script", "script_score", "script_fields", "scripted_metric", "_script", "runtime_mappings", "stored_script"}
)
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
        self.requirements: list[Requirement] = []  # lexical requirements: resolved to ids before searching
        self.excludes: list[dict[str, Any]] = []  # must_not filter clauses: Filters.exclude
        self.negatives: list[Requirement] = []  # must_not text clauses: the products they match are excluded

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
        if self.excludes:
            out["exclude"] = list(self.excludes)
        return out or None


_FIELD = {"brand": "brand", "brand.keyword": "brand", "category": "category", "category.keyword": "category",
          "id": "ids", "id.keyword": "ids", "_id": "ids"}  # fmt: skip


def _single(clause: Any, kind: str, where: str = "query") -> tuple[str, Any]:
    if not isinstance(clause, dict):
        raise ApiError(400, "must be an object", param=f"{where}.{kind}")
    fields = [k for k in clause if k not in {"boost", "_name"}]
    if len(fields) != 1:
        raise ApiError(400, "must name exactly one field", param=f"{where}.{kind}")
    if "_name" in clause:
        raise Unsupported(f"[{where}.{kind}._name] named queries (matched_queries) are not answered by the pipeline")
    return fields[0], clause[fields[0]]


def _add_filter(builder: _FilterBuilder, clause: Any, where: str) -> None:
    if not isinstance(clause, dict) or len(clause) != 1:
        raise ApiError(400, "each clause must be an object with one query type", param=where)
    kind, spec = next(iter(clause.items()))
    path = f"{where}.{kind}"
    if kind == "match_all":
        if not isinstance(spec, dict):
            raise ApiError(400, "must be an object", param=path)
        _only(spec, {"boost"}, path)
        return
    if kind == "match_none":
        if not isinstance(spec, dict):
            raise ApiError(400, "must be an object", param=path)
        _only(spec, {"boost"}, path)
        builder.contradiction = True
        return
    if kind == "constant_score":
        if not isinstance(spec, dict) or "filter" not in spec:
            raise ApiError(400, "needs a filter", param=path)
        _only(spec, {"boost", "filter"}, path)
        _add_filter(builder, spec["filter"], f"{path}.filter")
        return
    if kind == "prefix":
        _add_prefix(builder, spec, where)
        return
    if kind == "match":
        name, value = _single(spec, kind, where)
        here = f"{path}.{name}"
        if name not in KEYWORD_MATCH_FIELDS:
            raise Unsupported(f"[{here}] a text match inside a filter is not a shopsearch filter")
        if isinstance(value, dict):
            _only(value, {"query", "boost", "operator"} if value.get("operator", "or") == "or" else {"query"}, here)
            value = value.get("query")
        builder.any_of(KEYWORD_MATCH_FIELDS[name], [_query_value(value, here)])
        return
    if kind in ("term", "terms"):
        name, value = _single(spec, kind, where)
        here = f"{path}.{name}"
        if kind == "term" and isinstance(value, dict):
            _only(value, {"value", "boost"} | ({"case_insensitive"} if not value.get("case_insensitive") else set()),
                  here)  # fmt: skip
            value = value.get("value")
        values = value if kind == "terms" else [value]
        if not isinstance(values, list) or any(isinstance(v, (dict, list)) or v is None for v in values):
            raise ApiError(400, "values must be scalars", param=here)
        if name == "in_stock" and kind == "term":
            if values[0] is True or str(values[0]).lower() == "true":
                builder.in_stock = True
                return
            raise Unsupported(f"[{here}] term in_stock: false (only-out-of-stock) is not a shopsearch filter")
        target = _FIELD.get(name)
        if target is None:
            raise Unsupported(f"[{here}] {kind} filter on [{name}] is not a shopsearch filter")
        builder.any_of(target, values)
        return
    if kind == "ids":
        if not isinstance(spec, dict) or not isinstance(spec.get("values"), list):
            raise ApiError(400, "needs a list under values", param=path)
        _only(spec, {"values", "boost"}, path)
        builder.any_of("ids", spec["values"])
        return
    if kind == "range":
        name, bounds = _single(spec, kind, where)
        if not isinstance(bounds, dict):
            raise ApiError(400, "must be an object of bounds", param=f"{path}.{name}")
        _add_range(builder, name, bounds, f"{path}.{name}")
        return
    if kind == "bool":
        if not isinstance(spec, dict):
            raise ApiError(400, "must be an object", param=path)
        for key, sub in spec.items():
            if key in ("filter", "must"):
                for i, c in enumerate(sub if isinstance(sub, list) else [sub]):
                    _add_filter(builder, c, f"{path}.{key}[{i}]")
            elif key in ("boost", "adjust_pure_negative") or _empty_optional(key, sub, spec):
                continue
            elif key == "must_not":
                _add_must_not(builder, sub if isinstance(sub, list) else [sub], path)
            else:
                raise Unsupported(f"[{path}.{key}] bool.{key} inside a filter is not a shopsearch filter")
        return
    raise Unsupported(f"[{path}] filter clause [{kind}] is not a shopsearch filter")


def _add_must_not(builder: _FilterBuilder, clauses: list[Any], path: str) -> None:
    """bool.must_not: each clause excludes the products it matches. A filter clause becomes a
    Filters.exclude clause (inside both retrievals); a text clause, or a prefix, is a negative
    requirement (the products it matches lexically are excluded by id)."""
    for i, clause in enumerate(clauses):
        here = f"{path}.must_not[{i}]"
        sub = _FilterBuilder()
        if _is_text_clause(clause):
            kind = next(iter(clause))
            _text_of(kind, clause[kind], here, sub, negated=True)
        else:
            _add_filter(sub, clause, here)
        if sub.excludes:
            raise _refuse(here, "a must_not inside a must_not is not answered by the pipeline")
        if sub.contradiction:
            continue  # the clause matches nothing: it excludes nothing
        found = sub.to_filters()
        textual = sub.negatives + sub.requirements
        if textual and found is not None:
            raise _refuse(here, "a must_not clause joining text and filters is not answered by the pipeline "
                          "(give them as separate must_not clauses, which exclude either)")  # fmt: skip
        if len(textual) > 1:
            raise _refuse(here, "a must_not clause of several text clauses is not answered by the pipeline")
        if textual:
            builder.negatives.extend(textual)
        elif found is None:
            builder.contradiction = True  # it matches every product (match_all): all are excluded
        else:
            _add_exclusion(builder.excludes, found)


def _add_exclusion(excludes: list[dict[str, Any]], found: dict[str, Any]) -> None:
    """One more exclude clause; clauses on one value field alone are one clause of their values
    (excluding brand a, and brand b, is excluding brand a or b)."""
    (name,) = found if len(found) == 1 else (None,)
    if name in ("brand", "category", "ids"):
        for clause in excludes:
            if set(clause) == {name}:
                clause[name] = sorted({*clause[name], *found[name]})
                return
    excludes.append(found)


def _empty_optional(key: str, sub: Any, spec: Mapping[str, Any]) -> bool:
    """An empty should / must_not, or a minimum_should_match with no should to apply to."""
    if key in ("should", "must_not"):
        return sub in ([], {})
    return key == "minimum_should_match" and spec.get("should") in (None, [], {})


def _only(options: Mapping[str, Any], allowed: set[str], path: str) -> None:
    for key in options:
        if key not in allowed:
            raise Unsupported(f"[{path}.{key}] option [{key}] is not answered by the pipeline")


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
        key = sorted(set(bounds) - known)[0]
        raise Unsupported(f"[{where}.{key}] range option [{key}] on [{name}] is not answered by the pipeline")
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
        raise Unsupported(f"[{where}] range on stock other than gt 0 / gte 1 is not a shopsearch filter")
    raise Unsupported(f"[{where}] range filter on [{name}] is not a shopsearch filter")


# ------------------------------------------------------------------------------------------ queries

# The pipeline searches one user text over the product text (title, description, brand, categories),
# lexically and by meaning. These fields name that text; brand and category are keyword fields,
# so a match on them is an exact-value filter.
TEXT_FIELDS = frozenset({"title", "description", "*", "_all"})
KEYWORD_MATCH_FIELDS = {"brand": "brand", "brand.keyword": "brand", "category": "category",
                        "category.keyword": "category"}  # fmt: skip
# options that only change how OpenSearch scores a match: the pipeline ranks itself, so these are superseded
RANKING_ONLY = frozenset({"boost", "tie_breaker", "auto_generate_synonyms_phrase_query", "lenient"})
# fuzzy options that change nothing unless fuzziness is given
FUZZY_TUNING = frozenset({"prefix_length", "max_expansions", "fuzzy_transpositions", "fuzzy_rewrite"})
_QUERY_SYNTAX = re.compile(r'[+\-=&|><!(){}\[\]^"~*?:\\/]|\b(AND|OR|NOT)\b')


def _refuse(path: str, why: str) -> Unsupported:
    return Unsupported(f"[{path}] {why}")


def _is_text_clause(clause: Any) -> bool:
    if not isinstance(clause, dict) or len(clause) != 1:
        return False
    kind, spec = next(iter(clause.items()))
    if kind == "match" and isinstance(spec, dict):
        names = [k for k in spec if k not in {"boost", "_name"}]
        return not (len(names) == 1 and names[0] in KEYWORD_MATCH_FIELDS)
    return kind in TEXT_QUERIES


def _check_options(options: Mapping[str, Any], allowed: set[str], path: str) -> dict[str, Any]:
    """Every option is known; returns those that make a lexical requirement (operator and,
    minimum_should_match, fuzziness) for `_requirement`."""
    wanted: dict[str, Any] = {}
    for key, value in options.items():
        here = f"{path}.{key}"
        if key in allowed or key in RANKING_ONLY or key in FUZZY_TUNING:
            continue
        if key in ("operator", "default_operator"):
            if isinstance(value, str) and value.lower() in ("or", "and"):
                if value.lower() == "and":
                    wanted["operator"] = here
                continue
            raise ApiError(400, "must be or / and", param=here)
        if key == "minimum_should_match":
            if value not in (1, "1", "0", 0, "0%"):
                wanted["minimum_should_match"] = (here, value)
            continue
        if key == "fuzziness":
            if value not in (0, "0"):
                wanted["fuzziness"] = (here, value)
            continue
        if key == "slop":
            if value in (0, "0"):
                continue
            raise _refuse(here, "phrase slop is not answered by the pipeline")
        if key == "zero_terms_query":
            if value == "none":
                continue
            raise _refuse(here, "zero_terms_query other than none is not answered by the pipeline")
        if key == "type":
            if value in ("best_fields", "most_fields", "cross_fields", "phrase", "phrase_prefix"):
                continue
            raise _refuse(here, f"multi_match type [{str(value)[:40]}] is not answered by the pipeline")
        if key == "_name":
            raise _refuse(here, "named queries (matched_queries) are not answered by the pipeline")
        raise _refuse(here, f"option [{key}] is not answered by the pipeline")
    if len(wanted) > 1:
        second = sorted(wanted)[1]
        where = wanted[second] if isinstance(wanted[second], str) else wanted[second][0]
        raise _refuse(where, f"[{second}] together with [{sorted(wanted)[0]}] is not answered by the pipeline")
    return wanted


def _minimum(value: Any, text: str, here: str) -> int:
    """minimum_should_match as a count of the text's distinct words (OpenSearch's integer, negative, percent)."""
    count = len(set(words(text)))
    raw = str(value).strip()
    try:
        if raw.endswith("%"):
            share = float(raw[:-1])
            n = int(count * share / 100) if share >= 0 else count - int(count * -share / 100)
        else:
            n = int(raw)
            n = n if n >= 0 else count + n
    except ValueError:
        raise _refuse(here, "minimum_should_match combinations are not answered by the pipeline") from None
    return max(n, 1)


def _fields_of(names: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        out.extend(FIELD_TEXT[name.split("^", 1)[0]])
    return tuple(dict.fromkeys(out))


def _requirement(
    kind: Kind | None,
    text: str,
    fields: tuple[str, ...],
    wanted: dict[str, Any],
    path: str,
    per_field: bool = True,
    negated: bool = False,
) -> Requirement | None:
    """The requirement the clause adds to the match set (None: none past matching any word); negated
    (under must_not), what the clause matches: any word at least."""
    any_word = Requirement(path=path, text=text, fields=fields, kind="at_least", minimum=1, per_field=per_field)
    if wanted and kind in ("phrase", "phrase_prefix"):
        key = next(iter(wanted))
        raise _refuse(f"{path}.{key}", f"[{key}] on a phrase is not answered by the pipeline")
    if "operator" in wanted:
        return Requirement(path=wanted["operator"], text=text, fields=fields, kind="all", per_field=per_field)
    if "minimum_should_match" in wanted:
        here, value = wanted["minimum_should_match"]
        n = _minimum(value, text, here)
        if n <= 1:
            return any_word if negated else None
        return Requirement(path=here, text=text, fields=fields, kind="at_least", minimum=n, per_field=per_field)
    if "fuzziness" in wanted:
        here, value = wanted["fuzziness"]
        edits = {"AUTO": -1, "1": 1, "2": 2}.get(str(value).upper())
        if edits is None:
            raise ApiError(400, "must be 0, 1, 2 or AUTO", param=here)
        if set(fields) - {"title"}:
            raise _refuse(here, "fuzziness is answered on the title only (the indexed words it expands over)")
        return Requirement(path=here, text=text, fields=fields, kind="fuzzy", max_edits=edits)
    if kind is not None:
        return Requirement(path=path, text=text, fields=fields, kind=kind)
    return any_word if negated else None


def _query_value(value: Any, path: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ApiError(400, "query text must be a string", param=path)
    return value


def _check_fields(fields: Any, path: str) -> None:
    if isinstance(fields, str):
        fields = [fields]
    if not isinstance(fields, list) or not fields or not all(isinstance(f, str) for f in fields):
        raise ApiError(400, "must be a non-empty list of field names", param=path)
    for i, name in enumerate(fields):
        base = name.split("^", 1)[0]
        if base not in TEXT_FIELDS:
            raise _refuse(
                f"{path}[{i}]",
                f"text search on field [{base[:80]}] is not answered by the pipeline (it searches title and "
                "description together; brand and category are exact-value filters)",
            )


def _text_of(
    kind: str, spec: Any, where: str, builder: _FilterBuilder, optional: bool = False, negated: bool = False
) -> str | None:
    """The user text of a text clause; None when the clause was a keyword match (added as a filter).
    A clause that narrows the match set lexically adds a Requirement (refused where it is optional);
    negated (under must_not), what it matches is a negative requirement."""
    path = f"{where}.{kind}"
    if not isinstance(spec, dict):
        raise ApiError(400, "must be an object", param=path)
    requirement: Requirement | None = None
    if kind in ("match", "match_phrase", "match_phrase_prefix"):
        name, value = _single(spec, kind, where)
        _check_options({k: v for k, v in spec.items() if k != name}, set(), path)
        options: dict[str, Any] = {}
        if isinstance(value, dict):
            options = {k: v for k, v in value.items() if k != "query"}
            value = value.get("query")
        here = f"{path}.{name}"
        if name in KEYWORD_MATCH_FIELDS and kind == "match":
            _only(options, {"boost", "operator"} if options.get("operator", "or") == "or" else set(), here)
            builder.any_of(KEYWORD_MATCH_FIELDS[name], [_query_value(value, here)])
            return None
        if name not in TEXT_FIELDS:
            _check_fields([name], here)
        text = _query_value(value, here)
        wanted = _check_options(options, set(), here)
        phrase: Kind | None = {"match": None, "match_phrase": "phrase", "match_phrase_prefix": "phrase_prefix"}[kind]
        requirement = _requirement(phrase, text, _fields_of([name]), wanted, here, negated=negated)
    elif kind == "multi_match":
        fields = spec.get("fields", ["*"])
        _check_fields(fields, f"{path}.fields")
        wanted = _check_options(spec, {"query", "fields"}, path)
        text = _query_value(spec.get("query"), f"{path}.query")
        mm_type = spec.get("type", "best_fields")
        phrase = mm_type if mm_type in ("phrase", "phrase_prefix") else None
        names = [fields] if isinstance(fields, str) else fields
        requirement = _requirement(
            phrase, text, _fields_of(names), wanted, path, per_field=mm_type != "cross_fields", negated=negated
        )
    else:  # query_string, simple_query_string: plain words only
        for key in ("fields", "default_field"):
            if key in spec:
                _check_fields(spec[key], f"{path}.{key}")
        wanted = _check_options(spec, {"query", "fields", "default_field", "analyze_wildcard", "flags"}, path)
        text = _query_value(spec.get("query"), f"{path}.query")
        if _QUERY_SYNTAX.search(text):
            raise _refuse(f"{path}.query", "query syntax (operators, quotes, fields, wildcards) is not answered by "
                          "the pipeline: send plain words")  # fmt: skip
        names = spec.get("fields", [spec.get("default_field", "*")])
        fields = _fields_of([names] if isinstance(names, str) else names)
        requirement = _requirement(None, text, fields, wanted, path, negated=negated)
    if requirement is not None and negated:
        builder.negatives.append(requirement)
    elif requirement is not None:
        if optional:
            raise _refuse(requirement.path, "a lexical requirement in an optional (should) clause is not answered")
        builder.requirements.append(requirement)
    return text


def _add_prefix(builder: _FilterBuilder, spec: Any, where: str) -> None:
    name, value = _single(spec, "prefix", where)
    here = f"{where}.prefix.{name}"
    if isinstance(value, dict):
        _only(value, {"value", "boost", "rewrite"}, here)
        value = value.get("value")
    if name != "title":
        raise _refuse(here, "prefix is answered on the title only (the indexed words it expands over)")
    text = _query_value(value, here)
    builder.requirements.append(Requirement(path=here, text=text, fields=(name,), kind="prefix"))


def _msm_is_one(spec: Mapping[str, Any]) -> bool:
    return spec.get("minimum_should_match") in (1, "1", "100%")


def _walk_query(query: Any, texts: list[str], builder: _FilterBuilder, where: str) -> int:
    """Adds the clause's user text and filters; returns how many separately required text units it holds."""
    if not isinstance(query, dict) or len(query) != 1:
        raise ApiError(400, "must be an object with exactly one query type", param=where)
    kind, spec = next(iter(query.items()))
    if kind in TEXT_QUERIES:
        text = _text_of(kind, spec, where, builder)
        if text is None:
            return 0
        texts.append(text)
        return 1
    if kind == "bool":
        path = f"{where}.bool"
        if not isinstance(spec, dict):
            raise ApiError(400, "must be an object", param=path)
        units = 0
        should_texts = 0
        for key, sub in spec.items():
            clauses = sub if isinstance(sub, list) else [sub]
            if key == "must":
                for i, c in enumerate(clauses):
                    here = f"{path}.must[{i}]"
                    if _is_text_clause(c) or (isinstance(c, dict) and len(c) == 1 and next(iter(c)) == "bool"):
                        units += _walk_query(c, texts, builder, here)
                    else:
                        _add_filter(builder, c, here)
            elif key == "should":
                if clauses in ([], [{}]):
                    continue
                for i, c in enumerate(clauses):
                    here = f"{path}.should[{i}]"
                    if not _is_text_clause(c):
                        raise _refuse(here, "bool.should may only hold text queries for the pipeline")
                    kind_s = next(iter(c))
                    text = _text_of(kind_s, c[kind_s], here, builder, optional=True)
                    if text is not None:
                        texts.append(text)
                        should_texts += 1
            elif key == "filter":
                for i, c in enumerate(clauses):
                    _add_filter(builder, c, f"{path}.filter[{i}]")
            elif key == "must_not":
                if clauses not in ([], [{}]):
                    _add_must_not(builder, clauses, path)
            elif key in ("boost", "adjust_pure_negative", "minimum_should_match"):
                continue
            elif key == "_name":
                raise _refuse(f"{path}._name", "named queries (matched_queries) are not answered by the pipeline")
            else:
                raise ApiError(400, f"unknown bool key [{key}]", param=f"{path}.{key}")
        required = any(k in spec and spec[k] not in ([], {}) for k in ("must", "filter"))
        if should_texts and (units or (required and not _msm_is_one(spec))):
            raise _refuse(
                f"{path}.should",
                "optional text next to must/filter clauses only scores in OpenSearch; the pipeline would require "
                "it (move it into must, or set minimum_should_match: 1)",
            )
        if "minimum_should_match" in spec and not (_msm_is_one(spec) or spec["minimum_should_match"] in (0, "0")):
            raise _refuse(f"{path}.minimum_should_match", "minimum_should_match is not answered by the pipeline")
        if units > 1:
            raise _refuse(
                f"{path}.must",
                "several text clauses that must each match are not answered by the pipeline (it answers one text)",
            )
        return units + (1 if should_texts else 0)
    if kind in ("term", "terms", "range", "ids", "match_all", "match_none", "constant_score", "prefix"):
        _add_filter(builder, query, where)
        return 0
    raise _refuse(f"{where}.{kind}", f"query type [{kind}] is not answered by the shopsearch pipeline")


# ---------------------------------------------------------------------------------------- requests


@dataclass
class Translated:
    request: SearchRequest
    source: SourceFilter
    matches_nothing: bool = False  # contradictory filters: answer zero hits without searching
    track_total_hits: bool | int = True
    aggs: list[Agg] | None = None  # answered over the response's match set (aggs.run_aggs)
    suggest: list[CompletionSuggest] | None = None
    agg_request: SearchRequest | None = None  # with post_filter: the aggregations' search, without it
    agg_matches_nothing: bool = False
    requirements: list[Requirement] = field(default_factory=list)  # lexical: resolved to ids before searching
    agg_requirements: list[Requirement] = field(default_factory=list)  # the query's alone (not post_filter's)
    negatives: list[Requirement] = field(default_factory=list)  # must_not text: its matches excluded by id
    agg_negatives: list[Requirement] = field(default_factory=list)
    total_as_int: bool = False  # rest_total_hits_as_int: hits.total is a number
    version: bool = False  # each hit carries _version


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


BODY_KEYS = frozenset({"query", "size", "from", "_source", "sort", "aggs", "aggregations", "highlight", "suggest",
                       "post_filter", "search_after", "track_total_hits", "timeout", "explain", "track_scores",
                       "version"})  # fmt: skip
# URL parameters that change nothing about which products come back, in what order, or the response's shape
HARMLESS_PARAMS = frozenset({"pretty", "human", "error_trace", "request_cache", "preference", "search_type",
                             "allow_no_indices", "ignore_unavailable", "expand_wildcards", "ignore_throttled",
                             "allow_partial_search_results", "batched_reduce_size", "ccs_minimize_roundtrips",
                             "max_concurrent_shard_requests", "pre_filter_shard_size", "analyze_wildcard",
                             "lenient", "track_scores"})  # fmt: skip
ANSWERED_PARAMS = frozenset({"q", "df", "default_operator", "size", "from", "sort", "_source", "_source_includes",
                             "_source_excludes", "timeout", "explain", "track_total_hits", "version",
                             "rest_total_hits_as_int"})  # fmt: skip


def _flag(value: Any) -> bool:
    return value is True or str(value).lower() in ("true", "")


def _check_params(params: Mapping[str, str], body: Mapping[str, Any]) -> None:
    for key in params:
        if key == "scroll":
            raise Unsupported("[scroll] scroll contexts are not answered by the pipeline: page with search_after")
        if key not in HARMLESS_PARAMS and key not in ANSWERED_PARAMS:
            raise Unsupported(f"[{key}] URL parameter [{key}] is not answered by the shopsearch pipeline")
    if "q" in params and "query" in body:
        raise ApiError(400, "give the query in the body or as q, not both", param="q")
    if "df" in params:
        _check_fields([params["df"]], "df")
    if "default_operator" in params and params["default_operator"].lower() != "or":
        raise Unsupported("[default_operator] operator AND is not answered by the pipeline")
    if "q" in params and _QUERY_SYNTAX.search(params["q"]):
        raise Unsupported("[q] query syntax (operators, quotes, fields, wildcards) is not answered by the pipeline")


def _sort_list(value: Any, param: str) -> list[Any] | None:
    """The sort as SearchRequest takes it (None: by relevance), Unsupported for what it cannot sort on."""
    items = value if isinstance(value, list) else [value]
    if _sort_is_score(items):
        return None
    try:
        paging.parse_sort(items)
    except paging.InvalidRequest as err:
        where = param if err.param is None else f"{param}{err.param.removeprefix('sort')}"
        raise Unsupported(f"[{where}] {err}") from None
    return items


def _uri_sort(value: str) -> list[Any]:
    out: list[Any] = []
    for part in value.split(","):
        name, _, order = part.partition(":")
        out.append({name: order} if order else name)
    return out


def translate_search(
    body: Mapping[str, Any] | None,
    params: Mapping[str, str],
    server: ServerSettings,
    *,
    default_deadline_ms: float | None = None,
) -> Translated:
    """A SearchRequest for the pipeline, or Unsupported / ApiError.

    Every key of the body and of each query clause is either answered with OpenSearch's meaning or
    refused (Unsupported, naming its JSON path): nothing is silently ignored. Options that only tune
    OpenSearch's scoring (boost, field ^ weights, tie_breaker) are superseded by the pipeline's ranking."""
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
        if key not in BODY_KEYS:
            raise Unsupported(f"[{key}] is not answered by the shopsearch pipeline")
    _check_params(params, body)
    sort = None
    if "sort" in body:
        sort = _sort_list(body["sort"], "sort")
    elif "sort" in params:
        sort = _sort_list(_uri_sort(params["sort"]), "sort")
    search_after: str | None = None
    if "search_after" in body:
        after = body["search_after"]
        if not (isinstance(after, list) and len(after) == 1 and isinstance(after[0], str) and after[0]):
            raise ApiError(
                400,
                "must be the sort value of the last hit a shopsearch answer returned (one opaque string)",
                param="search_after",
            )
        search_after = after[0]
    track: Any = body.get("track_total_hits", params.get("track_total_hits", True))
    if isinstance(track, str):
        track = {"true": True, "false": False}.get(track.lower(), track)
        if isinstance(track, str):
            track = _int_param(track, "track_total_hits")
    if not isinstance(track, bool):
        track = _int_param(track, "track_total_hits")

    texts: list[str] = []
    builder = _FilterBuilder()
    if "query" in body:
        _walk_query(body["query"], texts, builder, "query")
    elif "q" in params:
        texts.append(params["q"])
    text = " ".join(t.strip() for t in texts if t.strip())
    query_filters = builder.to_filters()
    query_contradiction = builder.contradiction
    query_requirements = list(builder.requirements)
    query_negatives = list(builder.negatives)
    if "post_filter" in body:
        _add_filter(builder, body["post_filter"], "post_filter")
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
    explain = _flag(body.get("explain", params.get("explain", False)))
    version = _flag(body.get("version", params.get("version", False)))

    def request_for(found: dict[str, Any] | None, page: int) -> SearchRequest:
        if not text and found is None:
            found = {"in_stock": False}  # no restriction: browse every product
        try:
            return SearchRequest.model_validate(
                {
                    "query": text[:MAX_QUERY_CHARS] or None,  # longer text is cut, never refused
                    "filters": found,
                    "from": from_,
                    "size": page,
                    "explain": explain,
                    "deadline_ms": deadline_ms,
                    "highlight": highlight if highlight is not None else False,
                    "sort": sort,
                    "search_after": search_after,
                    "track_total_hits": track,
                }
            )
        except ValidationError as err:  # a value the proxy let through but the model bounds: 400, never 500
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or "body"
            raise ApiError(400, str(first["msg"]).removeprefix("Value error, "), param=param) from None

    request = request_for(filters, size)
    agg_request: SearchRequest | None = None
    if "post_filter" in body and (aggs is not None):
        # aggregations count the query's matches; post_filter narrows the hits only
        agg_request = request_for(query_filters, 0).model_copy(update={"search_after": None, "from_": 0})
    return Translated(
        request=request,
        source=source,
        matches_nothing=builder.contradiction,
        track_total_hits=track,
        aggs=aggs,
        suggest=suggest,
        agg_request=agg_request,
        agg_matches_nothing=query_contradiction,
        requirements=builder.requirements,
        agg_requirements=query_requirements,
        negatives=builder.negatives,
        agg_negatives=query_negatives,
        total_as_int=_flag(params.get("rest_total_hits_as_int", False)),
        version=version,
    )


def count_request(body: Mapping[str, Any] | None, params: Mapping[str, str], server: ServerSettings) -> Translated:
    """`_count`: the query's matches counted exactly (only `query` in the body; q in the URL)."""
    body = dict(body or {})
    for key in body:
        if key != "query":
            raise Unsupported(f"[{key}] is not answered by the shopsearch pipeline in _count")
    counted = {k: v for k, v in params.items() if k not in ("size", "from", "sort", "track_total_hits")}
    return translate_search({**body, "size": 0, "track_total_hits": True}, counted, server)


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
    if hits and resp is not None and resp.next_cursor is not None:
        hits[-1]["sort"] = [resp.next_cursor]  # search_after: [this value] continues after the last hit
    if translated.version:
        for doc in hits:
            doc["_version"] = 1
    max_score = max((h["_score"] for h in hits), default=None)
    out_hits: dict[str, Any] = {"max_score": max_score, "hits": hits}
    if translated.track_total_hits is not False:
        out_hits["total"] = total if translated.total_as_int else {"value": total, "relation": relation}
    return {
        "took": round(took_ms),
        "timed_out": False,
        "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
        "hits": {k: out_hits[k] for k in ("total", "max_score", "hits") if k in out_hits},
    }
