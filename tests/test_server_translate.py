"""OpenSearch body → SearchRequest translation, index names, _source filtering, scripts (pure functions)."""

from __future__ import annotations

import math

import pytest

from middleware.config import ServerSettings
from middleware.products import Product
from middleware.schema import Hit, SearchResponse
from middleware.server.errors import ApiError
from middleware.server.translate import (
    SourceFilter,
    Unsupported,
    json_depth_ok,
    parse_index_expression,
    parse_source,
    parse_time_ms,
    search_response,
    translate_search,
)

SERVER = ServerSettings()


def tr(body, params=None, server=SERVER):
    return translate_search(body, params or {}, server)


@pytest.mark.parametrize(
    ("query", "text"),
    [
        ({"match": {"title": "手表"}}, "手表"),
        ({"match": {"title": {"query": "手表", "operator": "or", "boost": 2}}}, "手表"),
        ({"multi_match": {"query": "gift watch", "fields": ["title^2", "description"]}}, "gift watch"),
        ({"query_string": {"query": "wireless earbuds"}}, "wireless earbuds"),
        ({"simple_query_string": {"query": "保温杯"}}, "保温杯"),
        ({"bool": {"must": [{"match": {"title": "手表"}}]}}, "手表"),
        ({"bool": {"should": [{"match": {"title": "手表"}}, {"match": {"description": "DW"}}]}}, "手表 DW"),
    ],
)
def test_user_text_is_taken_from_every_text_query(query, text):
    assert tr({"query": query}).request.query == text


def test_filters_come_from_bool_filter():
    body = {
        "query": {
            "bool": {
                "must": [{"match": {"title": "手表"}}],
                "filter": [
                    {"term": {"brand.keyword": "Casio"}},
                    {"terms": {"category": ["手表", "电子"]}},
                    {"range": {"price": {"gte": 100, "lte": 500}}},
                    {"term": {"in_stock": True}},
                    {"ids": {"values": ["a", "b"]}},
                ],
            }
        }
    }
    f = tr(body).request.filters
    assert f is not None
    assert f.brand == ["Casio"] and sorted(f.category or []) == ["手表", "电子"]
    assert f.price_min == 100 and f.price_max == 500 and f.in_stock is True and f.ids == ["a", "b"]


def test_must_not_becomes_exclude_clauses_and_negative_requirements():
    body = {
        "query": {
            "bool": {
                "must": [{"match": {"title": "手表"}}],
                "filter": {"term": {"category": "手表"}},
                "must_not": [
                    {"term": {"brand.keyword": "Casio"}},
                    {"range": {"price": {"gt": 500}}},
                    {"bool": {"filter": [{"terms": {"brand": ["DW", "Omega"]}}, {"term": {"in_stock": True}}]}},
                    {"match": {"description": "二手"}},
                    {"match_phrase": {"title": "儿童 手表"}},
                    {"match": {"category": "配件"}},
                    {"match_none": {}},  # matches nothing: excludes nothing
                ],
            }
        }
    }
    t = tr(body)
    f = t.request.filters
    assert f is not None and f.category == ["手表"] and t.request.query == "手表"
    assert [c.model_dump(exclude_none=True) for c in f.exclude or []] == [
        {"brand": ["Casio"]},
        {"price_min": math.nextafter(500, math.inf)},
        {"brand": ["DW", "Omega"], "in_stock": True},
        {"category": ["配件"]},
    ]
    assert [(r.kind, r.text, r.fields, r.minimum) for r in t.negatives] == [
        ("at_least", "二手", ("description",), 1),
        ("phrase", "儿童 手表", ("title",), 1),
    ]
    assert t.requirements == []
    many = tr({"query": {"bool": {"must_not": [{"term": {"brand": f"b{i:03d}"}} for i in range(100)]}}})
    assert [c.brand for c in many.request.filters.exclude] == [[f"b{i:03d}" for i in range(100)]]
    # inside a filter too, and on its own (a browse of everything else)
    inside = tr({"query": {"bool": {"filter": {"bool": {"must_not": {"ids": {"values": ["a"]}}}}}}})
    assert inside.request.query is None and inside.request.filters.exclude[0].ids == ["a"]
    everything = tr({"query": {"bool": {"must": {"match": {"title": "x"}}, "must_not": {"match_all": {}}}}})
    assert everything.matches_nothing


def test_must_not_clauses_that_cannot_be_one_exclusion_are_refused_by_name():
    mixed = {
        "bool": {"must_not": [{"bool": {"must": [{"match": {"title": "a"}}], "filter": {"term": {"brand": "B"}}}}]}
    }
    with pytest.raises(Unsupported, match=r"\[query\.bool\.must_not\[0\]"):
        tr({"query": {"bool": {"must": {"match": {"title": "x"}}, "must_not": mixed["bool"]["must_not"]}}})
    with pytest.raises(Unsupported, match=r"must_not inside a must_not"):
        tr({"query": {"bool": {"must_not": {"bool": {"must_not": {"term": {"brand": "A"}}}}}}})


def test_strict_price_bounds_exclude_the_bound_itself():
    price = {"range": {"price": {"gt": 10, "lt": 20}}}
    f = tr({"query": {"bool": {"must": {"match": {"title": "x"}}, "filter": price}}})
    filters = f.request.filters
    assert filters is not None
    assert filters.price_min == math.nextafter(10, math.inf) and filters.price_max == math.nextafter(20, -math.inf)
    at_bound = Product(id="1", title="t", price=10)
    inside = Product(id="2", title="t", price=15)
    assert not filters.matches(at_bound) and filters.matches(inside)


def test_stock_range_gt_zero_means_in_stock_and_term_value_object():
    body = {"query": {"bool": {"must": [{"match": {"title": "x"}}, {"range": {"stock": {"gt": 0}}}],
                               "filter": {"term": {"brand": {"value": "DW"}}}}}}  # fmt: skip
    f = tr(body).request.filters
    assert f is not None and f.in_stock is True and f.brand == ["DW"]


def test_contradictory_term_filters_match_nothing():
    body = {
        "query": {
            "bool": {"must": {"match": {"title": "x"}}, "filter": [{"term": {"brand": "A"}}, {"term": {"brand": "B"}}]}
        }
    }
    assert tr(body).matches_nothing


@pytest.mark.parametrize(
    "body",
    [
        {"query": {"match": {"title": "x"}}, "aggs": {"n": {"cardinality": {"field": "brand"}}}},
        {"query": {"match": {"title": "x"}}, "aggs": {"b": {"terms": {"field": "color"}}}},
        {"query": {"match": {"title": "x"}}, "highlight": {"fields": {"brand": {}}}},
        {"query": {"match": {"title": "x"}}, "suggest": {"s": {"text": "x", "phrase": {"field": "title"}}}},
        {"query": {"match": {"title": "x"}}, "sort": [{"title.keyword": "asc"}]},
        {"query": {"bool": {"must_not": {"bool": {"must_not": {"term": {"brand": "A"}}}}}}},
        {"query": {"bool": {"must_not": {"term": {"color": "red"}}}}},
        {"query": {"bool": {"must": {"match": {"title": "x"}}, "filter": {"term": {"color": "red"}}}}},
        {"query": {"fuzzy": {"title": "x"}}},
    ],
)
def test_queries_the_pipeline_does_not_answer_are_unsupported(body):
    with pytest.raises(Unsupported):
        tr(body)


def test_uri_search_q_and_score_sort_are_answered():
    t = tr(None, {"q": "手表", "size": "5", "from": "2", "sort": "_score"})
    assert t.request.query == "手表" and t.request.size == 5 and t.request.from_ == 2
    assert tr({"query": {"match": {"title": "x"}}, "sort": ["_score"]}).request.query == "x"


@pytest.mark.parametrize(("param", "body"), [("size", {"size": 101}), ("from", {"from": 1001})])
def test_paging_over_the_maximum_names_the_parameter(param, body):
    with pytest.raises(ApiError) as info:
        tr({"query": {"match": {"title": "x"}}, **body})
    assert info.value.status == 400 and info.value.param == param


@pytest.mark.parametrize("bad", [-1, "ten", 1.5, True])
def test_bad_size_is_400_naming_size(bad):
    with pytest.raises(ApiError) as info:
        tr({"query": {"match": {"title": "x"}}, "size": bad})
    assert info.value.param == "size"


def test_paging_is_checked_even_when_the_body_would_be_passed_through():
    with pytest.raises(ApiError) as info:
        tr({"query": {"match_all": {}}, "size": 10_000})
    assert info.value.param == "size"


def test_long_query_is_truncated_not_rejected():
    t = tr({"query": {"match": {"title": "手" * 20_000}}})
    assert len(t.request.query) == 10_000


@pytest.mark.parametrize(
    "body",
    [
        {"query": {"script_score": {"query": {"match": {"title": "x"}}, "script": {"source": "1"}}}},
        {"query": {"match": {"title": "x"}}, "script_fields": {"f": {"script": "doc['a']"}}},
        {"query": {"bool": {"filter": [{"script": {"script": {"id": "stored-one"}}}]}}},
        {"query": {"match": {"title": "x"}}, "sort": {"_script": {"type": "number", "script": "1"}}},
    ],
)
def test_scripts_are_refused_with_the_reason(body):
    with pytest.raises(ApiError) as info:
        tr(body)
    assert info.value.status == 400 and "run code on the cluster" in info.value.message


def test_scripts_pass_to_the_upstream_only_when_enabled():
    body = {"query": {"script_score": {"query": {"match_all": {}}, "script": {"source": "1"}}}}
    with pytest.raises(Unsupported):  # no longer refused: it goes upstream
        tr(body, server=ServerSettings(allow_scripts=True))


def test_deadline_comes_from_timeout():
    assert tr({"query": {"match": {"title": "x"}}, "timeout": "250ms"}).request.deadline_ms == 250
    assert parse_time_ms("2s", "timeout") == 2000
    with pytest.raises(ApiError):
        parse_time_ms("soon", "timeout")


@pytest.mark.parametrize(
    ("expr", "status"),
    [("secret", 403), ("_all", 403), ("..", 400), ("products/../x", 400), ("Products", 400), ("-products", 403),
     ("products,secret", 403), ("prod*", 403)],
)  # fmt: skip
def test_index_names_outside_the_allowed_set_are_refused(expr, status):
    with pytest.raises(ApiError) as info:
        parse_index_expression(expr, SERVER)
    assert info.value.status == status


def test_allowed_index_names():
    assert parse_index_expression("products", SERVER) == ["products"]
    assert parse_index_expression("products-v2,products", SERVER) == ["products-v2", "products"]
    assert parse_index_expression("products*", SERVER) == ["products*"]


def test_source_filtering():
    doc = {"id": "1", "title": "t", "price": 3.0, "attributes": {"color": "red", "size": "L"}}
    assert parse_source(False, {}).apply(doc) is None
    assert parse_source(True, {}).apply(doc) == doc
    assert parse_source(["title", "price"], {}).apply(doc) == {"title": "t", "price": 3.0}
    assert parse_source("title", {}).apply(doc) == {"title": "t"}
    assert parse_source({"excludes": ["attributes"]}, {}).apply(doc) == {"id": "1", "title": "t", "price": 3.0}
    assert parse_source({"includes": ["attributes.color"]}, {}).apply(doc) == {"attributes": {"color": "red"}}
    assert parse_source({"includes": ["*"], "excludes": ["attributes.size"]}, {}).apply(doc) == {
        "id": "1", "title": "t", "price": 3.0, "attributes": {"color": "red"}}  # fmt: skip
    assert parse_source(None, {"_source_includes": "id,title"}).apply(doc) == {"id": "1", "title": "t"}
    assert parse_source(None, {"_source": "false"}).apply(doc) is None
    with pytest.raises(ApiError):
        parse_source(42, {})


def test_response_shape():
    t = tr({"query": {"match": {"title": "x"}}, "_source": ["title"], "size": 2})
    resp = SearchResponse(
        hits=[Hit(id="a", score=0.9, product={"id": "a", "title": "A"}), Hit(id="b", score=0.5, product={"id": "b"})],
        total=7,
        took_ms=3.2,
        timings_ms={},
    )
    out = search_response(resp, t, index="products", took_ms=4.6, retrieve_n=100)
    assert out["took"] == 5 and out["timed_out"] is False and out["_shards"]["failed"] == 0
    assert out["hits"]["total"] == {"value": 7, "relation": "eq"} and out["hits"]["max_score"] == 0.9
    assert out["hits"]["hits"][0] == {"_index": "products", "_id": "a", "_score": 0.9, "_source": {"title": "A"}}
    empty = search_response(None, t, index="products", took_ms=1, retrieve_n=100)
    assert empty["hits"] == {"total": {"value": 0, "relation": "eq"}, "max_score": None, "hits": []}


def test_json_depth_check():
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["a"] = {}
        node = node["a"]
    assert not json_depth_ok(deep) and json_depth_ok({"a": [1, {"b": 2}]})


def test_source_filter_default_keeps_everything():
    assert SourceFilter().apply({"a": 1}) == {"a": 1}


def test_redacting_log_filter():
    import logging

    from middleware.server.errors import RedactingFilter, redact

    assert redact("GET https://admin:pw@host:9200/x failed") == "GET https://***@host:9200/x failed"
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "failed: %s", ("http://u:p@h/",), None)
    RedactingFilter().filter(record)
    assert record.getMessage() == "failed: http://***@h/"


@pytest.mark.parametrize(
    ("options", "kind", "minimum"),
    [
        ({"operator": "and"}, "all", 1),
        ({"minimum_should_match": 2}, "at_least", 2),
        ({"minimum_should_match": "-1"}, "at_least", 3),
        ({"minimum_should_match": "75%"}, "at_least", 3),
        ({"fuzziness": "AUTO"}, "fuzzy", 1),
    ],
)
def test_lexical_options_become_requirements(options, kind, minimum):
    t = tr({"query": {"match": {"title": {"query": "red wool winter socks", **options}}}})
    (req,) = t.requirements
    assert req.kind == kind and req.fields == ("title",) and req.path.startswith("query.match.title.")
    assert req.minimum == minimum and t.request.query == "red wool winter socks"


def test_unknown_keys_are_refused_naming_their_path():
    for body, params, named in [
        ({"query": {"match": {"title": {"query": "x", "cutoff_frequency": 1}}}}, {},
         "query.match.title.cutoff_frequency"),
        ({"query": {"bool": {"filter": {"exists": {"field": "brand"}}}}}, {}, "query.bool.filter[0].exists"),
        ({"query": {"match": {"title": "x"}}}, {"scroll": "1m"}, "scroll"),
        ({"query": {"match": {"title": "x"}}}, {"filter_path": "hits"}, "filter_path"),
    ]:  # fmt: skip
        with pytest.raises(Unsupported) as info:
            tr(body, params)
        assert str(info.value).startswith(f"[{named}]"), info.value
