"""The storefront response: facets (disjunctive, over the counted set), highlighting, autocomplete,
over the REST API and the OpenSearch-compatible proxy.

Facet counts are checked against a brute-force count over the catalog (`Filters.matches` and a plain
word split, as in test_backend_primitives), never against either engine's own answer. "opensearch"
runs when OPENSEARCH_URL is set (`tests/opensearch/with-node python -m pytest ... -k opensearch`).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from middleware.backends.base import Backend, MatchSet
from middleware.budget import Deadline, DeadlineExceeded, Stopwatch
from middleware.config import Settings
from middleware.pipeline import Pipeline
from middleware.products import Filters, Product
from middleware.schema import FacetRequest, SearchRequest
from middleware.storefront import PopularQueries, StorefrontError, check_tags, compute_facets, facet_plan
from tests.test_backend_primitives import BRANDS, CATALOG, COLORS, backend, expected_set
from tests.test_server_support import make_app, server_models, server_store

__all__ = ["backend", "server_models", "server_store"]  # fixtures, imported for pytest

LEXICAL = Settings(embedder="none", reranker="none", deadline_ms=30_000, max_deadline_ms=30_000)
WORDS = (*COLORS, "sneakers", "boots", "jacket", "sleek", "snug", "waterproof", "mesh", "acme", "runner")
CATEGORIES = ("shoes", "apparel", "outdoor")
PRICE_RANGES = [[0, 50], [50, 150], [150, None]]


@pytest.fixture(scope="module")
def pipeline(backend: Backend) -> Iterator[Pipeline]:
    p = Pipeline(LEXICAL, backend, owns_backend=False)
    yield p
    p.close()


def search(pipeline: Pipeline, query: str, filters: Filters | None = None, **extra) -> dict:
    facets = ["brand", "category", {"field": "price", "ranges": PRICE_RANGES}, {"field": "price", "stats": True}]
    body = {"query": query, "filters": filters, "size": 5, "facets": facets, "business_enabled": False, **extra}
    return pipeline.search(SearchRequest.model_validate(body)).model_dump(mode="json", by_alias=True)


def relaxed(filters: Filters | None, *names: str) -> Filters | None:
    if filters is None:
        return None
    return filters.model_copy(update=dict.fromkeys(names))


def brute_force(query: str, filters: Filters | None, disjunctive: bool) -> dict:
    """The facets the catalog itself gives: counts over the lexical matches under (relaxed) filters."""

    def over(*own: str) -> list[Product]:
        return expected_set(query, relaxed(filters, *own) if disjunctive else filters)

    def values(products: list[Product], field: str) -> list[dict]:
        counts: Counter[str] = Counter()
        for p in products:
            counts.update(p.category if field == "category" else [p.brand] if p.brand else [])
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        return [{"value": v, "count": c} for v, c in ranked]

    priced = [p.price for p in over("price_min", "price_max") if p.price is not None]
    ranges = [
        {"from": a, "to": b, "count": sum(1 for x in priced if x >= a and (b is None or x < b))}
        for a, b in PRICE_RANGES
    ]
    all_prices = priced  # a stats facet on price also leaves the price bounds out (the slider's full range)
    return {
        "brand": values(over("brand"), "brand"),
        "category": values(over("category"), "category"),
        "price": ranges,
        "price_stats": {
            "count": len(all_prices),
            "min": min(all_prices, default=None),
            "max": max(all_prices, default=None),
            "sum": sum(all_prices),
            "avg": sum(all_prices) / len(all_prices) if all_prices else None,
        },
    }


def assert_facets_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in ("brand", "category", "price"):
        assert got[name] == want[name], name
    g, w = got["price_stats"], want["price_stats"]
    assert (g["count"], g["min"], g["max"]) == (w["count"], w["min"], w["max"])
    assert g["sum"] == pytest.approx(w["sum"]) and (g["avg"] == w["avg"] or g["avg"] == pytest.approx(w["avg"]))


# ------------------------------------------------------------------ facets: both backends, fixed cases

FIXED = [
    ("sneakers", None),
    ("red boots", Filters(brand=["Acme"])),
    ("waterproof jacket", Filters(category=["outdoor"], price_max=120.0)),
    ("sleek snug", Filters(brand=["Borealis", "Cobalt"], in_stock=True)),
    ("blue", Filters(price_min=40.0, price_max=160.0, category=["shoes", "apparel"])),
]


@pytest.mark.parametrize("disjunctive", [True, False])
@pytest.mark.parametrize(("query", "filters"), FIXED)
def test_facets_equal_a_brute_force_count(pipeline, query, filters, disjunctive):
    got = search(pipeline, query, filters, disjunctive_facets=disjunctive)
    assert got["degraded"] == []
    assert_facets_equal(got["facets"], brute_force(query, filters, disjunctive))


def test_disjunctive_facets_show_the_other_brands(pipeline):
    picked = search(pipeline, "sneakers", Filters(brand=["Acme"]))
    brands = {b["value"]: b["count"] for b in picked["facets"]["brand"]}
    everything = {b["value"]: b["count"] for b in search(pipeline, "sneakers")["facets"]["brand"]}
    assert brands == everything and set(brands) == set(BRANDS)  # the alternatives, counted without the pick
    # the other facets do honour the brand filter
    acme_only = expected_set("sneakers", Filters(brand=["Acme"]))
    assert sum(b["count"] for b in picked["facets"]["price"]) == sum(1 for p in acme_only if p.price is not None)

    post_filter = search(pipeline, "sneakers", Filters(brand=["Acme"]), disjunctive_facets=False)
    assert [b["value"] for b in post_filter["facets"]["brand"]] == ["Acme"]


def test_facets_never_count_the_whole_store(pipeline):
    got = search(pipeline, "snug", None)
    assert sum(c["count"] for c in got["facets"]["brand"]) == sum(1 for p in expected_set("snug") if p.brand)
    assert got["facets"]["price_stats"]["count"] < len(CATALOG) / 5


def test_facets_obey_the_deadline_whole_or_absent(pipeline):
    """Counting that outlasts the request's budget is dropped (degraded), never cut short: a spent
    budget stops before the next backend call, and the response does not wait past it."""
    plan = facet_plan(["brand", FacetRequest(field="price", stats=True)])
    match = MatchSet("sneakers", Filters(brand=["Acme"]))
    with pytest.raises(DeadlineExceeded):
        compute_facets(pipeline.backend, match, plan, deadline=Deadline(0.001))
    counted = compute_facets(pipeline.backend, match, plan, deadline=Deadline(30_000))
    brands = sum(b.count for b in counted["brand"])  # type: ignore[union-attr]
    assert brands == sum(1 for p in expected_set("sneakers") if p.brand)  # the brand facet leaves its filter out

    release = threading.Event()

    def slow_count() -> tuple[dict, float]:
        release.wait(10)
        return compute_facets(pipeline.backend, match, plan), time.perf_counter()

    with ThreadPoolExecutor(1) as executor:
        future = executor.submit(slow_count)
        degraded: list[str] = []
        started = time.perf_counter()
        assert pipeline._facets(future, Deadline(50), Stopwatch(), degraded) is None
        assert degraded == ["facets"] and time.perf_counter() - started < 5
        release.set()
        found, _ = future.result()  # the abandoned count ends on its own
        assert found == counted
        assert pipeline._facets(future, Deadline(50), Stopwatch(), []) == counted  # in time: all of them


# ------------------------------------------------------------------ facets: property test (embedded)

filters_strategy = st.builds(
    lambda brands, cats, low, high, stock: Filters(
        brand=brands or None,
        category=cats or None,
        price_min=min(low, high) if low is not None and high is not None else low,
        price_max=max(low, high) if low is not None and high is not None else high,
        in_stock=stock,
    ),
    st.lists(st.sampled_from(BRANDS), max_size=2, unique=True),
    st.lists(st.sampled_from(CATEGORIES), max_size=2, unique=True),
    st.one_of(st.none(), st.floats(0, 200, allow_nan=False)),
    st.one_of(st.none(), st.floats(0, 200, allow_nan=False)),
    st.sampled_from([None, True]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=3, unique=True),
    filters=st.one_of(st.none(), filters_strategy),
    disjunctive=st.booleans(),
)
def test_facets_property_embedded(pipeline, words, filters, disjunctive):
    if type(pipeline.backend).__name__ != "EmbeddedBackend":
        pytest.skip("the property test runs on the embedded store; opensearch has the fixed cases")
    query = " ".join(words)
    got = search(pipeline, query, filters, disjunctive_facets=disjunctive)
    assert_facets_equal(got["facets"], brute_force(query, filters, disjunctive))


# ------------------------------------------------------------------ plan and tag checks


@pytest.mark.parametrize(
    ("facets", "param"),
    [
        (["color"], "facets[0].field"),
        (["brand", {"field": "weight", "stats": True}], "facets[1].field"),
        ([{"field": "price"}], "facets[0]"),
        ([{"field": "price", "ranges": [[0, 10]]}, {"field": "price", "ranges": [[10, 20]]}], "facets[1].name"),
        ([{"field": "price", "ranges": [[50, 10]]}], "facets[0].ranges[0]"),
        ([{"field": "brand", "stats": True}], "facets[0]"),
    ],
)
def test_bad_facets_name_the_parameter(facets, param):
    with pytest.raises(StorefrontError) as err:
        facet_plan(SearchRequest(query="x", facets=facets).facets)
    assert err.value.param == param


def test_range_and_stats_on_one_field_do_not_collide():
    facets = [
        {"field": "price", "ranges": [[0, 1]]},
        {"field": "price", "stats": True},
        {"field": "price", "ranges": [[5, None]], "name": "premium"},
    ]
    plan = facet_plan(SearchRequest(query="x", facets=facets).facets)
    assert [f.name for f in plan] == ["price", "price_stats", "premium"]


@pytest.mark.parametrize(
    "tag",
    ["<script>", "<em onclick=alert(1)>", '<span class="x" onmouseover="y">', '<span class="a"b">', "<EM>", "em",
     "<img src=x>", "<em><script>", '<span class="">', "<a href=javascript:x>"],
)  # fmt: skip
def test_tags_outside_the_whitelist_are_refused(tag):
    with pytest.raises(StorefrontError) as err:
        check_tags(tag, None)
    assert err.value.param == "highlight.pre_tag"


def test_allowed_tags_and_their_closing_tags():
    assert check_tags("<mark>", None) == ("<mark>", "</mark>")
    assert check_tags('<span class="hl brand-1">', "</span>") == ('<span class="hl brand-1">', "</span>")
    with pytest.raises(StorefrontError) as err:
        check_tags("<mark>", "</em>")
    assert err.value.param == "highlight.post_tag"


# ------------------------------------------------------------------ highlight: both backends


def test_highlight_escapes_text_and_keeps_only_the_tags(pipeline):
    got = search(pipeline, "runner", None, highlight={"pre_tag": "<mark>"}, facets=None)
    assert got["degraded"] == []
    hit = next(h for h in got["hits"] if h["id"] == "html1")
    title = hit["highlight"]["title"][0]
    assert "<mark>runner</mark>" in title and "&lt;b&gt;" in title and "&amp;" in title
    description = hit["highlight"]["description"][0]
    assert "<script>" not in description and "&lt;script&gt;" in description
    stripped = title.replace("<mark>", "").replace("</mark>", "")
    assert "<" not in stripped and ">" not in stripped


def test_highlight_of_cjk_spans(pipeline):
    got = search(pipeline, "连衣裙", None, highlight=True, facets=None)
    hit = next(h for h in got["hits"] if h["id"] == "zh1")
    assert "<em>" in hit["highlight"]["title"][0] and "连衣裙" in hit["highlight"]["title"][0].replace(
        "<em>", ""
    ).replace("</em>", "")


# ------------------------------------------------------------------ suggest


def test_popular_queries_are_bounded_and_ranked():
    popular = PopularQueries(capacity=3, min_count=1)
    for q, times in (("送女友 手表", 5), ("送女友礼物", 3), ("送妈妈", 1)):
        for _ in range(times):
            popular.record(q)
    for i in range(10):  # one-off queries do not grow it past twice the capacity
        popular.record(f"one off {i}")
        assert len(popular) < 6
    assert popular.with_prefix("送女", 5)[0] == ("送女友 手表", 5)
    assert popular.with_prefix("  送女友  ", 5)[1] == ("送女友礼物", 3)
    assert PopularQueries(min_count=2).with_prefix("送", 5) == []
    twice = PopularQueries(min_count=2)
    twice.record("送花")
    assert twice.with_prefix("送", 5) == []
    twice.record("送花")
    assert twice.with_prefix("送", 5) == [("送花", 2)]


@pytest.fixture(scope="module")
def client(server_store, server_models):
    with TestClient(make_app(server_store, *server_models)) as c:
        yield c


def test_suggest_from_the_catalog_and_past_queries(client):
    r = client.get("/v1/suggest", params={"q": "OME", "size": 8})
    assert r.status_code == 200, r.text
    assert {"text": "OMEGA", "kind": "brand", "count": 1} in r.json()["suggestions"]
    catalog = client.get("/v1/suggest", params={"q": "手", "size": 8}).json()["suggestions"]
    assert catalog and all(s["text"].startswith("手") and s["kind"] != "query" for s in catalog)

    assert client.post("/v1/search", json={"query": "手表礼盒装", "size": 3}).json()["total"] > 0
    once = client.get("/v1/suggest", params={"q": "手", "size": 8}).json()["suggestions"]
    assert all(s["kind"] != "query" for s in once)  # a query searched once is not offered to others
    client.post("/v1/search", json={"query": "手表礼盒装 ", "size": 3})  # the same query, normalised
    after = client.get("/v1/suggest", params={"q": "手", "size": 8}).json()["suggestions"]
    assert {"text": "手表礼盒装", "kind": "query", "count": 2} in after


def test_suggest_bad_input(client):
    assert client.get("/v1/suggest", params={"q": ""}).status_code in (400, 422)
    r = client.get("/v1/suggest", params={"q": "手", "size": 0})
    assert r.status_code in (400, 422) and "size" in r.text


# ------------------------------------------------------------------ REST over the service


def test_rest_facets_and_highlight(client):
    price = {"field": "price", "ranges": [[0, 1000], [1000, None]]}
    body = {"query": "手表", "size": 3, "facets": ["category", "brand", price], "highlight": True}
    r = client.post("/v1/search", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert {"value": "手表", "count": 12} in got["facets"]["category"] or got["facets"]["category"][0][
        "value"
    ] == "手表"
    assert [b["from"] for b in got["facets"]["price"]] == [0, 1000]


def test_rest_facets_count_lexical_matches_plus_vector_hits(client, server_store):
    filters = {"price_max": 3000}
    body = {"query": "手表", "size": 50, "explain": True, "filters": filters, "facets": ["brand"],
            "disjunctive_facets": False, "business_enabled": False}  # fmt: skip
    got = client.post("/v1/search", json=body).json()
    vector_hits = tuple(h["id"] for h in got["hits"] if "knn" in h["explain"]["ranks"])
    assert vector_hits  # the demo store has vectors: the seam is exercised
    lexical = server_store.listing(MatchSet("手表", Filters(**filters)), [], 0, 1000)
    counted = {c.id for c in lexical} | set(vector_hits)
    products = [p for p in server_store.get(sorted(counted)) if Filters(**filters).matches(p)]
    want = Counter(p.brand for p in products if p.brand)
    assert {b["value"]: b["count"] for b in got["facets"]["brand"]} == dict(
        sorted(want.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"facets": ["colour"]}, "facets[0].field"),
        ({"highlight": {"pre_tag": "<em onclick=x>"}}, "highlight.pre_tag"),
        ({"highlight": {"pre_tag": "<b>", "post_tag": "</b><script>"}}, "highlight.post_tag"),
        ({"highlight": {"fields": ["brand"]}}, "highlight.fields[0]"),
    ],
)
def test_rest_bad_input_is_a_400_naming_it(client, extra, param):
    r = client.post("/v1/search", json={"query": "手表", **extra})
    assert r.status_code == 400, r.text
    assert r.json()["param"] == param


# ------------------------------------------------------------------ proxy


def proxy(client, body: dict) -> dict:
    r = client.post("/products/_search", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_proxy_aggs_in_opensearch_shape_equal_the_rest_facets(client):
    query = {"bool": {"must": [{"match": {"title": "手表"}}], "filter": [{"range": {"price": {"lte": 50000}}}]}}
    aggs = {
        "brands": {"terms": {"field": "brand.keyword", "size": 3}},
        "prices": {"range": {"field": "price", "ranges": [{"to": 1000}, {"from": 1000, "key": "dear"}]}},
        "cheapest": {"min": {"field": "price"}},
        "price_stats": {"stats": {"field": "price"}},
        "women": {"filter": {"term": {"category": "女表"}}, "aggs": {"top": {"max": {"field": "price"}}}},
        "kinds": {
            "filters": {"filters": {"women": {"term": {"category": "女表"}}, "men": {"term": {"category": "男表"}}}}
        },
    }
    got = proxy(client, {"query": query, "size": 0, "aggs": aggs})["aggregations"]
    rest = client.post(
        "/v1/search",
        json={
            "query": "手表",
            "size": 0,
            "filters": {"price_max": 50000},
            "disjunctive_facets": False,
            "facets": [
                {"field": "brand", "size": 3},
                {"field": "price", "ranges": [[None, 1000], [1000, None]]},
                {"field": "price", "stats": True},
            ],
        },
    ).json()["facets"]
    assert [(b["key"], b["doc_count"]) for b in got["brands"]["buckets"]] == [
        (b["value"], b["count"]) for b in rest["brand"]
    ]
    assert "sum_other_doc_count" in got["brands"] and got["brands"]["doc_count_error_upper_bound"] == 0
    assert got["prices"]["buckets"][0] == {"key": "*-1000.0", "to": 1000.0, "doc_count": rest["price"][0]["count"]}
    assert got["prices"]["buckets"][1]["key"] == "dear"
    assert got["cheapest"] == {"value": rest["price_stats"]["min"]}
    assert got["price_stats"]["count"] == rest["price_stats"]["count"]
    women = got["women"]["doc_count"]
    assert 0 < women == got["kinds"]["buckets"]["women"]["doc_count"] <= rest["price_stats"]["count"]
    assert got["women"]["top"]["value"] <= rest["price_stats"]["max"]


def test_proxy_other_aggregations_are_refused_by_name(client):
    r = client.post(
        "/products/_search",
        json={"query": {"match": {"title": "手表"}}, "aggs": {"n": {"cardinality": {"field": "brand"}}}},
    )
    assert r.status_code == 400 and "cardinality" in r.json()["error"]["reason"]


def test_proxy_highlight_in_opensearch_shape(client):
    body = {"query": {"match": {"title": "手表"}}, "size": 3,
            "highlight": {"pre_tags": ["<mark>"], "post_tags": ["</mark>"], "fields": {"title": {}}}}  # fmt: skip
    hits = proxy(client, body)["hits"]["hits"]
    assert any("<mark>" in h.get("highlight", {}).get("title", [""])[0] for h in hits)
    bad = client.post(
        "/products/_search",
        json={**body, "highlight": {"pre_tags": ["<img src=x onerror=y>"], "fields": {"title": {}}}},
    )
    assert bad.status_code == 400 and "highlight.pre_tags" in bad.json()["error"]["reason"]


def test_proxy_completion_suggest(client):
    body = {"query": {"match": {"title": "手表"}}, "size": 0,
            "suggest": {"s": {"prefix": "OME", "completion": {"field": "suggest", "size": 5}}}}  # fmt: skip
    entry = proxy(client, body)["suggest"]["s"][0]
    assert entry["text"] == "OME" and "OMEGA" in [o["text"] for o in entry["options"]]
    term = {**body, "suggest": {"s": {"text": "手", "term": {"field": "title"}}}}
    r = client.post("/products/_search", json=term)
    assert r.status_code == 400 and "term suggester" in r.json()["error"]["reason"]


def test_msearch_answers_aggs_per_search(client):
    search_line = {"query": {"match": {"title": "手表"}}, "size": 0, "aggs": {"b": {"terms": {"field": "brand"}}}}
    ndjson = "\n".join(json.dumps(x, ensure_ascii=False) for x in ({"index": "products"}, search_line)) + "\n"
    r = client.post("/_msearch", content=ndjson.encode(), headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 200, r.text
    item = r.json()["responses"][0]
    assert item["status"] == 200 and item["aggregations"]["b"]["buckets"]


def test_proxy_aggs_when_nothing_can_match_and_post_filter_narrows_hits_only(client):
    contradiction = {
        "bool": {"must": {"match": {"title": "手表"}}, "filter": [{"term": {"brand": "A"}}, {"term": {"brand": "B"}}]}
    }
    aggs = {
        "b": {"terms": {"field": "brand"}},
        "p": {"stats": {"field": "price"}},
        "f": {"filter": {"term": {"brand": "A"}}},
    }
    got = proxy(client, {"query": contradiction, "aggs": aggs})["aggregations"]
    assert got["b"]["buckets"] == [] and got["p"]["count"] == 0 and got["p"]["min"] is None
    assert got["f"] == {"doc_count": 0}
    body = {"query": {"match": {"title": "手表"}}, "post_filter": {"term": {"brand": "A"}}, "aggs": aggs}
    narrowed = proxy(client, body)
    assert narrowed["hits"]["total"]["value"] == 0  # no product of brand A
    whole = proxy(client, {"query": {"match": {"title": "手表"}}, "aggs": aggs})["aggregations"]
    assert narrowed["aggregations"]["b"] == whole["b"] and whole["b"]["buckets"]
