"""The OpenSearch proxy keeps OpenSearch's meaning: each clause is answered as OpenSearch would, or refused
with a 400 naming it. A small catalog in an embedded store, behind the real app (TestClient)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from middleware.backends.embedded import EmbeddedBackend
from middleware.products import Product
from tests.test_server_support import make_app, server_models

__all__ = ["server_models"]  # fixture, imported for pytest

CATALOG = [
    Product(
        id="shoe",
        title="running shoes",
        description="light shoes for running",
        brand="Acme",
        category=["shoes"],
        price=80,
        stock=5,
        sales=10,
    ),
    Product(id="boot", title="leather boots", brand="running", category=["shoes"], price=120, stock=2, sales=3),
    Product(id="sock", title="wool socks", brand="Acme", category=["socks"], price=9, stock=0, sales=50),
    Product(
        id="cap",
        title="running cap",
        description="a cap for the sun",
        brand="Peak",
        category=["hats"],
        price=25,
        stock=9,
        sales=1,
    ),
    Product(id="tee", title="cotton tee", brand="Peak", category=["shirts"], price=15, stock=4, sales=7),
]
PRICES = {p.id: p.price for p in CATALOG}


@pytest.fixture(scope="module")
def client(server_models, tmp_path_factory) -> Iterator[TestClient]:
    embedder, reranker = server_models
    store = EmbeddedBackend(Path(tmp_path_factory.mktemp("faithful")), dim=embedder.dim)
    store.upsert(CATALOG, embedder.encode_documents([p.embedding_text() for p in CATALOG]))
    with TestClient(make_app(store, embedder, reranker)) as c:
        yield c
    store.close()


def search(client: TestClient, body: dict, **params: str) -> dict:
    r = client.post("/products/_search", json=body, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def ids(answer: dict) -> list[str]:
    return [h["_id"] for h in answer["hits"]["hits"]]


# ------------------------------------------------------------------------------------------ honoured


@pytest.mark.parametrize(
    "query",
    [
        {"match": {"brand": "running"}},
        {"match": {"brand": {"query": "running"}}},
        {"bool": {"must": [{"match": {"brand.keyword": "running"}}]}},
        {"term": {"brand": "running"}},
        {"constant_score": {"filter": {"term": {"brand": "running"}}}},
    ],
)
def test_match_on_brand_is_scoped_to_the_brand(client, query):
    # "running shoes" and "running cap" carry the word in their titles, not as their brand
    answer = search(client, {"query": query})
    assert ids(answer) == ["boot"] and answer["hits"]["total"] == {"value": 1, "relation": "eq"}


def test_match_on_category_filters_by_category(client):
    assert sorted(ids(search(client, {"query": {"match": {"category": "shoes"}}}))) == ["boot", "shoe"]


@pytest.mark.parametrize("body", [{}, {"query": {"match_all": {}}}, {"query": {"match_all": {"boost": 2}}}])
def test_match_all_and_no_query_browse_every_product(client, body):
    answer = search(client, {**body, "size": 10})
    assert sorted(ids(answer)) == sorted(PRICES) and answer["hits"]["total"]["value"] == len(CATALOG)


def test_match_none_matches_nothing(client):
    assert search(client, {"query": {"match_none": {}}})["hits"]["total"]["value"] == 0


def test_sort_by_price_and_search_after_continue_in_order(client):
    body = {"query": {"match_all": {}}, "sort": [{"price": {"order": "asc"}}], "size": 2}
    first = search(client, body)
    assert ids(first) == ["sock", "tee"]
    seen = ids(first)
    after = first["hits"]["hits"][-1]["sort"]
    while after:
        page = search(client, {**body, "search_after": after})
        seen += ids(page)
        after = page["hits"]["hits"][-1].get("sort") if page["hits"]["hits"] else None
    assert seen == sorted(PRICES, key=lambda i: PRICES[i])
    desc = search(client, {"query": {"match_all": {}}}, sort="price:desc", size="10")
    assert ids(desc) == sorted(PRICES, key=lambda i: -PRICES[i])


def test_track_total_hits(client):
    body = {"query": {"match_all": {}}, "size": 1}
    assert search(client, {**body, "track_total_hits": 2})["hits"]["total"] == {"value": 2, "relation": "gte"}
    assert search(client, {**body, "track_total_hits": True})["hits"]["total"] == {"value": 5, "relation": "eq"}
    assert "total" not in search(client, {**body, "track_total_hits": False})["hits"]
    assert search(client, body, rest_total_hits_as_int="true")["hits"]["total"] == 5


def test_post_filter_narrows_hits_but_not_aggregations(client):
    body = {
        "query": {"match": {"category": "shoes"}},
        "post_filter": {"term": {"brand": "Acme"}},
        "aggs": {"brands": {"terms": {"field": "brand"}}},
    }
    answer = search(client, body)
    assert ids(answer) == ["shoe"] and answer["hits"]["total"]["value"] == 1
    buckets = {b["key"]: b["doc_count"] for b in answer["aggregations"]["brands"]["buckets"]}
    assert buckets == {"Acme": 1, "running": 1}


def test_count_with_a_query(client):
    assert client.post("/products/_count", json={"query": {"match": {"brand": "Peak"}}}).json()["count"] == 2
    body = {"query": {"bool": {"filter": [{"range": {"price": {"lt": 20}}}]}}}
    assert client.post("/products/_count", json=body).json()["count"] == 2
    assert client.get("/products/_count").json()["count"] == 5


def test_in_stock_filter(client):
    answer = search(client, {"query": {"bool": {"filter": {"range": {"stock": {"gt": 0}}}}}, "size": 10})
    assert "sock" not in ids(answer) and answer["hits"]["total"]["value"] == 4


def test_text_search_with_default_options_is_answered(client):
    body = {"query": {"multi_match": {"query": "running", "fields": ["title^3", "description"],
                                      "operator": "or", "type": "best_fields"}}}  # fmt: skip
    answer = search(client, body)
    assert "shoe" in ids(answer) or "cap" in ids(answer)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"match": {"title": {"query": "running shoes", "operator": "and"}}}, ["shoe"]),
        ({"match": {"title": {"query": "running shoes"}}}, None),  # any word, or by meaning: a superset
        ({"match": {"description": {"query": "running shoes", "operator": "AND"}}}, ["shoe"]),
        ({"multi_match": {"query": "cap sun", "fields": ["title", "description"], "operator": "and"}}, ["cap"]),
        ({"multi_match": {"query": "cap sun", "fields": ["title"], "operator": "and"}}, []),
        ({"multi_match": {"query": "shoes leather", "fields": ["title", "description"], "operator": "and",
                          "type": "cross_fields"}}, []),
        ({"match": {"title": {"query": "running wool cap", "minimum_should_match": 2}}}, ["cap"]),
        ({"match": {"title": {"query": "running wool cap", "minimum_should_match": "-1"}}}, ["cap"]),
        ({"match": {"title": {"query": "running wool cap", "minimum_should_match": "100%"}}}, []),
        ({"match_phrase": {"title": "running shoes"}}, ["shoe"]),
        ({"match_phrase": {"title": "shoes running"}}, []),
        ({"match_phrase": {"description": "shoes for running"}}, ["shoe"]),
        ({"multi_match": {"query": "running cap", "type": "phrase", "fields": ["title"]}}, ["cap"]),
        ({"match_phrase_prefix": {"title": "running sh"}}, ["shoe"]),
        ({"match_phrase_prefix": {"title": "woo"}}, ["sock"]),
        ({"prefix": {"title": "runn"}}, ["cap", "shoe"]),
        ({"prefix": {"title": {"value": "leath"}}}, ["boot"]),
        ({"match": {"title": {"query": "runing", "fuzziness": "AUTO"}}}, ["cap", "shoe"]),
        ({"match": {"title": {"query": "sox", "fuzziness": 1}}}, []),
        ({"match": {"title": {"query": "sockz", "fuzziness": 1}}}, ["sock"]),
        ({"bool": {"must": {"match_phrase": {"title": "running"}}, "filter": {"term": {"brand": "Peak"}}}}, ["cap"]),
    ],
)  # fmt: skip
def test_lexical_requirements_keep_opensearch_meaning(client, query, expected):
    answer = search(client, {"query": query, "size": 10})
    found = sorted(ids(answer))
    if expected is None:
        assert {"shoe", "cap"} <= set(found)
        return
    assert found == expected and answer["hits"]["total"]["value"] == len(expected)
    counted = client.post("/products/_count", json={"query": query}).json()["count"]
    assert counted == len(expected)


# ------------------------------------------------------------------------------------------ refused


@pytest.mark.parametrize(
    ("body", "params", "named"),
    [
        ({"query": {"match": {"title": {"query": "x", "frobnicate": 1}}}}, {}, "query.match.title.frobnicate"),
        ({"query": {"match": {"title": {"query": "x", "_name": "n"}}}}, {}, "query.match.title._name"),
        ({"query": {"match": {"color": "red"}}}, {}, "query.match.color"),
        ({"query": {"match": {"title": {"query": "x", "fuzziness": 1, "operator": "and"}}}}, {},
         "query.match.title.operator"),
        ({"query": {"match": {"description": {"query": "runing", "fuzziness": 1}}}}, {},
         "query.match.description.fuzziness"),
        ({"query": {"match_phrase": {"title": {"query": "running shoes", "slop": 2}}}}, {},
         "query.match_phrase.title.slop"),
        ({"query": {"prefix": {"description": "sh"}}}, {}, "query.prefix.description"),
        ({"query": {"multi_match": {"query": "x", "type": "bool_prefix"}}}, {}, "query.multi_match.type"),
        ({"query": {"bool": {"should": [{"match": {"title": {"query": "a b", "operator": "and"}}},
                                        {"match": {"title": "c"}}]}}}, {},
         "query.bool.should[0].match.title.operator"),
        ({"query": {"multi_match": {"query": "x", "fields": ["title", "attributes.color"]}}}, {},
         "query.multi_match.fields[1]"),
        ({"query": {"query_string": {"query": "running AND shoes"}}}, {}, "query.query_string.query"),
        ({"query": {"bool": {"must": {"match": {"title": "x"}}, "must_not": {"term": {"color": "red"}}}}}, {},
         "query.bool.must_not[0].term.color"),
        ({"query": {"bool": {"must_not": {"bool": {"must_not": {"term": {"brand": "A"}}}}}}}, {},
         "query.bool.must_not[0]"),
        ({"query": {"bool": {"must": [{"match": {"title": "x"}}, {"match": {"description": "y"}}]}}}, {},
         "query.bool.must"),
        ({"query": {"bool": {"filter": {"term": {"brand": "Acme"}}, "should": [{"match": {"title": "x"}}]}}}, {},
         "query.bool.should"),
        ({"query": {"bool": {"should": [{"match": {"title": "x"}}], "minimum_should_match": 2}}}, {},
         "query.bool.minimum_should_match"),
        ({"query": {"term": {"brand": {"value": "acme", "case_insensitive": True}}}}, {},
         "query.term.brand.case_insensitive"),
        ({"query": {"match_all": {}}, "min_score": 0.5}, {}, "min_score"),
        ({"query": {"match_all": {}}}, {"scroll": "1m"}, "scroll"),
        ({"query": {"match_all": {}}}, {"typed_keys": "true"}, "typed_keys"),
        ({"query": {"match_all": {}}, "sort": [{"title": "asc"}]}, {}, "sort"),
        ({"query": {"match_all": {}}, "post_filter": {"wildcard": {"title": "r*"}}}, {}, "post_filter.wildcard"),
    ],
)  # fmt: skip
def test_clauses_not_answered_are_refused_by_name(client, body, params, named):
    r = client.post("/products/_search", json=body, params=params)
    assert r.status_code == 400, r.text
    reason = r.json()["error"]["reason"]
    assert f"[{named}" in reason, reason


def test_count_refuses_what_it_cannot_count(client):
    r = client.post("/products/_count", json={"query": {"wildcard": {"title": "run*"}}})
    assert r.status_code == 400 and "[query.wildcard]" in r.json()["error"]["reason"]
    r = client.post("/products/_count", json={"query": {"match_all": {}}, "min_score": 1})
    assert r.status_code == 400 and "[min_score]" in r.json()["error"]["reason"]


def test_search_after_must_be_a_returned_sort_value(client):
    r = client.post("/products/_search", json={"query": {"match_all": {}}, "sort": ["price"], "search_after": [3]})
    assert r.status_code == 400 and "[search_after]" in r.json()["error"]["reason"]


def test_msearch_answers_lexical_requirements_and_names_refusals(client):
    lines = [
        {},
        {"query": {"match_phrase": {"title": "running shoes"}}},
        {},
        {"query": {"match": {"title": {"query": "x", "slop": 1}}}},
    ]
    ndjson = "\n".join(json.dumps(line) for line in lines) + "\n"
    r = client.post("/products/_msearch", content=ndjson.encode(), headers={"content-type": "application/x-ndjson"})
    first, second = r.json()["responses"]
    assert first["status"] == 200 and [h["_id"] for h in first["hits"]["hits"]] == ["shoe"]
    assert second["status"] == 400 and "[query.match.title.slop]" in second["error"]["reason"]


# ------------------------------------------------------------------------------------------ must_not


def _must_not(*clauses: dict, text: str | None = "running") -> dict:
    query: dict = {"bool": {"must_not": list(clauses)}}
    if text is not None:
        query["bool"]["must"] = [{"match": {"title": text}}]
    return {"query": query, "size": 10}


@pytest.mark.parametrize(
    ("clauses", "text", "excluded"),
    [
        ([{"term": {"brand": "Acme"}}], "running", {"shoe", "sock"}),
        ([{"range": {"price": {"gte": 50}}}], "running", {"shoe", "boot"}),
        ([{"match": {"description": "sun"}}], "running", {"cap"}),  # text under must_not: its matches go
        ([{"match_phrase": {"description": "for running"}}], "running", {"shoe"}),
        ([{"prefix": {"title": "ca"}}, {"ids": {"values": ["shoe"]}}], "running", {"shoe", "cap"}),
        ([{"bool": {"filter": [{"term": {"brand": "Peak"}}, {"range": {"price": {"lt": 20}}}]}}], None, {"tee"}),
        ([{"terms": {"category": ["shoes", "socks"]}}], None, {"shoe", "boot", "sock"}),
        ([{"term": {"in_stock": True}}], None, {"shoe", "boot", "cap", "tee"}),  # only the out-of-stock sock
        ([{"match_none": {}}], None, set()),
    ],
)
def test_must_not_excludes_what_it_matches(client, clauses, text, excluded):
    """Never returned, by either retrieval (lexical or vector), and never counted. A browse is an exact
    set; a query keeps every lexical match not excluded (its vector hits depend on the filtered kNN)."""
    got = search(client, _must_not(*clauses, text=text))
    found = set(ids(got))
    assert not found & excluded and got["hits"]["total"]["value"] == len(found)
    if text is None:
        base = search(client, {"query": {"match_all": {}}, "size": 10})
        assert found == set(ids(base)) - excluded  # (a browse leaves out-of-stock products out by default)
    else:
        assert {p.id for p in CATALOG if text in p.title} - excluded <= found
    counted = client.post("/products/_count", json={"query": _must_not(*clauses, text=text)["query"]}).json()
    assert counted["count"] == len(found)


def test_must_not_everything_matches_nothing_and_aggs_count_without_the_excluded(client):
    assert ids(search(client, _must_not({"match_all": {}}))) == []
    body = {**_must_not({"term": {"brand": "Acme"}}, text=None), "aggs": {"b": {"terms": {"field": "brand"}}}}
    got = search(client, body)
    brands = {b["key"]: b["doc_count"] for b in got["aggregations"]["b"]["buckets"]}
    assert brands == {"Peak": 2, "running": 1}
    post = {
        "query": {"match": {"title": "running"}},
        "post_filter": {"bool": {"must_not": {"term": {"brand": "Acme"}}}},
    }
    answer = search(client, {**post, "aggs": {"b": {"terms": {"field": "brand"}}}})
    assert "shoe" not in ids(answer)  # post_filter narrows the hits, not the aggregations
    assert {b["key"] for b in answer["aggregations"]["b"]["buckets"]} >= {"Acme"}


def test_rest_filters_exclude(client):
    body = {"query": "running", "filters": {"exclude": [{"brand": "Acme"}, {"price_min": 100}]}, "size": 10}
    r = client.post("/v1/search", json=body)
    assert r.status_code == 200, r.text
    got = {h["id"] for h in r.json()["hits"]}
    assert got and not got & {"shoe", "sock", "boot"}
    bad = client.post("/v1/search", json={"query": "x", "filters": {"exclude": [{}]}})
    assert bad.status_code == 422 and bad.json()["param"] == "filters.exclude", bad.text
    browse = client.post("/v1/search", json={"filters": {"exclude": {"brand": "Acme"}}, "size": 10}).json()
    assert {h["id"] for h in browse["hits"]} == {"boot", "cap", "tee"} and browse["total"] == 3
