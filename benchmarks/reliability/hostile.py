"""Hostile and malformed input against the running service.

1. Schemathesis (v4) over the app's own OpenAPI schema: positive and negative cases for every operation.
2. Hypothesis over OpenSearch request bodies for the proxy (it is not in the OpenAPI schema): recursive
   JSON built from OpenSearch's query vocabulary, scripts, odd index names and paths, odd methods.
3. A fixed list of known-nasty requests (`NASTY`): oversized and chunked bodies, huge size/from, deep
   nesting, invalid UTF-8, control characters, 10k-character queries, scripts in every place.

A response ≥ 500 is a defect; so is a crash (the server must still answer /healthz afterwards) and any
"unhandled" error in the log.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any

import httpx
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

SCRIPT = {"source": "ctx._source.price = 0", "lang": "painless"}


def nasty_requests(max_body: int) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(name, method, path, httpx request kwargs) for the fixed hostile list."""
    deep = "[" * 10_000 + "]" * 10_000
    deep_obj = '{"a":' * 5_000 + "1" + "}" * 5_000
    q10k = "手表" * 5_000
    match = {"query": {"match": {"title": "手表"}}}
    return [
        ("oversized body (declared)", "POST", "/v1/search", {"content": b"{" + b" " * (max_body + 10) + b"}"}),
        (
            "oversized body (chunked, no length)",
            "POST",
            "/products/_search",
            {"content": iter([b'{"query":', b" " * (max_body + 10), b"}"])},
        ),
        (
            "bad content-length (raw HTTP)",
            "POST",
            "/v1/search",
            {"raw": b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}"},
        ),
        (
            "content-length larger than the body (raw HTTP)",
            "POST",
            "/v1/search",
            {"raw": b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\nConnection: close\r\n\r\n{}"},
        ),
        ("garbage request line (raw)", "GET", "/", {"raw": b"\xff\xfe GARBAGE \x00\r\n\r\n"}),
        ("huge size", "POST", "/v1/search", {"json": {"query": "手表", "size": 10**12}}),
        ("huge from", "POST", "/v1/search", {"json": {"query": "手表", "from": 10**18}}),
        ("size as 1e309 text", "POST", "/v1/search", {"content": b'{"query":"x","size":1e309}'}),
        ("proxy huge size", "POST", "/products/_search", {"json": {**match, "size": 10**30}}),
        ("proxy huge from (param)", "GET", "/products/_search?q=手表&from=99999999999999999999", {}),
        ("proxy negative size", "POST", "/products/_search", {"json": {**match, "size": -1}}),
        ("proxy size NaN", "POST", "/products/_search", {"content": b'{"query":{"match":{"title":"x"}},"size":NaN}'}),
        ("deep JSON array (v1)", "POST", "/v1/search", {"content": deep.encode()}),
        ("deep JSON object (proxy)", "POST", "/products/_search", {"content": deep_obj.encode()}),
        (
            "deep query nesting (proxy)",
            "POST",
            "/products/_search",
            {"content": ('{"query":' + '{"bool":{"must":' * 60 + '{"match":{"title":"x"}}' + "}}" * 60 + "}").encode()},
        ),
        ("invalid UTF-8 (v1)", "POST", "/v1/search", {"content": b'{"query":"\xff\xfe\xfa"}'}),
        (
            "invalid UTF-8 (proxy)",
            "POST",
            "/products/_search",
            {"content": b'{"query":{"match":{"title":"\xc3\x28"}}}'},
        ),
        ("invalid UTF-8 (msearch)", "POST", "/_msearch", {"content": b'{"index":"products"}\n{"query":\xff}\n'}),
        ("lone surrogate escape", "POST", "/v1/search", {"content": b'{"query":"\\ud800 x"}'}),
        ("control characters", "POST", "/v1/search", {"json": {"query": "手表\x00\x01\x1b[31m\u202e\r\n\t"}}),
        ("NUL in product id path", "GET", "/v1/products/%00abc", {}),
        (
            "control chars in proxy text",
            "POST",
            "/products/_search",
            {"json": {"query": {"match": {"title": "\x00\x07\x7f手表"}}}},
        ),
        ("10k-char query (v1)", "POST", "/v1/search", {"json": {"query": q10k}}),
        ("10k-char query (proxy)", "POST", "/products/_search", {"json": {"query": {"match": {"title": q10k}}}}),
        ("100k-char query (v1)", "POST", "/v1/search", {"json": {"query": "x" * 100_000}}),
        ("10k-char query in rerank", "POST", "/v1/rerank", {"json": {"query": q10k, "documents": [q10k, "x"]}}),
        ("10k documents in rerank", "POST", "/v1/rerank", {"json": {"query": "x", "documents": ["d"] * 10_000}}),
        ("FTS5 syntax in query", "POST", "/v1/search", {"json": {"query": 'title:x* AND NEAR("a" "b") OR -"'}}),
        ("SQL in query", "POST", "/v1/search", {"json": {"query": "'; DROP TABLE products; --"}}),
        (
            "script_score query",
            "POST",
            "/products/_search",
            {"json": {"query": {"script_score": {"query": {"match_all": {}}, "script": SCRIPT}}}},
        ),
        (
            "script in bool.filter",
            "POST",
            "/products/_search",
            {
                "json": {
                    "query": {"bool": {"must": {"match": {"title": "x"}}, "filter": [{"script": {"script": SCRIPT}}]}}
                }
            },
        ),
        (
            "function_score script",
            "POST",
            "/products/_search",
            {"json": {"query": {"function_score": {"functions": [{"script_score": {"script": SCRIPT}}]}}}},
        ),
        ("script_fields", "POST", "/products/_search", {"json": {**match, "script_fields": {"f": {"script": SCRIPT}}}}),
        (
            "scripted_metric agg",
            "POST",
            "/products/_search",
            {"json": {"aggs": {"a": {"scripted_metric": {"map_script": "x"}}}}},
        ),
        ("_script sort", "POST", "/products/_search", {"json": {**match, "sort": {"_script": {"script": SCRIPT}}}}),
        (
            "runtime_mappings",
            "POST",
            "/products/_search",
            {"json": {**match, "runtime_mappings": {"x": {"script": SCRIPT}}}},
        ),
        (
            "stored script by id in a search",
            "POST",
            "/products/_search",
            {"json": {"query": {"script_score": {"query": {"match_all": {}}, "script": {"id": "evil"}}}}},
        ),
        ("stored script PUT", "PUT", "/_scripts/evil", {"json": {"script": SCRIPT}}),
        ("search template with stored script", "POST", "/products/_search/template", {"json": {"id": "evil"}}),
        ("script in _count", "POST", "/products/_count", {"json": {"query": {"script": {"script": SCRIPT}}}}),
        (
            "script in msearch",
            "POST",
            "/_msearch",
            {"content": b'{"index":"products"}\n{"query":{"script":{"script":"1"}}}\n'},
        ),
        (
            "msearch 10k lines",
            "POST",
            "/_msearch",
            {"content": b'{"index":"products"}\n{"query":{"match":{"t":"x"}}}\n' * 5000},
        ),
        ("msearch odd lines", "POST", "/_msearch", {"content": b'{"index":"products"}\n'}),
        ("timeout 20m (proxy)", "POST", "/products/_search", {"json": {**match, "timeout": "20m"}}),
        (
            "timeout huge (proxy)",
            "POST",
            "/products/_search",
            {"json": {**match, "timeout": "99999999999999999999999d"}},
        ),
        ("deadline_ms 1e308 (v1)", "POST", "/v1/search", {"json": {"query": "x", "deadline_ms": 1e308}}),
        ("deadline_ms 5e-324 (v1)", "POST", "/v1/search", {"json": {"query": "x", "deadline_ms": 5e-324}}),
        ("timeout 1nanos (proxy)", "POST", "/products/_search", {"json": {**match, "timeout": "1nanos"}}),
        (
            "sales 10**30 in an upsert",
            "POST",
            "/v1/products",
            {"json": {"products": [{"id": "big", "title": "x", "sales": 10**30}]}},
        ),
        ("mget 100k ids", "POST", "/products/_mget", {"json": {"ids": [str(i) for i in range(100_000)]}}),
        ("json body not an object", "POST", "/products/_search", {"json": [1, 2, 3]}),
        (
            "wrong content type",
            "POST",
            "/v1/search",
            {"content": b"query=x", "headers": {"content-type": "text/plain"}},
        ),
        ("empty body", "POST", "/v1/search", {"content": b""}),
        ("HEAD on search", "HEAD", "/products/_search", {}),
        ("OPTIONS on root", "OPTIONS", "/", {}),
        ("unknown method", "PROPFIND", "/products", {}),
        ("very long path", "GET", "/" + "a" * 8000 + "/_search", {}),
        ("huge header", "GET", "/healthz", {"headers": {"x-junk": "y" * 60_000}}),
    ]


def raw_http(base_url: str, data: bytes, timeout_s: float = 10.0) -> int:
    """Send raw bytes to the server; the status of its answer (0: it closed without one)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        sock.sendall(data)
        try:
            sock.shutdown(socket.SHUT_WR)
            head = sock.recv(64)
        except OSError:
            return 0
    fields = head.split(b" ", 2)
    return int(fields[1]) if len(fields) >= 2 and fields[1].isdigit() else 0


# -------------------------------------------------------------------------------- proxy body strategy

_FIELDS = st.sampled_from(["title", "brand", "category", "price", "stock", "id", "_id", "description", "x.y", ""])
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
_KEYS = st.sampled_from(
    [
        "query",
        "match",
        "multi_match",
        "query_string",
        "simple_query_string",
        "match_phrase",
        "bool",
        "must",
        "should",
        "filter",
        "must_not",
        "term",
        "terms",
        "range",
        "ids",
        "values",
        "match_all",
        "gte",
        "lte",
        "gt",
        "lt",
        "size",
        "from",
        "_source",
        "sort",
        "timeout",
        "track_total_hits",
        "aggs",
        "script",
        "script_score",
        "knn",
        "vector",
        "explain",
        "includes",
        "excludes",
        "fields",
        "boost",
        "_name",
        "order",
        "value",
    ]
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(_KEYS, _FIELDS, st.text(max_size=8)), inner, max_size=4)
    ),
    max_leaves=25,
)


@st.composite
def proxy_body(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-shaped text searches with hostile parts, sometimes pure noise."""
    if draw(st.booleans()):
        return draw(st.dictionaries(_KEYS, _JSON, max_size=5))
    text_kind = draw(st.sampled_from(["match", "multi_match", "query_string", "simple_query_string", "match_phrase"]))
    text = draw(st.one_of(st.text(max_size=60), _SCALARS))
    if text_kind in ("match", "match_phrase"):
        clause: Any = {
            text_kind: {draw(_FIELDS): draw(st.one_of(st.just(text), st.fixed_dictionaries({"query": _JSON})))}
        }
    else:
        clause = {text_kind: {"query": text, "fields": draw(st.lists(_FIELDS, max_size=3))}}
    body: dict[str, Any] = {"query": clause}
    if draw(st.booleans()):
        filters = draw(st.lists(st.dictionaries(_KEYS, _JSON, min_size=1, max_size=2), max_size=3))
        body["query"] = {"bool": {"must": clause, "filter": filters}}
    for key in draw(st.lists(st.sampled_from(["size", "from", "_source", "sort", "timeout", "explain"]), max_size=3)):
        body[key] = draw(_JSON)
    return body


_INDEX = st.one_of(
    st.sampled_from(
        [
            "products",
            "products-v1",
            "products*",
            "*",
            "_all",
            "..",
            "%2e%2e",
            "a,b",
            "products,other",
            "remote:products",
            "PRODUCTS",
            "-products",
            ".kibana",
            "products%2Fx",
            "products?x",
        ]
    ),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12),
)
_SUFFIX = st.sampled_from(["_search", "_count", "_msearch", "_mget", "_doc/p1", "_source/p1", "", "_mapping", "_bulk"])


def proxy_requests() -> st.SearchStrategy[tuple[str, str, dict[str, Any]]]:
    @st.composite
    def build(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
        method = draw(st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "DELETE", "HEAD"]))
        from urllib.parse import quote

        path = "/" + quote(draw(_INDEX), safe="*,:%") + ("/" + draw(_SUFFIX) if draw(st.booleans()) else "/_search")
        kind = draw(st.sampled_from(["body", "body", "raw", "params"]))
        if kind == "body":
            return method, path, {"content": json.dumps(draw(proxy_body()), allow_nan=True).encode()}
        if kind == "raw":
            return method, path, {"content": draw(st.binary(max_size=200))}
        params = draw(
            st.dictionaries(
                st.sampled_from(["q", "size", "from", "_source", "sort", "timeout"]), st.text(max_size=20), max_size=3
            )
        )
        return method, path, {"params": params}

    return build()


# ------------------------------------------------------------------------------------------- running


class Tally:
    """Status histogram and every ≥ 500 response, by source."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.by_source: Counter[str] = Counter()
        self.server_errors: list[dict[str, Any]] = []
        self.transport_errors: list[dict[str, Any]] = []
        self.latencies_ms: list[float] = []
        self.no_cases: list[str] = []  # schemathesis operations/modes without any case to generate

    def send(self, client: httpx.Client, source: str, method: str, path: str, kwargs: dict[str, Any]) -> int:
        t0 = time.perf_counter()
        if "raw" in kwargs:  # bytes no HTTP client would send
            status = raw_http(str(client.base_url), kwargs["raw"])
            self.latencies_ms.append((time.perf_counter() - t0) * 1000.0)
            self.statuses[status] += 1
            self.by_source[source] += 1
            if status >= 500:
                self.server_errors.append({"source": source, "raw": repr(kwargs["raw"][:200]), "status": status})
            return status
        try:
            r = client.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            self.transport_errors.append({"source": source, "method": method, "path": path[:200], "error": repr(err)})
            return -1
        self.latencies_ms.append((time.perf_counter() - t0) * 1000.0)
        self.statuses[r.status_code] += 1
        self.by_source[source] += 1
        if r.status_code >= 500:
            shown = {k: (v[:300] if isinstance(v, (bytes, str)) else v) for k, v in kwargs.items() if k != "content"}
            if isinstance(kwargs.get("content"), bytes):
                shown["content"] = kwargs["content"][:300]
            self.server_errors.append(
                {
                    "source": source,
                    "method": method,
                    "path": path[:200],
                    "request": repr(shown)[:600],
                    "status": r.status_code,
                    "body": r.text[:300],
                }
            )
        return r.status_code

    def summary(self) -> dict[str, Any]:
        return {
            "requests": sum(self.statuses.values()),
            "by_source": dict(self.by_source),
            "status_histogram": {str(k): v for k, v in sorted(self.statuses.items())},
            "responses_5xx": sum(v for k, v in self.statuses.items() if k >= 500),
            "transport_errors": len(self.transport_errors),
            "server_error_examples": self.server_errors[:20],
            "transport_error_examples": self.transport_errors[:10],
            "operations_without_cases": self.no_cases,
        }


def run_schemathesis(
    client: httpx.Client, openapi: dict[str, Any], tally: Tally, *, per_operation: int, seed_: int
) -> None:
    """Positive and negative cases for every operation of the OpenAPI schema, sent to the live service."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(openapi)
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)
            source = f"schemathesis:{mode.value}"

            @seed(seed_)
            @settings(
                max_examples=per_operation,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                phases=["generate"],
            )
            @given(strategy)
            def send(case: Any) -> None:
                kw = case.as_transport_kwargs(base_url=str(client.base_url))
                request: dict[str, Any] = {
                    "headers": {
                        k: v for k, v in kw.get("headers", {}).items() if k.lower() not in {"user-agent", "connection"}
                    },
                    "params": kw.get("params") or None,
                }
                if "json" in kw:
                    request["content"] = json.dumps(kw["json"], allow_nan=True).encode()
                    request["headers"]["content-type"] = "application/json"
                elif kw.get("data") is not None:
                    data = kw["data"]
                    request["content"] = data if isinstance(data, bytes) else str(data).encode("utf-8", "surrogatepass")
                url = kw["url"].removeprefix(str(client.base_url).rstrip("/"))
                tally.send(client, source, kw["method"], url, request)  # noqa: B023 - send() runs within this iteration

            try:
                send()
            except Unsatisfiable:  # e.g. no negative case exists for a free-form string path parameter
                tally.no_cases.append(f"{operation.label} ({mode.value})")
            except Exception as err:  # hypothesis could not generate for this operation: recorded, not hidden
                failure = {"source": "schemathesis", "path": operation.label, "error": repr(err)[:300]}
                tally.transport_errors.append(failure)


def run_proxy_fuzz(client: httpx.Client, tally: Tally, *, examples: int, seed_: int) -> None:
    @seed(seed_)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=["generate"],
    )
    @given(proxy_requests())
    def send(req: tuple[str, str, dict[str, Any]]) -> None:
        method, path, kwargs = req
        tally.send(client, "hypothesis:proxy", method, path, kwargs)

    send()


def run_nasty(client: httpx.Client, tally: Tally, max_body: int) -> list[dict[str, Any]]:
    rows = []
    for name, method, path, kwargs in nasty_requests(max_body):
        t0 = time.perf_counter()
        status = tally.send(client, "nasty", method, path, kwargs)
        rows.append({"case": name, "status": status, "ms": round((time.perf_counter() - t0) * 1000.0, 1)})
    return rows


class ErrorLog(logging.Handler):
    """Collects ERROR records of the service (an unhandled exception logs one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()[:300]}")


def run(work: Any, *, quick: bool, seed_: int = 7) -> dict[str, Any]:
    """Against uvicorn on loopback: schemathesis + proxy fuzzing + the nasty list; counts and 5xx."""
    from benchmarks.reliability.common import demo_store, live_server, load_models, make_app, service_settings

    embedder, reranker = load_models(work)
    store = demo_store(work / "hostile-store", embedder)
    settings = service_settings(work / "hostile-store", enable_writes=True, max_queue=256)
    app = make_app(store, embedder, reranker, settings)
    openapi = app.openapi()
    n_ops = sum(len(v) for v in openapi["paths"].values())
    total = 600 if quick else 10_500
    per_op = max(5, int(total * 0.6 / (2 * n_ops)))
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    tally = Tally()
    started = time.monotonic()
    try:
        with live_server(app) as url, httpx.Client(base_url=url, timeout=30.0) as client:
            nasty = run_nasty(client, tally, settings.server.max_body_bytes)
            run_schemathesis(client, openapi, tally, per_operation=per_op, seed_=seed_)
            run_proxy_fuzz(client, tally, examples=max(100, total - tally.statuses.total()), seed_=seed_)
            alive = client.get("/healthz").status_code == 200
    finally:
        logging.getLogger().removeHandler(errors)
        store.close()
    unhandled = [r for r in errors.records if "unhandled" in r]
    return {
        **tally.summary(),
        "operations": n_ops,
        "schemathesis_examples_per_operation_and_mode": per_op,
        "seconds": round(time.monotonic() - started, 1),
        "alive_after": alive,
        "unhandled_errors_logged": len(unhandled),
        "unhandled_examples": unhandled[:10],
        "nasty": nasty,
    }
