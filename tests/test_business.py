"""Business scoring: relevance first, sales and stock within the comparable margin.

The unit tests check the formula on hand-built candidates; the pipeline tests run the real query path
over the embedded store (BM25 alone where magnitudes matter, tiny models where only ties matter).
"""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from middleware import business
from middleware.backends.embedded import EmbeddedBackend
from middleware.cli.search import load_demo_catalog
from middleware.config import BusinessSettings, Settings
from middleware.models import Embedder, Reranker
from middleware.pipeline import Pipeline
from middleware.products import Candidate, Product, SignalUpdate
from middleware.schema import SearchRequest


def cand(i: str, rerank: float | None, sales: int = 0, stock: int | None = 5, fused: float = 0.0, **scores):
    product = Product(id=i, title=i, sales=sales, stock=stock)
    return Candidate(id=i, product=product, rerank=rerank, fused=fused, **scores)


def by_id(cands: list[Candidate]) -> dict[str, Candidate]:
    return {c.id: c for c in cands}


# ------------------------------------------------------------------------------------------ formula


def test_formula_and_explained_parts():
    w = BusinessSettings(margin=0.1, w_sales=0.5, sales_prior=0.0, out_of_stock_penalty=3.0)
    out = by_id(business.apply([cand("a", 0.5, sales=99), cand("b", 0.45, sales=9, stock=0)], w))
    a, b = out["a"], out["b"]
    assert a.relevance == pytest.approx(0.5) and a.sales_bonus == pytest.approx(0.1 * 0.5 * 1.0)
    assert a.stock_penalty == 0.0 and a.final == pytest.approx(0.5 + 0.05)
    assert b.sales_bonus == pytest.approx(0.05 * math.log1p(9) / math.log1p(99))
    assert b.stock_penalty == pytest.approx(0.3) and b.business == pytest.approx(b.sales_bonus - 0.3)
    assert b.final == pytest.approx(b.relevance + b.business)


def test_sales_smoothing_keeps_new_products_close():
    w = BusinessSettings()  # prior 10 pseudo-sales
    terms = business.sales_terms(
        [cand("new", 0.5, sales=1), cand("few", 0.5, sales=3), cand("top", 0.5, sales=5450)], w
    )
    assert terms[2] == pytest.approx(1.0)
    assert terms[0] == pytest.approx(math.log1p(11) / math.log1p(5460))
    assert terms[1] - terms[0] < 0.05  # a couple of sales more is noise, not a lead
    raw = business.sales_terms(
        [cand("new", 0.5, sales=1), cand("top", 0.5, sales=5450)], w.model_copy(update={"sales_prior": 0})
    )
    assert raw[0] < terms[0]  # without the prior the newcomer gets almost nothing


@pytest.mark.parametrize("gap", [0.05, 0.051, 0.2, 0.5])
def test_a_best_seller_never_passes_a_product_a_margin_more_relevant(gap):
    w = BusinessSettings()
    out = business.apply([cand("relevant", 0.8, sales=0), cand("best-seller", 0.8 - gap, sales=10**9)], w)
    assert out[0].id == "relevant"


def test_within_the_margin_sales_decide():
    w = BusinessSettings()
    out = business.apply([cand("relevant", 0.80, sales=0), cand("best-seller", 0.77, sales=100_000)], w)
    assert [c.id for c in out] == ["best-seller", "relevant"]


def test_out_of_stock_falls_below_every_comparable_in_stock_product():
    w = BusinessSettings()
    # the out-of-stock one is the most relevant and the best-seller; in-stock ones are up to a margin less relevant
    cands = [cand("gone", 0.90, sales=10**6, stock=0)] + [
        cand(f"in{i}", 0.90 - d, sales=0) for i, d in enumerate([0.0, 0.01, 0.03, 0.049])
    ]
    out = [c.id for c in business.apply(cands, w)]
    assert out[-1] == "gone"
    # and out-of-stock products keep their own relevance order among themselves
    out = business.apply([cand("g1", 0.9, stock=0), cand("g2", 0.5, stock=0), cand("i", 0.3)], w)
    assert [c.id for c in out] == ["g1", "g2", "i"]


def test_the_issue_figures_no_longer_let_the_best_seller_win():
    # the README example as first reported: RRF ranks 1 and 2 in both lists, 6x the sales on the second
    gift = cand("w1", None, sales=860, stock=35, fused=2 / 61, bm25=1.0e-5, knn=0.79)
    sports = cand("w2", None, sales=5450, stock=120, fused=2 / 62, bm25=5.8e-6, knn=0.46)
    out = business.apply([gift, sports], BusinessSettings())
    assert [c.id for c in out] == ["w1", "w2"]
    assert out[1].relevance == pytest.approx((0.58 + 0.46 / 0.79) / 2)


def test_out_of_stock_filter_and_untracked_stock():
    w = BusinessSettings(out_of_stock="filter")
    out = business.apply([cand("a", 0.9, stock=0), cand("b", 0.1, stock=None)], w)
    assert [c.id for c in out] == ["b"]


def test_relevance_uses_retrieval_magnitudes_in_the_incoming_order():
    # RRF put them 1, 2, 3; BM25 and kNN say the second is far behind the first, the third close to it
    cands = [
        cand("a", None, fused=0.0328, bm25=10.0, knn=0.8),
        cand("b", None, fused=0.0323, bm25=4.0, knn=0.4),
        cand("c", None, fused=0.0318, bm25=5.0, knn=0.5),
    ]
    rel = business.relevance(cands)
    assert rel[0] == pytest.approx(1.0)
    assert rel[1] == pytest.approx((0.4 + 0.5) / 2)
    assert rel[2] == pytest.approx(rel[1])  # never above what the fusion put before it
    # a retrieval that missed a candidate counts as its lowest returned score, not zero
    only_bm25 = business.relevance([cand("x", None, bm25=8.0, knn=0.9), cand("y", None, bm25=4.0, knn=None)])
    assert only_bm25[1] == pytest.approx((0.5 + 0.9 / 0.9) / 2)
    # without raw scores (server-side fusion), the fused score over the best one
    assert business.relevance([cand("p", None, fused=0.8), cand("q", None, fused=0.2)]) == [1.0, 0.25]
    assert business.apply([], BusinessSettings()) == []


def test_ties_keep_incoming_order_and_settings_are_checked():
    out = business.apply([cand("z", 0.5), cand("a", 0.5)], BusinessSettings())
    assert [c.id for c in out] == ["z", "a"]
    with pytest.raises(ValidationError, match="w_relevance"):
        BusinessSettings(w_relevance=1.0)  # the old linear weights are gone: say so, do not ignore them
    with pytest.raises(ValidationError, match="margin"):
        BusinessSettings(margin=2)


# ------------------------------------------------------------------------------------ the pipeline

# the README's worked example, after its update-signals step (w2 back in stock, the best-seller)
README_CATALOG = [
    Product(
        id="w1",
        title="小众设计师珐琅手表 女士 礼盒装",
        brand="Maison Lune",
        category="手表",
        price=1299,
        sales=860,
        stock=35,
    ),
    Product(
        id="w2", title="卡西欧 G-SHOCK 运动手表 防水", brand="Casio", category="手表", price=799, sales=5400, stock=0
    ),
]
README_QUERY = "适合送女友的轻奢小众手表"


def bm25_pipeline(path, products: list[Product]) -> Pipeline:
    backend = EmbeddedBackend(path)
    backend.upsert(products, None)
    return Pipeline(Settings(embedder="none", reranker="none"), backend)


def ids(pipeline: Pipeline, query: str, **req) -> list[str]:
    return [h.id for h in pipeline.search(SearchRequest(query=query, size=50, **req)).hits]


def test_readme_example_ranks_the_gift_watch_first(tmp_path):
    pipeline = bm25_pipeline(tmp_path, README_CATALOG)
    try:
        assert ids(pipeline, README_QUERY) == ["w1", "w2"]  # w2 out of stock
        pipeline.backend.update_signals([SignalUpdate(id="w2", stock=120, sales=5450)])
        response = pipeline.search(SearchRequest(query=README_QUERY, explain=True))
        assert [h.id for h in response.hits] == ["w1", "w2"]  # in stock, 6× the sales: still second
        gift, sports = (h.explain for h in response.hits)
        assert gift.relevance == pytest.approx(1.0) and sports.relevance < 1.0 - BusinessSettings().margin
        assert sports.sales_bonus == pytest.approx(BusinessSettings().margin)  # the best-seller's full bonus
        assert gift.final == pytest.approx(gift.relevance + gift.sales_bonus - gift.stock_penalty)
    finally:
        pipeline.close()


def test_exact_title_new_product_ranks_first(tmp_path):
    query = "华为智能运动手表 GT 5"
    new = Product(id="n01", title=query, category=["手表", "智能手表"], price=1488, sales=1, stock=50)
    pipeline = bm25_pipeline(tmp_path, [*load_demo_catalog(None), new])
    try:
        ranked = ids(pipeline, query)
        assert ranked[0] == "n01"
        # the best-sellers right behind it are the same as without business scores, reordered at most
        assert set(ranked[1:4]) <= set(ids(pipeline, query, business_enabled=False)[1:6])
    finally:
        pipeline.close()


@pytest.fixture(scope="module")
def tiny_models(tiny_embedder_dir, tiny_reranker_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("model-cache")
    return Embedder(str(tiny_embedder_dir), cache_dir=cache), Reranker(
        str(tiny_reranker_dir), cache_dir=cache, precision="fp32"
    )


def model_pipeline(path, models, products: list[Product], **settings) -> Pipeline:
    embedder, reranker = models
    backend = EmbeddedBackend(path, dim=embedder.dim)
    backend.upsert(products, embedder.encode_documents([p.embedding_text() for p in products]))
    return Pipeline(Settings(**settings), backend, embedder, reranker)


@pytest.mark.parametrize("rerank", [True, False])
def test_flat_signals_leave_the_relevance_order_unchanged(tmp_path, tiny_models, rerank):
    flat = [p.model_copy(update={"sales": 500, "stock": 10}) for p in load_demo_catalog(None)]
    pipeline = model_pipeline(tmp_path, tiny_models, flat, rerank_k=10)
    try:
        for query in (README_QUERY, "智能手表", "礼盒"):
            on = ids(pipeline, query, rerank=rerank)
            assert len(on) > 10 and on == ids(pipeline, query, rerank=rerank, business_enabled=False), query
    finally:
        pipeline.close()


def test_equal_relevance_lets_the_best_seller_win(tmp_path, tiny_models):
    twin = {"title": "珐琅表盘女士手表 礼盒装", "category": ["手表", "女表"], "price": 999, "stock": 20}
    twins = [Product(id="t-a", sales=0, **twin), Product(id="t-b", sales=0, **twin)]
    pipeline = model_pipeline(tmp_path, tiny_models, [*load_demo_catalog(None), *twins], rerank_k=10)
    try:
        query = "珐琅表盘女士手表 礼盒装"
        plain = ids(pipeline, query, business_enabled=False)
        first, second = [i for i in plain if i.startswith("t-")]
        assert abs(plain.index(first) - plain.index(second)) == 1  # identical texts: tied, side by side
        pipeline.backend.update_signals([SignalUpdate(id=second, sales=3000)])
        ranked = ids(pipeline, query)
        assert ranked.index(second) < ranked.index(first)
        pipeline.backend.update_signals([SignalUpdate(id=second, stock=0)])
        ranked = ids(pipeline, query)
        assert ranked.index(first) < ranked.index(second)  # out of stock: the best-seller drops behind its twin
    finally:
        pipeline.close()
