"""Honest totals, stable pages, cursors, browsing and sorting through the pipeline, on both backends.

"opensearch" runs when OPENSEARCH_URL is set (`tests/opensearch/with-node python -m pytest ...`). The
catalog and its reference answers are test_backend_primitives'; the vectors come from a tiny random-init
embedder, so the kNN floor is checked by its rule (each vector-only hit at or above it), not by relevance.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from middleware import paging
from middleware.backends.base import Backend
from middleware.config import Settings
from middleware.models import Embedder, Reranker
from middleware.paging import InvalidRequest
from middleware.pipeline import Pipeline
from middleware.products import Filters
from middleware.schema import SearchRequest, SearchResponse
from tests.support.stores import OPENSEARCH_URL, throwaway_opensearch
from tests.test_backend_primitives import (
    ACME,
    BY_ID,
    CATALOG,
    expected_order,
    expected_set,
)

GIBBERISH = "xyzzyqwerty"
RETRIEVE_N = 40  # small, so pages run far past the reranked and fused head
LONG_QUERY = "sneakers waterproof"  # 400+ lexical matches


@pytest.fixture(scope="module")
def models(tiny_embedder_dir, tiny_reranker_dir, model_cache_dir) -> tuple[Embedder, Reranker]:
    embedder = Embedder(str(tiny_embedder_dir), cache_dir=model_cache_dir)
    return embedder, Reranker(str(tiny_reranker_dir), cache_dir=model_cache_dir, precision="fp32")


@pytest.fixture(scope="module")
def doc_vectors(models) -> np.ndarray:
    return models[0].encode_documents([p.embedding_text() for p in CATALOG])


def _embedded(tmp_path_factory, dim: int, vectors: np.ndarray) -> Iterator[Backend]:
    from middleware.backends.embedded import EmbeddedBackend

    backend = EmbeddedBackend(tmp_path_factory.mktemp("pages"), dim=dim)
    backend.upsert(CATALOG, vectors)
    yield backend
    backend.close()


def _opensearch(dim: int, vectors: np.ndarray) -> Iterator[Backend]:
    with throwaway_opensearch(dim, shards=2, knn_engine="lucene") as backend:
        backend.upsert(CATALOG, vectors)
        backend.refresh()
        yield backend


@pytest.fixture(scope="module", params=["embedded", "opensearch"])
def backend(request, tmp_path_factory, models, doc_vectors) -> Iterator[Backend]:
    dim = models[0].dim
    if request.param == "embedded":
        yield from _embedded(tmp_path_factory, dim, doc_vectors)
    else:
        yield from _opensearch(dim, doc_vectors)


def make_pipeline(backend: Backend, models, **settings: object) -> Pipeline:
    embedder, reranker = models
    cfg = Settings(
        _env_file=None,
        embedder="tiny-test-embedder",
        retrieve_n=RETRIEVE_N,
        rerank_k=10,
        max_deadline_ms=60_000,
        **settings,
    )
    return Pipeline(cfg, backend, embedder, reranker, owns_backend=False)


@pytest.fixture
def pipeline(backend, models) -> Iterator[Pipeline]:
    p = make_pipeline(backend, models)
    yield p
    p.close()


def search(pipeline: Pipeline, **fields: object) -> SearchResponse:
    return pipeline.search(SearchRequest.model_validate({"deadline_ms": 60_000, **fields}))


def lexical(query: str, filters: Filters | None = None) -> set[str]:
    return {p.id for p in expected_set(query, filters)}


# ------------------------------------------------------------------ matches and totals


def test_gibberish_matches_nothing_once_the_floor_is_above_its_best_similarity(backend, models, doc_vectors):
    query_vector = models[0].encode_queries([GIBBERISH])[0]
    best = float((doc_vectors @ query_vector).max())
    p = make_pipeline(backend, models, knn_floor={"absolute": best + 0.01})
    try:
        for retrieval in ("hybrid", "vector", "bm25"):
            resp = search(p, query=GIBBERISH, retrieval=retrieval)
            assert (resp.hits, resp.total, resp.relation, resp.next_cursor) == ([], 0, "eq", None), retrieval
    finally:
        p.close()


def test_bm25_total_is_the_brute_force_count(pipeline):
    resp = search(pipeline, query="shoes", retrieval="bm25")
    assert resp.total == len(lexical("shoes")) == 400 and resp.relation == "eq"
    assert len(resp.hits) == 10


@pytest.mark.parametrize("filters", [None, ACME, Filters(category=["outdoor"], price_max=80.0)])
def test_hybrid_hits_are_lexical_matches_or_vectors_above_the_floor(pipeline, filters):
    body = {"query": "sleek snug", "size": 1000, "explain": True}
    if filters is not None:
        body["filters"] = filters.model_dump(exclude_none=True)
    resp = search(pipeline, **body)
    ids = [h.id for h in resp.hits]
    assert len(ids) == len(set(ids)) == resp.total and resp.relation == "eq"
    want_lexical = lexical("sleek snug", filters)
    assert want_lexical <= set(ids)
    vector_only = [h for h in resp.hits if h.id not in want_lexical]
    for hit in resp.hits:  # never padded: every hit satisfies the filters
        assert filters is None or filters.matches(BY_ID[hit.id])
    for hit in vector_only:
        assert hit.explain is not None and hit.explain.knn is not None and hit.explain.knn_floor is not None
        assert hit.explain.knn >= hit.explain.knn_floor
    knn_scores = [h.explain.knn for h in resp.hits if h.explain.knn is not None]
    if knn_scores:  # the floor is relative to the best vector hit of the query (absolute 0 for this embedder)
        scale = paging.knn_score_scale(pipeline.backend)  # OpenSearch scores a dot product d as 1 + d
        best = paging.to_similarity(max(knn_scores), scale)
        want = paging.from_similarity(paging.UNCALIBRATED_FLOOR[0] * best, scale)
        assert resp.hits[0].explain.knn_floor == pytest.approx(want, abs=1e-6)


def test_track_total_hits_caps_or_counts_exactly(pipeline):
    exact = len(lexical(LONG_QUERY))
    capped = search(pipeline, query=LONG_QUERY, retrieval="bm25", track_total_hits=100)
    assert (capped.total, capped.relation) == (100, "gte")
    full = search(pipeline, query=LONG_QUERY, retrieval="bm25", track_total_hits=True)
    assert (full.total, full.relation) == (exact, "eq")
    deep = search(pipeline, query=LONG_QUERY, retrieval="bm25", track_total_hits=True, **{"from": 1000})
    assert (deep.total, deep.hits) == (exact, [])  # the depth asked for does not inflate the total


# ------------------------------------------------------------------ stable pages


def test_twenty_pages_never_repeat_or_skip_and_keep_their_total(pipeline):
    size = 15
    assert len(lexical(LONG_QUERY)) > 20 * size
    pages = [search(pipeline, query=LONG_QUERY, size=size, **{"from": i * size}) for i in range(20)]
    ids = [h.id for page in pages for h in page.hits]
    assert len(ids) == 20 * size and len(set(ids)) == len(ids)
    assert len({page.total for page in pages}) == 1
    one = search(pipeline, query=LONG_QUERY, size=20 * size)
    assert [h.id for h in one.hits] == ids
    # the walk goes past the head into the lexical tail, which is every other lexical match by BM25
    assert set(ids[RETRIEVE_N * 2 :]) <= lexical(LONG_QUERY)


def test_search_after_walks_the_same_order_to_the_end(pipeline):
    everything = search(pipeline, query=LONG_QUERY, size=1000)
    assert everything.total == len(everything.hits) and everything.next_cursor is None
    walked, cursor, totals = [], None, set()
    while True:
        body = {"query": LONG_QUERY, "size": 37}
        if cursor is not None:
            body["search_after"] = cursor
        resp = search(pipeline, **body)
        walked += [h.id for h in resp.hits]
        totals.add(resp.total)
        cursor = resp.next_cursor
        if cursor is None:
            break
    assert walked == [h.id for h in everything.hits]
    assert totals == {everything.total}


def test_a_cursor_from_another_query_or_a_changed_store_is_stale(pipeline, backend):
    first = search(pipeline, query=LONG_QUERY, size=5)
    assert first.next_cursor is not None
    with pytest.raises(InvalidRequest, match="stale cursor") as err:
        search(pipeline, query="boots", search_after=first.next_cursor)
    assert err.value.param == "search_after"
    with pytest.raises(InvalidRequest, match="stale cursor"):
        search(pipeline, query=LONG_QUERY, search_after="not-a-cursor")
    extra = CATALOG[0].model_copy(update={"id": "extra-1"})
    backend.upsert([extra], None if backend.stats().vectors == 0 else np.zeros((1, backend.stats().dim), "float32"))
    _refresh(backend)
    try:
        with pytest.raises(InvalidRequest, match="store changed"):
            search(pipeline, query=LONG_QUERY, search_after=first.next_cursor)
    finally:
        backend.delete(["extra-1"])
        _refresh(backend)


def _refresh(backend: Backend) -> None:
    refresh = getattr(backend, "refresh", None)
    if refresh is not None:
        refresh()


# ------------------------------------------------------------------ browse and sort


def business_order(products) -> list[str]:
    """business.py's order for equally relevant products: the smoothed sales bonus less the stock penalty."""
    weights = Settings(_env_file=None).business
    prior = weights.sales_prior
    scale = math.log1p(max(p.sales for p in products) + prior)

    def final(p) -> float:
        bonus = weights.margin * weights.w_sales * math.log1p(p.sales + prior) / scale
        return bonus - (0.0 if p.in_stock else weights.margin * weights.out_of_stock_penalty)

    return [p.id for p in sorted(products, key=lambda p: (-final(p), p.id))]


def test_browse_a_category_by_business_score(pipeline):
    filters = Filters(category=["outdoor"])
    want = business_order(expected_set(None, filters))
    got, cursor = [], None
    for _ in range(30):
        body = {"filters": {"category": ["outdoor"]}, "size": 50}
        if cursor:
            body["search_after"] = cursor
        resp = search(pipeline, **body)
        assert (resp.total, resp.relation) == (len(want), "eq")
        got += [h.id for h in resp.hits]
        cursor = resp.next_cursor
        if cursor is None:
            break
    assert got == want
    assert search(pipeline, query="  ", filters={"brand": ["Acme"]}).total == len(expected_set(None, ACME))


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_sort_by_price_browsing_and_searching(pipeline, order):
    descending = order == "desc"
    resp = search(pipeline, filters={"brand": ["Acme"]}, sort=[{"price": order}], size=100)
    assert [h.id for h in resp.hits] == expected_order(expected_set(None, ACME), "price", descending)[:100]
    resp = search(pipeline, query="sneakers", retrieval="bm25", sort=[{"price": order}], size=50, **{"from": 50})
    assert [h.id for h in resp.hits] == expected_order(expected_set("sneakers"), "price", descending)[50:100]
    assert resp.total == len(lexical("sneakers"))


def test_sort_by_sales_and_stock_and_score(pipeline):
    for field in ("sales", "stock"):
        resp = search(pipeline, filters={"brand": ["Acme"]}, sort=[{field: {"order": "desc"}}], size=30)
        assert [h.id for h in resp.hits] == expected_order(expected_set(None, ACME), field, True)[:30]
    ranked = search(pipeline, query=LONG_QUERY, size=30)
    by_score = search(pipeline, query=LONG_QUERY, size=30, sort=[{"_score": "desc"}])
    assert [h.id for h in by_score.hits] == [h.id for h in ranked.hits]


# ------------------------------------------------------------------ bad input


def test_pipeline_refusals_name_the_field(pipeline):
    with pytest.raises(InvalidRequest, match="filters to browse") as err:
        search(pipeline, query="")
    assert err.value.param == "query"
    with pytest.raises(InvalidRequest, match="'colour'") as err:
        search(pipeline, query="boots", sort=[{"colour": "asc"}])
    assert "colour" in (err.value.param or "")


def test_rest_sort_browse_cursor_and_400s(backend, models):
    from middleware.server.app import create_app

    p = make_pipeline(backend, models, server={"warm_up": False})
    try:
        with TestClient(create_app(p.settings, pipeline=p)) as client:
            ok = client.post("/v1/search", json={"filters": {"brand": ["Acme"]}, "sort": [{"price": "asc"}]})
            assert ok.status_code == 200, ok.text
            body = ok.json()
            assert [h["id"] for h in body["hits"]] == expected_order(expected_set(None, ACME), "price", False)[:10]
            assert body["relation"] == "eq" and body["next_cursor"]
            nxt = client.post(
                "/v1/search",
                json={"filters": {"brand": ["Acme"]}, "sort": [{"price": "asc"}], "search_after": body["next_cursor"]},
            )
            assert [h["id"] for h in nxt.json()["hits"]] == expected_order(expected_set(None, ACME), "price", False)[
                10:20
            ]

            empty = client.post("/v1/search", json={"query": ""})
            assert empty.status_code == 400 and empty.json()["param"] == "query"
            assert "filters" in empty.json()["message"]
            unknown = client.post("/v1/search", json={"query": "boots", "sort": [{"colour": "asc"}]})
            assert unknown.status_code == 400 and "colour" in unknown.json()["message"]
            stale = client.post("/v1/search", json={"query": "boots", "search_after": body["next_cursor"]})
            assert stale.status_code == 400 and "stale cursor" in stale.json()["message"]
            too_deep = client.post("/v1/search", json={"query": "boots", "from": 5000})
            assert too_deep.status_code == 400 and too_deep.json()["param"] == "from"
    finally:
        p.close()


def test_server_side_hybrid_counts_and_pages_the_same_way(backend, models, doc_vectors):
    """OpenSearch's hybrid query (search pipeline): its fused hits are sorted into lexical matches and
    vector hits above the floor; nothing else is kept, and pages walk one order."""
    if not OPENSEARCH_URL or not hasattr(backend, "cfg"):
        pytest.skip("the hybrid query is OpenSearch's")
    from middleware.backends import opensearch_admin as admin
    from middleware.backends.opensearch import OpenSearchBackend

    name = f"{backend.cfg.index_prefix}-hybrid"
    cfg = backend.cfg.model_copy(update={"retrieval": "hybrid", "search_pipeline": name})
    hybrid = OpenSearchBackend(backend.client, cfg, dim=models[0].dim)
    try:
        admin.install(hybrid)
        p = make_pipeline(hybrid, models)
        everything = search(p, query="sleek snug", size=1000, explain=True)
        ids = [h.id for h in everything.hits]
        assert len(ids) == len(set(ids)) == everything.total
        assert lexical("sleek snug") <= set(ids)
        for hit in everything.hits:
            if hit.id not in lexical("sleek snug"):
                assert hit.explain.knn is not None and hit.explain.knn >= hit.explain.knn_floor
        pages = [search(p, query="sleek snug", size=25, **{"from": i * 25}) for i in range(len(ids) // 25 + 1)]
        assert [h.id for page in pages for h in page.hits] == ids
        best = float((doc_vectors @ models[0].encode_queries([GIBBERISH])[0]).max())
        strict = make_pipeline(hybrid, models, knn_floor={"absolute": best + 0.01})
        assert search(strict, query=GIBBERISH).total == 0
        p.close()
        strict.close()
    finally:
        backend.client.search_pipeline.delete(id=name, ignore=[404])
