import math

import pytest

from middleware import business
from middleware.config import BusinessSettings
from middleware.products import Candidate, Product


def cand(i: str, rerank: float | None, sales: int = 0, stock: int | None = 5, fused: float = 0.0):
    return Candidate(id=i, product=Product(id=i, title=i, sales=sales, stock=stock), rerank=rerank, fused=fused)


def test_formula():
    w = BusinessSettings(w_relevance=1.0, w_sales=0.2, w_stock=0.1)
    out = business.apply([cand("a", 0.5, sales=99), cand("b", 0.5, sales=9, stock=0)], w)
    a, b = {c.id: c for c in out}["a"], {c.id: c for c in out}["b"]
    assert a.final == pytest.approx(0.5 + 0.2 * 1.0 + 0.1)
    assert b.business == pytest.approx(0.2 * math.log1p(9) / math.log1p(99))  # out of stock: no bonus
    assert [c.id for c in out] == ["a", "b"]


def test_monotone_in_sales_and_stock():
    w = BusinessSettings()
    base = [cand("x", 0.6, sales=50), cand("y", 0.6, sales=10)]
    prev = None
    for s in [0, 1, 10, 100, 1000]:
        out = business.apply([cand("a", 0.6, sales=s), *base], w)
        final = {c.id: c.final for c in out}["a"]
        assert prev is None or final >= prev
        prev = final
    in_stock = business.apply([cand("a", 0.6, stock=3)], w)[0].final
    out_stock = business.apply([cand("a", 0.6, stock=0)], w)[0].final
    assert in_stock > out_stock


def test_defaults_keep_relevance_dominant():
    # a clearly more relevant product beats a best-seller that is less relevant
    out = business.apply([cand("best-seller", 0.55, sales=100000), cand("relevant", 0.80, sales=0)], BusinessSettings())
    assert out[0].id == "relevant"


def test_out_of_stock_filter_and_untracked_stock():
    w = BusinessSettings(out_of_stock="filter")
    out = business.apply([cand("a", 0.9, stock=0), cand("b", 0.1, stock=None)], w)
    assert [c.id for c in out] == ["b"]


def test_without_rerank_fused_is_scaled_to_one():
    w = BusinessSettings(w_sales=0.0, w_stock=0.0)
    out = business.apply([cand("a", None, fused=0.032), cand("b", None, fused=0.016)], w)
    assert [c.final for c in out] == [pytest.approx(1.0), pytest.approx(0.5)]
    assert business.apply([], w) == []


def test_ties_keep_incoming_order():
    w = BusinessSettings()
    out = business.apply([cand("z", 0.5), cand("a", 0.5)], w)
    assert [c.id for c in out] == ["z", "a"]
