"""The embedded store's filtered retrieval shortcuts give what the plain paths give: a broad price/stock
filter applied after a pruned BM25 search, the per-generation cache of a filter's pks for kNN, and
text analysed ahead of its upsert."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from middleware.backends.embedded import EmbeddedBackend
from middleware.backends.embedded.lexical import POST_FILTER_MIN_SHARE, tokens_json
from middleware.products import Filters, Product, SignalUpdate

WORDS = ["drill", "cordless", "hammer", "lamp", "led", "shade", "paint", "white", "手机", "壳", "耳机"]


def catalog(n: int) -> list[Product]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        # every 7th: a block of equal scores, so ties cross every cut
        title = "cordless drill kit" if i % 7 == 0 else " ".join(rng.choice(WORDS, size=int(rng.integers(1, 5))))
        price = None if i % 11 == 0 else float(rng.choice([5.0, 19.99, 20.0, 50.0, 120.0, 300.0, 301.0, 999.0]))
        stock = None if i % 13 == 0 else int(rng.integers(0, 3))
        out.append(Product(id=f"p{i}", title=title, price=price, stock=stock, brand=f"b{i % 3}"))
    return out


BROAD = [
    Filters(price_min=20, price_max=300, in_stock=True),
    Filters(in_stock=True),
    Filters(price_min=19.99),
    Filters(price_max=300),
    Filters(price_min=20, price_max=20),  # selective: inside the query
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedBackend:
    backend = EmbeddedBackend(tmp_path_factory.mktemp("filters"))
    items = catalog(700)
    for start in range(0, len(items), 140):  # several segments (a search commits what was written)
        backend.upsert(items[start : start + 140], None)
        backend.bm25("drill", None, 1)
    # the tied products again, newest first: their pks no longer follow their document addresses
    tied = [p for p in items if p.title == "cordless drill kit"][::-1]
    for start in range(0, len(tied), 9):
        backend.upsert(tied[start : start + 9], None)
        backend.bm25("drill", None, 1)
    yield backend
    backend.close()


@pytest.mark.parametrize("filters", BROAD, ids=lambda f: f.model_dump_json(exclude_none=True))
def test_a_broad_price_and_stock_filter_gives_the_top_n_of_the_filter_inside_the_query(
    store: EmbeddedBackend, filters: Filters, monkeypatch: pytest.MonkeyPatch
) -> None:
    lexical = store.lexical
    post_filtered = []
    real = lexical._post_filtered

    def spy(*args: object) -> object:
        found = real(*args)  # type: ignore[arg-type]
        post_filtered.append(found is not None)
        return found

    monkeypatch.setattr(lexical, "_post_filtered", spy)
    products = {p.id: p for p in catalog(700)}
    for text in ["cordless drill", "drill", "white lamp shade", "手机壳", "paint hammer led"]:
        for n in (1, 3, 7, 10, 40, 1000):
            expected = lexical.search(lexical.match_query(text, filters), n)
            assert lexical.top(text, filters, n) == expected, (text, n)
            found = store.bm25(text, filters, n)
            assert [c.bm25 for c in found] == [score for _, score in expected]
            assert all(filters.matches(products[c.id]) for c in found)
    if lexical._share(filters) >= POST_FILTER_MIN_SHARE:
        assert any(post_filtered), "the post-filter path was never taken"
    else:
        assert post_filtered == [], "a selective filter was post-filtered"


def test_a_selective_or_non_numeric_filter_runs_inside_the_query(
    store: EmbeddedBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    lexical = store.lexical
    calls = []
    monkeypatch.setattr(lexical, "_post_filtered", lambda *a: calls.append(a))
    for filters in (Filters(brand=["b1"]), Filters(price_min=900), Filters(ids=["p1", "p7"], in_stock=True)):
        expected = lexical.search(lexical.match_query("cordless drill", filters), 10)
        assert lexical.top("cordless drill", filters, 10) == expected
    assert calls == []


def vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def brute_knn(store: EmbeddedBackend, query: np.ndarray, filters: Filters, n: int) -> list[str]:
    products = {p.id: p for p in store.get(list(store.iter_ids()))}
    with store.store.reader() as conn:
        rows = conn.execute("SELECT id, vector FROM products WHERE vector IS NOT NULL").fetchall()
    scored = [
        (-float(np.frombuffer(blob, dtype="<f4") @ query), pid) for pid, blob in rows if filters.matches(products[pid])
    ]
    return [pid for _, pid in sorted(scored)[:n]]


def test_a_cached_filter_follows_every_write(tmp_path: Path) -> None:
    filters = Filters(price_min=20, price_max=300, in_stock=True)
    query = vectors(1, 99)[0]
    with EmbeddedBackend(tmp_path, dim=8, hnsw_threshold=10**9) as store:
        items = catalog(300)
        store.upsert(items, vectors(len(items), 1))

        def check() -> None:
            assert [c.id for c in store.knn(query, filters, 25)] == brute_knn(store, query, filters, 25)

        check()
        check()  # served from the cache
        assert len(store._filter_cache) == 1
        best = store.knn(query, filters, 1)[0].id
        store.update_signals([SignalUpdate(id=best, stock=0)])  # out of the filter: a signal-only write
        assert best not in [c.id for c in store.knn(query, filters, 25)]
        check()
        # a new product that passes the filter, pointing where the query points
        store.upsert([Product(id="new", title="lamp", price=25.0, stock=4)], query.reshape(1, -1))
        assert store.knn(query, filters, 1)[0].id == "new"
        store.delete(["new"])
        check()
        assert len(store._filter_cache) == 1  # one generation's sets at a time


def test_prepared_tokens_are_what_the_upsert_would_compute(tmp_path: Path) -> None:
    items = catalog(40)
    with EmbeddedBackend(tmp_path, analysis_workers=0) as store:
        store.prepare(items)
        assert len(store._prepared) == len({(p.title, p.search_text()) for p in items})
        renamed = items[0].model_copy(update={"title": "brand new teapot"})  # its text changed after prepare
        store.upsert([renamed, *items[1:]], None)
        with store.store.reader() as conn:
            stored = dict(conn.execute("SELECT p.id, t.fields FROM product_text t JOIN products p ON p.pk = t.pk"))
        assert all(json.loads(stored[p.id]) == json.loads(tokens_json(p)) for p in [renamed, *items[1:]])
        assert [c.id for c in store.bm25("teapot", None, 5)] == ["p0"]
        with pytest.raises(TypeError, match="prepare"):
            store.prepare(["not a product"])  # type: ignore[list-item]
