"""The query path end to end on the embedded store with tiny local models (rankings meaningless)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from middleware.backends.embedded import EmbeddedBackend
from middleware.cli.search import load_demo_catalog
from middleware.config import BusinessSettings, Settings
from middleware.models import Embedder, Reranker
from middleware.pipeline import Pipeline
from middleware.products import Filters
from middleware.schema import SearchRequest

QUERY = "适合送女友的轻奢小众手表"


@pytest.fixture(scope="module")
def models(tiny_embedder_dir, tiny_reranker_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("model-cache")
    embedder = Embedder(str(tiny_embedder_dir), cache_dir=cache)
    reranker = Reranker(str(tiny_reranker_dir), cache_dir=cache, precision="fp32")
    return embedder, reranker


@pytest.fixture(scope="module")
def store(models, tmp_path_factory):
    embedder, _ = models
    products = load_demo_catalog(None)
    backend = EmbeddedBackend(tmp_path_factory.mktemp("store"), dim=embedder.dim)
    backend.upsert(products, embedder.encode_documents([p.embedding_text() for p in products]))
    yield backend
    backend.close()


def make_pipeline(store, embedder, reranker, **settings) -> Pipeline:
    return Pipeline(Settings(**settings), store, embedder, reranker)


def test_every_stage_reports_timings_and_explain_components(store, models):
    pipeline = make_pipeline(store, *models, rerank_k=10)
    response = pipeline.search(SearchRequest(query=QUERY, size=5, explain=True))
    assert {"embed", "retrieve", "fuse", "rerank", "business"} <= set(response.timings_ms)
    assert response.degraded == [] and response.reranked == 10 and len(response.hits) == 5
    top = response.hits[0].explain
    assert top is not None
    assert top.fused is not None and top.rerank is not None and top.final is not None
    assert 0.0 <= top.rerank <= 1.0  # sigmoid of the logit
    assert any(h.explain.bm25 is not None for h in response.hits)
    assert any(h.explain.knn is not None for h in response.hits)
    scores = [h.score for h in response.hits]
    assert scores == sorted(scores, reverse=True)


def test_paging_is_a_window_over_one_ranking(store, models):
    pipeline = make_pipeline(store, *models, rerank_k=20)
    full = pipeline.search(SearchRequest(query=QUERY, size=12))
    page2 = pipeline.search(SearchRequest(query=QUERY, size=4, **{"from": 4}))
    assert [h.id for h in page2.hits] == [h.id for h in full.hits[4:8]]
    assert page2.total == full.total


def test_filters_apply_to_both_retrievals(store, models):
    pipeline = make_pipeline(store, *models)
    filters = Filters(category=["手表"], price_max=3000, in_stock=True)
    for retrieval in ("bm25", "vector", "hybrid"):
        response = pipeline.search(SearchRequest(query=QUERY, size=50, filters=filters, retrieval=retrieval))
        assert response.hits, retrieval
        for hit in response.hits:
            p = hit.product
            assert "手表" in p["category"] and p["price"] <= 3000 and (p["stock"] is None or p["stock"] > 0)


def test_out_of_stock_filter_mode_and_default_demotion(store, models):
    pipeline = make_pipeline(store, *models)
    req = SearchRequest(query="施华洛世奇", size=50, business=BusinessSettings(out_of_stock="filter"))
    assert all(h.product["stock"] != 0 for h in pipeline.search(req).hits)
    demoted = pipeline.search(SearchRequest(query="施华洛世奇", size=50, explain=True))
    assert any(h.product["stock"] == 0 for h in demoted.hits)


class FailingReranker:
    def score(self, query: str, docs: list[str]) -> np.ndarray:
        raise RuntimeError("reranker crashed")


class SlowReranker:
    def __init__(self, inner: Reranker, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def score(self, query: str, docs: list[str]) -> np.ndarray:
        time.sleep(self.delay_s)
        return self.inner.score(query, docs)


def test_failing_or_slow_reranker_keeps_fused_order(store, models):
    embedder, reranker = models
    baseline = make_pipeline(store, embedder, reranker).search(SearchRequest(query=QUERY, size=10, rerank=False))
    for broken in (FailingReranker(), SlowReranker(reranker, delay_s=1.0)):
        pipeline = make_pipeline(store, embedder, broken)
        started = time.perf_counter()
        response = pipeline.search(SearchRequest(query=QUERY, size=10, deadline_ms=300))
        assert time.perf_counter() - started < 0.9  # answered within its budget, not after the slow call
        assert response.degraded == ["rerank"]
        assert [h.id for h in response.hits] == [h.id for h in baseline.hits]


class KnnDown:
    """The real store with its vector search failing (fault injection)."""

    def __init__(self, inner: EmbeddedBackend) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def knn(self, vector, filters, n):
        raise ConnectionError("vector index unavailable")


def test_failing_knn_answers_from_bm25(store, models):
    embedder, reranker = models
    pipeline = make_pipeline(store, embedder, reranker)
    response = pipeline.search(SearchRequest(query="卡西欧", size=5, explain=True))
    broken = Pipeline(Settings(), KnnDown(store), embedder, reranker).search(
        SearchRequest(query="卡西欧", size=5, explain=True)
    )
    assert broken.degraded == ["knn"]
    assert broken.hits and all(h.explain.knn is None for h in broken.hits)
    assert response.degraded == []


def test_bm25_only_without_embedder_and_vector_needs_one(store, models):
    _, reranker = models
    pipeline = make_pipeline(store, None, reranker)
    response = pipeline.search(SearchRequest(query="卡西欧 手表", size=3))
    assert response.hits and response.degraded == [] and "embed" not in response.timings_ms
    with pytest.raises(ValueError, match="embedder"):
        pipeline.search(SearchRequest(query="x", retrieval="vector"))


def test_minmax_fusion_and_weight_overrides(store, models):
    pipeline = make_pipeline(store, *models)
    only_bm25 = pipeline.search(
        SearchRequest(query=QUERY, size=5, fusion="minmax", knn_weight=0.0, rerank=False, business_enabled=False)
    )
    bm25 = pipeline.search(SearchRequest(query=QUERY, size=5, retrieval="bm25", rerank=False, business_enabled=False))
    assert [h.id for h in only_bm25.hits] == [h.id for h in bm25.hits]


async def _asearch(pipeline: Pipeline):
    return await pipeline.asearch(SearchRequest(query=QUERY, size=3))


def test_async_search_matches_sync(store, models):
    import asyncio

    pipeline = make_pipeline(store, *models)
    sync = pipeline.search(SearchRequest(query=QUERY, size=3))
    assert [h.id for h in asyncio.run(_asearch(pipeline)).hits] == [h.id for h in sync.hits]


def test_opensearch_backend_opts_into_server_side_fusion_by_config():
    from middleware.backends.base import HybridBackend
    from middleware.backends.opensearch import OpenSearchBackend

    client_side = OpenSearchBackend.from_settings(Settings(backend="opensearch"), dim=8)
    hybrid = OpenSearchBackend.from_settings(Settings(backend="opensearch", opensearch={"retrieval": "hybrid"}), dim=8)
    assert isinstance(hybrid, HybridBackend)
    assert hybrid.fuses_server_side and not client_side.fuses_server_side


@pytest.mark.parametrize(
    ("override", "cap"),
    [
        ({"retrieve_n": 1001}, "max_retrieve_n"),
        ({"rerank_k": 201}, "max_rerank_k"),
        ({"deadline_ms": 10_001}, "max_deadline_ms"),
    ],
)
def test_library_requests_above_a_cap_raise_naming_it(store, models, override, cap):
    pipeline = make_pipeline(store, *models)
    (param,) = override
    with pytest.raises(ValueError, match=rf"{param} must be at most .*\({cap}\)"):
        pipeline.search(SearchRequest(query=QUERY, **override))
    roomier = make_pipeline(store, *models, **{cap: 20_000})
    assert roomier.search(SearchRequest(query=QUERY, size=2, **override)).hits
