"""The embedded backend (SQLite + tantivy + faiss) against brute force over `Filters.matches`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sqlite3
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from middleware.backends import Backend, BackendError
from middleware.backends.base import EmbedderBinding, EmbedderMismatch
from middleware.backends.embedded import DB_NAME, FAISS_NAME, EmbeddedBackend
from middleware.backends.embedded.vectors import VectorIndex
from middleware.products import Filters, Product, SignalUpdate

DIM = 16
WORDS = [
    "手表",
    "珐琅",
    "礼盒",
    "女士",
    "机械",
    "运动",
    "蓝牙",
    "耳机",
    "连衣裙",
    "口红",
    "Apple",
    "Casio",
    "pro",
    "18K",
]
BRANDS = ["Omega", "Casio", "DW", "Apple", None]
CATEGORIES = ["手表", "礼物", "服饰", "数码", "美妆"]


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def random_catalog(seed: int, n: int) -> tuple[list[Product], np.ndarray]:
    rng = np.random.default_rng(seed)
    products = []
    for i in range(n):
        title = "".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
        products.append(
            Product(
                id=f"p{i}",
                title=title,
                description="".join(rng.choice(WORDS, size=2)) if rng.random() < 0.5 else None,
                brand=BRANDS[int(rng.integers(len(BRANDS)))],
                category=list(rng.choice(CATEGORIES, size=int(rng.integers(0, 3)), replace=False)),
                price=None if rng.random() < 0.1 else float(rng.integers(0, 1000)),
                stock=None if rng.random() < 0.3 else int(rng.integers(0, 3)),
                sales=int(rng.integers(0, 500)),
            )
        )
    return products, unit(rng, n)


def random_filters(rng: np.random.Generator, ids: list[str]) -> Filters:
    kwargs: dict = {}
    if rng.random() < 0.4:
        kwargs["category"] = list(rng.choice(CATEGORIES, size=int(rng.integers(1, 3)), replace=False))
    if rng.random() < 0.4:
        kwargs["brand"] = list(rng.choice([b for b in BRANDS if b], size=int(rng.integers(1, 3)), replace=False))
    if rng.random() < 0.4:
        lo = float(rng.integers(0, 600))
        kwargs["price_min"], kwargs["price_max"] = lo, lo + float(rng.integers(0, 500))
    if rng.random() < 0.4:
        kwargs["in_stock"] = bool(rng.random() < 0.8)
    if rng.random() < 0.2:
        kwargs["ids"] = list(rng.choice(ids, size=20, replace=False))
    if rng.random() < 0.4:  # the negative side: none of these clauses
        shapes = [
            {"brand": [b for b in BRANDS if b][int(rng.integers(4))]},
            {"category": list(rng.choice(CATEGORIES, size=2, replace=False))},
            {"price_min": float(rng.integers(0, 1000))},
            {"price_max": 400.0, "in_stock": True},
            {"ids": list(rng.choice(ids, size=30, replace=False))},
        ]
        kwargs["exclude"] = [
            shapes[int(i)] for i in rng.choice(len(shapes), size=int(rng.integers(1, 3)), replace=False)
        ]
    return Filters(**kwargs)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedBackend]:
    with EmbeddedBackend(tmp_path / "data") as backend:
        yield backend


@pytest.fixture(scope="module")
def catalog() -> tuple[list[Product], np.ndarray]:
    return random_catalog(seed=7, n=240)


def brute_force_knn(products: list[Product], vectors: np.ndarray, query: np.ndarray, f: Filters | None, n: int):
    keep = [i for i, p in enumerate(products) if f is None or f.matches(p)]
    scores = vectors[keep] @ query
    order = np.lexsort((np.array(keep), -scores))[:n]  # ties by insertion order (= rowid)
    return [products[keep[i]].id for i in order], [float(scores[i]) for i in order]


# ---------------------------------------------------------------------------------------- basics


def test_implements_the_backend_protocol(store: EmbeddedBackend) -> None:
    assert isinstance(store, Backend)


def test_upsert_get_count_iter_and_hashes(store: EmbeddedBackend, catalog) -> None:
    products, vectors = catalog
    store.upsert(products, vectors)
    assert store.count() == len(products)
    assert list(store.iter_ids()) == [p.id for p in products]
    assert store.get(["p3", "missing", "p1"]) == [products[3], products[1]]
    assert store.content_hashes(["p0", "nope"]) == {"p0": products[0].content_hash()}
    stats = store.stats()
    assert stats.products == stats.vectors == len(products)
    assert stats.dim == DIM and stats.details["index_type"] == "flat" and stats.size_bytes > 0


def test_upsert_replaces_text_vector_and_signals(store: EmbeddedBackend) -> None:
    rng = np.random.default_rng(1)
    store.upsert([Product(id=1, title="珐琅手表", price=10), Product(id=2, title="蓝牙耳机")], unit(rng, 2))
    new_vector = unit(rng, 1)
    store.upsert([Product(id=1, title="运动连衣裙", price=20, stock=0)], new_vector)
    assert store.count() == 2
    assert store.get(["1"])[0].title == "运动连衣裙" and store.get(["1"])[0].price == 20
    assert [c.id for c in store.bm25("珐琅", None, 10)] == []
    assert [c.id for c in store.bm25("连衣裙", None, 10)] == ["1"]
    top = store.knn(new_vector[0], None, 1)[0]
    assert top.id == "1" and top.knn == pytest.approx(1.0, abs=1e-5)
    assert store.stats().details["index_vectors"] == 2  # the old vector is gone from the flat index


def test_duplicate_id_in_one_batch_is_one_product_last_wins(store: EmbeddedBackend) -> None:
    vectors = unit(np.random.default_rng(2), 3)
    store.upsert([Product(id="a", title="口红"), Product(id="b", title="耳机"), Product(id="a", title="手表")], vectors)
    assert store.count() == 2
    assert store.get(["a"])[0].title == "手表"
    hits = store.knn(vectors[2], None, 5)
    assert hits[0].id == "a" and hits[0].knn == pytest.approx(1.0, abs=1e-5)
    assert [c.id for c in store.knn(vectors[0], None, 5)].count("a") == 1


def test_a_row_key_is_never_given_twice_even_after_the_newest_row_is_deleted(tmp_path: Path) -> None:
    # the lexical and vector indexes address products by row key: a reused key would resurrect a
    # deleted product's postings or vector under another product
    with EmbeddedBackend(tmp_path / "data") as backend:
        backend.upsert([Product(id="a", title="口红"), Product(id="b", title="耳机")], None)
        backend.delete(["b"])
        backend.upsert([Product(id="c", title="手表")], None)
        backend.upsert([Product(id="a", title="新口红")], None)  # replaced: a new row
        with sqlite3.connect(tmp_path / "data" / DB_NAME) as conn:
            keys = dict(conn.execute("SELECT id, pk FROM products").fetchall())
        assert keys == {"c": 3, "a": 4}
        assert [c.id for c in backend.bm25("耳机", None, 5)] == []
        assert [c.id for c in backend.bm25("手表", None, 5)] == ["c"]
        assert [c.id for c in backend.bm25("新口红", None, 5)] == ["a"]


def test_delete_removes_from_both_retrievals(store: EmbeddedBackend, catalog) -> None:
    products, vectors = catalog
    store.upsert(products[:20], vectors[:20])
    assert store.delete(["p0", "p1", "missing", "p0"]) == 2
    assert store.count() == 18 and store.get(["p0", "p1"]) == []
    assert store.knn(vectors[0], None, 1)[0].id != "p0"
    for word in WORDS:
        assert not {"p0", "p1"} & {c.id for c in store.bm25(word, None, 100)}
    assert store.delete([]) == 0


def test_upsert_without_vectors_is_bm25_only_and_drops_an_old_vector(store: EmbeddedBackend) -> None:
    store.upsert([Product(id="x", title="珐琅手表")], None)
    assert store.knn(np.ones(DIM, np.float32), None, 5) == []  # no vectors at all yet
    vectors = unit(np.random.default_rng(3), 2)
    store.upsert([Product(id="y", title="耳机"), Product(id="z", title="口红")], vectors)
    store.upsert([Product(id="y", title="蓝牙耳机")], None)  # new text, no vector computed for it
    assert [c.id for c in store.knn(vectors[0], None, 5)] == ["z"]
    assert store.stats().vectors == 1 and store.count() == 3


def test_dimension_is_fixed_and_mismatches_are_clear(tmp_path: Path) -> None:
    with EmbeddedBackend(tmp_path) as store:
        store.upsert([Product(id=1, title="手表")], unit(np.random.default_rng(0), 1, 8))
        with pytest.raises(ValueError, match="dimension mismatch"):
            store.upsert([Product(id=2, title="手表")], unit(np.random.default_rng(0), 1, 4))
        with pytest.raises(ValueError, match="shape"):
            store.upsert([Product(id=2, title="手表")], unit(np.random.default_rng(0), 2, 8))
        with pytest.raises(ValueError, match="NaN"):
            store.upsert([Product(id=2, title="手表")], np.full((1, 8), np.nan, np.float32))
        with pytest.raises(ValueError, match="dimensions"):
            store.knn(np.ones(4, np.float32), None, 3)
        assert store.count() == 1
    with pytest.raises(ValueError, match="8-d vectors but 16-d"):
        EmbeddedBackend(tmp_path, dim=16)
    EmbeddedBackend(tmp_path, dim=8).close()


def test_dim_given_at_open_is_checked_at_first_upsert(tmp_path: Path) -> None:
    with EmbeddedBackend(tmp_path, dim=8) as store, pytest.raises(ValueError, match="8-d"):
        store.upsert([Product(id=1, title="手表")], unit(np.random.default_rng(0), 1, 4))


def test_closed_backend_and_bad_directory_raise_backend_error(tmp_path: Path) -> None:
    store = EmbeddedBackend(tmp_path / "a")
    store.close()
    store.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        store.bm25("手表", None, 5)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / DB_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(BackendError, match=r"not a usable shopsearch database|cannot open"):
        EmbeddedBackend(tmp_path / "b")


# ---------------------------------------------------------------------------------------- filters


@pytest.mark.parametrize("kind", ["flat", "hnsw_exact", "hnsw_selector"])
def test_filters_inside_knn_equal_brute_force(tmp_path: Path, catalog, kind: str) -> None:
    products, vectors = catalog
    options = {
        "flat": {},
        "hnsw_exact": {"hnsw_threshold": 100},  # filtered subsets searched exactly over the graph's storage
        "hnsw_selector": {"hnsw_threshold": 100, "exact_max": 0, "hnsw_ef_search": 256},
    }[kind]
    rng = np.random.default_rng(11)
    with EmbeddedBackend(tmp_path, **options) as store:
        store.upsert(products, vectors)
        assert store.stats().details["index_type"] == ("flat" if kind == "flat" else "hnsw")
        for _ in range(40):
            f = random_filters(rng, [p.id for p in products])
            query = unit(rng, 1)[0]
            want_ids, want_scores = brute_force_knn(products, vectors, query, f, 10)
            got = store.knn(query, f, 10)
            assert all(f.matches(c.product) for c in got)
            assert [c.ranks["knn"] for c in got] == list(range(1, len(got) + 1))
            if kind == "hnsw_selector":  # approximate: a filtered HNSW walk may miss a neighbour
                assert len(set(want_ids) & {c.id for c in got}) >= 0.8 * len(want_ids)
            else:
                assert [c.id for c in got] == want_ids
                assert [c.knn for c in got] == pytest.approx(want_scores, abs=1e-5)


def test_filters_inside_bm25_give_the_true_top_n(store: EmbeddedBackend, catalog) -> None:
    """Filtered top-n = the unfiltered full ranking restricted to matching products, cut at n."""
    products, vectors = catalog
    store.upsert(products, vectors)
    rng = np.random.default_rng(12)
    checked = 0
    for _ in range(40):
        f = random_filters(rng, [p.id for p in products])
        query = " ".join(rng.choice(WORDS, size=2))
        full = store.bm25(query, None, len(products))
        want = [c.id for c in full if f.matches(c.product)][:5]
        got = store.bm25(query, f, 5)
        assert [c.id for c in got] == want
        assert all(f.matches(c.product) for c in got)
        checked += bool(want)
    assert checked > 20  # the check is not vacuous


def test_bm25_scores_are_higher_is_better_with_ranks(store: EmbeddedBackend) -> None:
    store.upsert(
        [Product(id=1, title="珐琅"), Product(id=2, title="珐琅手表珐琅"), Product(id=3, title="连衣裙")]
        + [Product(id=10 + i, title=f"其他商品{i}") for i in range(10)],
        None,
    )
    hits = store.bm25("珐琅手表", None, 10)
    assert [c.id for c in hits] == ["2", "1"]
    assert hits[0].bm25 > hits[1].bm25 > 0
    assert [c.ranks for c in hits] == [{"bm25": 1}, {"bm25": 2}]
    assert hits[0].product is not None and hits[0].product.title == "珐琅手表珐琅"


@pytest.mark.parametrize("boosts", [None, {"words_title": 1.0, "cjk_body": 0.5}])
def test_score_is_the_boosted_sum_of_each_fields_bm25(tmp_path: Path, catalog, boosts) -> None:
    """BM25 per lexical field, times its boost, summed: what each field adds can be checked alone."""
    from middleware.text import FIELD_BOOSTS, LEXICAL_FIELDS

    products, _ = catalog
    boosts = boosts or dict(FIELD_BOOSTS)
    queries = ["珐琅手表", "Apple pro 耳机", "女士连衣裙口红"]
    per_field: dict[str, list[dict[str, float]]] = {}
    for name in LEXICAL_FIELDS:
        with EmbeddedBackend(tmp_path / name, field_boosts={name: 1.0}) as alone:
            alone.upsert(products, None)
            per_field[name] = [{c.id: c.bm25 for c in alone.bm25(q, None, len(products))} for q in queries]
    with EmbeddedBackend(tmp_path / "all", field_boosts=boosts) as store:
        store.upsert(products, None)
        for i, query in enumerate(queries):
            want: dict[str, float] = {}
            for name, boost in boosts.items():
                for pid, score in per_field[name][i].items():
                    want[pid] = want.get(pid, 0.0) + boost * score
            got = store.bm25(query, None, len(products))
            assert {c.id: c.bm25 for c in got} == pytest.approx(want, rel=1e-5)
            assert [c.bm25 for c in got] == sorted((c.bm25 for c in got), reverse=True)


def test_field_boosts_are_checked(tmp_path: Path) -> None:
    for bad in ({"nope": 1.0}, {"words_title": -1.0}, {"words_title": 0.0}):
        with pytest.raises(ValueError, match="field_boosts"):
            EmbeddedBackend(tmp_path / "x", field_boosts=bad)


def test_title_weighs_more_than_description(store: EmbeddedBackend) -> None:
    store.upsert(
        [
            Product(id="body", title="礼物套装", description="珐琅"),
            Product(id="title", title="珐琅", description="礼物套装"),
        ]
        + [Product(id=f"f{i}", title=f"其他{i}") for i in range(5)],
        None,
    )
    assert [c.id for c in store.bm25("珐琅", None, 5)] == ["title", "body"]


def test_ties_are_ordered_by_insertion(store: EmbeddedBackend) -> None:
    same = unit(np.random.default_rng(4), 1)
    store.upsert([Product(id=f"t{i}", title="同款手表") for i in range(5)], np.repeat(same, 5, axis=0))
    store.upsert([Product(id="other", title="口红")], unit(np.random.default_rng(5), 1))
    expected = [f"t{i}" for i in range(5)]
    assert [c.id for c in store.bm25("手表", None, 10)] == expected
    assert [c.id for c in store.knn(same[0], None, 5)] == expected


def test_a_tie_wider_than_the_cut_keeps_the_first_inserted(store: EmbeddedBackend) -> None:
    """Each batch is searched, so committed, on its own: the lexical index holds several segments,
    whose order is the engine's own. The top n of a tie many times wider than n are still the
    first inserted, not the engine's first addresses."""
    for batch in range(6):
        store.upsert([Product(id=f"t{batch}{i}", title="同款手表") for i in range(5)], None)
        assert len(store.bm25("手表", None, 100)) == 5 * (batch + 1)
    ids = [f"t{batch}{i}" for batch in range(6) for i in range(5)]
    for n in (1, 3, 7, 30):
        assert [c.id for c in store.bm25("手表", None, n)] == ids[:n]


# ---------------------------------------------------------------------------------------- signals


def _text_and_vector_state(data_dir: Path) -> tuple[list, list]:
    conn = sqlite3.connect(data_dir / DB_NAME)
    try:
        vectors = conn.execute("SELECT id, vector FROM products ORDER BY pk").fetchall()
        text = conn.execute("SELECT * FROM product_text ORDER BY pk").fetchall()
    finally:
        conn.close()
    return vectors, text


def test_update_signals_touches_neither_text_nor_vectors(tmp_path: Path, catalog) -> None:
    products, vectors = catalog
    data = tmp_path / "data"
    with EmbeddedBackend(data) as store:
        store.upsert(products, vectors)
        store.flush()
        before = _text_and_vector_state(data)
        faiss_file = data / FAISS_NAME
        faiss_stat, faiss_bytes = faiss_file.stat(), faiss_file.read_bytes()
        generation = store.stats().generation

        missing = store.update_signals(
            [
                SignalUpdate(id="p0", stock=0, sales=12345),
                SignalUpdate(id="p1", price="89.00"),
                SignalUpdate(id="ghost", sales=1),
            ]
        )
        assert missing == ["ghost"]
        p0, p1 = store.get(["p0", "p1"])
        assert (p0.stock, p0.sales, p0.price) == (0, 12345, products[0].price)
        assert (p1.price, p1.stock, p1.sales) == (89.0, products[1].stock, products[1].sales)
        assert store.content_hashes(["p0"]) == {"p0": products[0].content_hash()}
        # filters read the new signals
        assert "p0" not in {c.id for c in store.knn(vectors[0], Filters(in_stock=True), 300)}
        assert store.knn(vectors[1], Filters(price_min=89, price_max=89), 1)[0].id == "p1"
        assert store.stats().generation == generation
    assert _text_and_vector_state(data) == before
    assert faiss_file.read_bytes() == faiss_bytes
    assert faiss_file.stat().st_mtime_ns == faiss_stat.st_mtime_ns  # not rewritten, even on close


def test_facets_are_exact_across_segments_and_follow_signal_updates(store: EmbeddedBackend, catalog) -> None:
    """Written in batches, each searched before the next (a segment each), then updated and pruned:
    the aggregations over the lexical index count what SQLite holds."""
    from middleware.backends.base import FacetSpec, MatchSet

    products, _ = catalog
    for start in range(0, len(products), 40):
        store.upsert(products[start : start + 40], None)
        store.count_matches(MatchSet(text="手表"))
    assert store.lexical.details()["segments"] > 1
    store.update_signals([SignalUpdate(id="p3", sales=100_000, stock=0), SignalUpdate(id="p4", price=1.5)])
    store.delete(["p5", "p6"])
    current = {p.id: p for p in store.get([p.id for p in products])}
    specs = [
        FacetSpec("brand", size=2),
        FacetSpec("category"),
        FacetSpec("sales", stats=True),
        FacetSpec("stock", ranges=((None, 1.0), (1.0, None))),
        FacetSpec("price", ranges=((0.0, 2.0), (None, 500.0))),
    ]
    updated = MatchSet(filters=Filters(ids=["p3", "p4", "p5"]))
    for match in (
        MatchSet(filters=Filters(category=["手表", "数码"], price_max=800)),
        MatchSet(text="手表 耳机"),
        updated,
    ):
        if match.text is None:
            matching = [p for p in current.values() if match.filters is not None and match.filters.matches(p)]
        else:  # the lexical matches, as listed (their values read from SQLite)
            matching = [c.product for c in store.listing(match, [], 0, len(products)) if c.product is not None]
        assert 10 < len(matching) < len(current) or match is updated
        _assert_facets(store.facets(match, specs), matching)
    _, _, sales, _, price = store.facets(updated, specs)
    assert sales.stats is not None and sales.stats.max == 100_000 and sales.stats.count == 2  # p5 is deleted
    assert price.ranges is not None and price.ranges[0].count == 1


def _assert_facets(facets: list, matching: list[Product]) -> None:
    brand, category, sales, stock, price = facets
    brands = sorted(Counter(p.brand for p in matching if p.brand).items(), key=lambda kv: (-kv[1], kv[0]))
    assert [(v.value, v.count) for v in brand.values or []] == brands[:2]
    assert brand.other == sum(n for _, n in brands[2:])
    categories = Counter(c for p in matching for c in set(p.category))
    assert {v.value: v.count for v in category.values or []} == categories
    assert sales.stats is not None and sales.stats.sum == sum(p.sales for p in matching)
    assert sales.stats.max == max(p.sales for p in matching)
    assert [r.count for r in stock.ranges or []] == [
        sum(1 for p in matching if p.stock is not None and p.stock < 1),
        sum(1 for p in matching if p.stock is not None and p.stock >= 1),
    ]
    priced = [p.price for p in matching if p.price is not None]
    assert [r.count for r in price.ranges or []] == [sum(x < 2.0 for x in priced), sum(x < 500.0 for x in priced)]


def test_prefix_terms_count_live_documents_after_deletes(store: EmbeddedBackend) -> None:
    """Deleted documents stay in the term dictionary's frequencies until their segment merges: the
    counts and the order offered are still those of the live products."""
    from middleware.backends.base import TermCount

    alpha = [Product(id=f"a{i}", title=f"alpha watch {i}", brand="Omega") for i in range(50)]
    alps = [Product(id=f"b{i}", title=f"alps boots {i}", brand="Alps Co", category="boots") for i in range(28)]
    alps += [Product(id=f"b{i}", title=f"alps boots {i}", brand="Omega") for i in range(28, 30)]
    store.upsert(alpha + alps, None)
    assert store.prefix_terms("al", 1) == [TermCount("alpha", 50)]
    store.delete([f"a{i}" for i in range(40)])
    store.update_signals([SignalUpdate(id=f"b{i}", sales=i) for i in range(5)])  # re-written documents
    assert store.lexical._holds_deleted(store.lexical._searcher())
    assert store.prefix_terms("al", 1) == [TermCount("alps", 30)]
    assert store.prefix_terms("alp", 3) == [
        TermCount("alps", 30),
        TermCount("Alps Co", 28, "brand"),
        TermCount("alpha", 10),
    ]
    store.delete([f"a{i}" for i in range(40, 50)])
    assert [t.term for t in store.prefix_terms("alph", 5)] == []


def test_update_signals_rejects_non_updates(store: EmbeddedBackend) -> None:
    with pytest.raises(TypeError, match=r"updates\[0\]"):
        store.update_signals([{"id": "x", "sales": 1}])  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------- persistence


def _snapshot(store: EmbeddedBackend, queries: np.ndarray) -> list:
    out = []
    for i, q in enumerate(queries):
        text = WORDS[i % len(WORDS)]
        out.append([(c.id, round(c.knn, 5)) for c in store.knn(q, None, 10)])
        out.append([(c.id, round(c.knn, 5)) for c in store.knn(q, Filters(brand=["Casio", "DW"]), 10)])
        out.append([(c.id, round(c.bm25, 5)) for c in store.bm25(text, Filters(in_stock=True), 10)])
    return out


@pytest.mark.parametrize("hnsw_threshold", [50_000, 100])
def test_reopen_keeps_everything(tmp_path: Path, catalog, hnsw_threshold: int) -> None:
    products, vectors = catalog
    queries = unit(np.random.default_rng(20), 5)
    with EmbeddedBackend(tmp_path, hnsw_threshold=hnsw_threshold) as store:
        store.upsert(products, vectors)
        store.delete(["p5"])
        store.upsert([products[6].model_copy(update={"title": "新标题手表"})], vectors[6:7])
        store.update_signals([SignalUpdate(id="p7", stock=0)])
        before, stats = _snapshot(store, queries), store.stats()
    with EmbeddedBackend(tmp_path, hnsw_threshold=hnsw_threshold) as store:
        assert _snapshot(store, queries) == before
        reopened = store.stats()
        assert reopened.size_bytes > 0 and stats.size_bytes > 0  # the WAL is checkpointed
        assert dataclasses.replace(reopened, size_bytes=0) == dataclasses.replace(stats, size_bytes=0)
        assert store.get(["p6"])[0].title == "新标题手表" and store.get(["p7"])[0].stock == 0


def _faiss_generation(path: Path) -> int:
    return struct.unpack("<16sQQ", path.read_bytes()[:32])[1]


def test_missing_faiss_file_is_rebuilt_with_identical_results(tmp_path: Path, catalog) -> None:
    products, vectors = catalog
    queries = unit(np.random.default_rng(21), 5)
    with EmbeddedBackend(tmp_path) as store:
        store.upsert(products, vectors)
        before = _snapshot(store, queries)
    (tmp_path / FAISS_NAME).unlink()
    with EmbeddedBackend(tmp_path) as store:
        assert (tmp_path / FAISS_NAME).exists()  # rebuilt and saved on open
        assert _snapshot(store, queries) == before


def test_corrupt_faiss_file_is_rebuilt(tmp_path: Path, catalog) -> None:
    products, vectors = catalog
    queries = unit(np.random.default_rng(22), 3)
    with EmbeddedBackend(tmp_path) as store:
        store.upsert(products, vectors)
        before = _snapshot(store, queries)
    path = tmp_path / FAISS_NAME
    path.write_bytes(path.read_bytes()[:32] + b"garbage" * 50)
    with EmbeddedBackend(tmp_path) as store:
        assert _snapshot(store, queries) == before


@pytest.mark.parametrize("hnsw_threshold", [50_000, 100])
def test_crash_between_commit_and_faiss_save_is_caught_up_on_open(tmp_path: Path, catalog, hnsw_threshold: int) -> None:
    """Copying the directory while the store is open, after committed but unsaved vector changes,
    is the state a crash leaves: SQLite ahead of vectors.faiss."""
    products, vectors = catalog
    queries = unit(np.random.default_rng(23), 5)
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    lazy = {"save_interval_s": 1e9, "save_every": 10**9, "hnsw_threshold": hnsw_threshold}
    with EmbeddedBackend(live, **lazy) as store:
        store.upsert(products[:150], vectors[:150])
    store = EmbeddedBackend(live, **lazy)
    try:
        store.upsert(products[150:], vectors[150:])
        store.delete(["p1", "p2"])
        store.upsert([products[3].model_copy(update={"title": "换了标题"})], unit(np.random.default_rng(9), 1))
        saved_generation = _faiss_generation(live / FAISS_NAME)
        assert store.stats().generation > saved_generation  # the save really was deferred
        shutil.copytree(live, crashed)
        expected = _snapshot(store, queries)
    finally:
        store.close()
    with EmbeddedBackend(crashed, hnsw_threshold=hnsw_threshold) as recovered:
        assert _snapshot(recovered, queries) == expected
        assert _faiss_generation(crashed / FAISS_NAME) == recovered.stats().generation
        assert recovered.count() == len(products) - 2


def test_index_switches_to_hnsw_above_threshold_and_excludes_dead_vectors(tmp_path: Path, catalog) -> None:
    products, vectors = catalog
    with EmbeddedBackend(tmp_path, hnsw_threshold=100) as store:
        store.upsert(products[:60], vectors[:60])
        assert store.stats().details["index_type"] == "flat"
        store.upsert(products[60:], vectors[60:])
        assert store.stats().details["index_type"] == "hnsw"
        replacement = unit(np.random.default_rng(30), 1)
        store.upsert([products[0]], replacement)  # p0's old vector stays in the graph, dead
        store.delete(["p1"])
        assert store.stats().details["index_dead"] == 2
        assert [c.id for c in store.knn(vectors[0], None, 240)].count("p0") == 1
        assert "p1" not in {c.id for c in store.knn(vectors[1], None, 240)}
        assert store.knn(replacement[0], None, 1)[0].id == "p0"
        got = [c.id for c in store.knn(vectors[5], None, 10)]
        want, _ = brute_force_knn(products[2:], vectors[2:], vectors[5], None, 10)
        assert len(set(got) & set(want)) >= 9
        # the exact filtered path skips dead vectors and sees the replacement
        current = [products[0], *products[2:]]
        current_vectors = np.concatenate([replacement, vectors[2:]])
        f = Filters(brand=["Casio", "DW"])
        for query in (replacement[0], vectors[0], vectors[7]):
            want, scores = brute_force_knn(current, current_vectors, query, f, 10)
            got = store.knn(query, f, 10)
            assert [c.id for c in got] == want
            assert [c.knn for c in got] == pytest.approx(scores, abs=1e-5)


# ---------------------------------------------------------------------------------------- queries


HOSTILE = [
    '"',
    '""',
    '"手表',
    "AND",
    "OR",
    "NOT",
    "手表 AND",
    "AND 手表 OR NOT",
    "*",
    "手*",
    "NEAR(",
    "NEAR(手表 耳机, 2)",
    "-",
    "-手表",
    ":",
    "title:手表",
    "words_title : 手表",
    "^",
    "^手表",
    "{words_title}: x",
    "(",
    ")",
    "((()))",
    "+",
    "'",
    "\\",
    "\x00",
    "手表\x00耳机",
    "😀🎁",
    " ",
    "",
    "a" * 5000,
    "手表 " * 2000,
    "ＡＮＤ",
    "\u202e\u200d",
    "%_",
    "'; DROP TABLE products; --",
]


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_queries_never_raise(store: EmbeddedBackend, catalog, query: str) -> None:
    products, vectors = catalog
    store.upsert(products[:30], vectors[:30])
    for f in (None, Filters(in_stock=True), Filters(brand=["Casio"], category="手表")):
        hits = store.bm25(query, f, 10)
        assert all(c.bm25 is not None for c in hits)
    assert store.count() == 30


def test_hostile_filter_values_are_data(store: EmbeddedBackend) -> None:
    store.upsert([Product(id="a'b", title="手表", brand='"); DROP', category=["x]y"])], None)
    f = Filters(brand=['"); DROP'], category=["x]y"], ids=["a'b"])
    assert [c.id for c in store.bm25("手表", f, 5)] == ["a'b"]
    assert store.bm25("手表", Filters(brand=[]), 5) == []


def test_bigrams_recall_what_word_segmentation_misses(tmp_path: Path) -> None:
    catalog = [
        Product(id="enamel", title="小众设计师珐琅手表"),
        Product(id="plate", title="景泰蓝珐琅彩瓷盘"),
        Product(id="dress", title="法式复古连衣裙"),
        Product(id="casio", title="卡西欧运动电子表"),
        Product(id="band", title="华为智能运动手环"),
    ]
    with EmbeddedBackend(tmp_path / "both") as store:
        store.upsert(catalog, None)
        assert store.bm25("珐琅表", None, 3)[0].id == "enamel"
        # jieba cuts the title into 小/众/设计师… but the query into 小众/小众表: only bigrams meet
        assert store.bm25("小众表", None, 3)[0].id == "enamel"
    with EmbeddedBackend(tmp_path / "words", field_boosts={"words_title": 2.0, "words_body": 1.0}) as words_only:
        words_only.upsert(catalog, None)
        assert "enamel" not in {c.id for c in words_only.bm25("小众表", None, 5)}


def test_concurrent_reads_during_writes(tmp_path: Path, catalog) -> None:
    products, vectors = catalog
    errors: list[BaseException] = []
    with EmbeddedBackend(tmp_path) as store:
        store.upsert(products[:100], vectors[:100])
        stop = threading.Event()

        def read(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                while not stop.is_set():
                    for c in store.knn(unit(rng, 1)[0], Filters(in_stock=True), 5):
                        assert c.product is not None and c.product.in_stock
                    store.bm25(str(rng.choice(WORDS)), None, 5)
                    store.get(["p1", "p150"])
            except BaseException as exc:
                errors.append(exc)

        readers = [threading.Thread(target=read, args=(s,)) for s in range(3)]
        for t in readers:
            t.start()
        try:
            for start in range(100, len(products), 20):
                store.upsert(products[start : start + 20], vectors[start : start + 20])
                store.update_signals([SignalUpdate(id=f"p{start}", sales=start)])
                store.delete([f"p{start - 50}"])
        finally:
            stop.set()
            for t in readers:
                t.join()
        assert not errors, errors
        assert store.count() == len(products) - 7


@pytest.mark.parametrize("prefix", ["words", "cjk"])
def test_bm25_with_a_single_analysis(tmp_path, prefix):
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.products import Product
    from middleware.text import LEXICAL_FIELDS

    boosts = {name: 1.0 for name in LEXICAL_FIELDS if name.startswith(prefix)}
    store = EmbeddedBackend(tmp_path, field_boosts=boosts)
    store.upsert(
        [
            Product(id="a", title="小众设计师珐琅手表"),
            Product(id="b", title="卡西欧运动手表"),
            Product(id="c", title="项链"),
        ],
        None,
    )
    hits = store.bm25("珐琅手表", None, 10)
    assert [h.id for h in hits][:2] == ["a", "b"] and all(h.bm25 > 0 for h in hits)
    store.close()


# ---------------------------------------------------------------------------------------- embedder binding


def test_fresh_store_is_unbound_and_its_stats_say_so(store: EmbeddedBackend) -> None:
    stats = store.stats()
    assert store.embedder_binding() is None
    assert (stats.backend, stats.products, stats.vectors, stats.dim, stats.embedder) == ("embedded", 0, 0, None, None)
    assert stats.generation == 0 and stats.size_bytes > 0


def test_binding_is_recorded_and_survives_reopening(tmp_path: Path) -> None:
    binding = EmbedderBinding("bge-small-zh-v1.5", DIM)
    with EmbeddedBackend(tmp_path) as store:
        store.bind_embedder(binding)
        store.bind_embedder(binding)  # the same binding again: nothing to do
        assert store.embedder_binding() == binding and store.stats().dim == DIM
        store.upsert([Product(id="a", title="手表")], unit(np.random.default_rng(0), 1))
    with EmbeddedBackend(tmp_path) as store:
        assert store.embedder_binding() == binding and store.stats().embedder == binding


def test_another_embedder_on_a_store_with_products_is_refused(store: EmbeddedBackend) -> None:
    store.bind_embedder(EmbedderBinding("model-a", DIM))
    store.upsert([Product(id="a", title="手表")], unit(np.random.default_rng(0), 1))
    for other in (EmbedderBinding("model-b", DIM), EmbedderBinding("model-a", DIM * 2), EmbedderBinding("none", None)):
        with pytest.raises(EmbedderMismatch, match="model-a") as err:
            store.bind_embedder(other)
        assert "new data directory" in str(err.value) and (other.model in str(err.value) or "lexical" in str(err.value))
    assert store.embedder_binding() == EmbedderBinding("model-a", DIM)
    assert isinstance(EmbedderMismatch("x", "y", "z", "w"), BackendError)


def test_an_emptied_store_can_be_rebound_to_another_dimension(store: EmbeddedBackend) -> None:
    store.bind_embedder(EmbedderBinding("model-a", DIM))
    store.upsert([Product(id="a", title="手表")], unit(np.random.default_rng(0), 1))
    store.delete(["a"])
    store.bind_embedder(EmbedderBinding("model-b", 8))
    assert store.embedder_binding() == EmbedderBinding("model-b", 8)
    with pytest.raises(ValueError, match="8-d"):
        store.upsert([Product(id="b", title="耳机")], unit(np.random.default_rng(1), 1))
    vector = unit(np.random.default_rng(2), 1, dim=8)
    store.upsert([Product(id="b", title="耳机")], vector)
    assert [c.id for c in store.knn(vector[0], None, 5)] == ["b"] and store.stats().dim == 8


def test_a_lexical_only_store_refuses_vectors(store: EmbeddedBackend) -> None:
    store.bind_embedder(EmbedderBinding("none", None))
    store.upsert([Product(id="a", title="手表")], None)
    with pytest.raises(EmbedderMismatch, match="no embedder"):
        store.upsert([Product(id="b", title="耳机")], unit(np.random.default_rng(0), 1))
    assert store.count() == 1 and store.stats().vectors == 0 and store.stats().dim is None


def test_a_store_indexed_before_bindings_adopts_one_of_its_dimension(store: EmbeddedBackend) -> None:
    store.upsert([Product(id="a", title="手表")], unit(np.random.default_rng(0), 1))
    assert store.embedder_binding() is None
    with pytest.raises(EmbedderMismatch, match=f"{DIM}-d vectors"):
        store.bind_embedder(EmbedderBinding("model-b", DIM + 1))
    store.bind_embedder(EmbedderBinding("model-a", DIM))
    assert store.embedder_binding() == EmbedderBinding("model-a", DIM)


@pytest.mark.parametrize(
    ("model", "dim"), [("", 4), ("m", 0), ("m", -1), ("m", True), ("m", 4.0), ("m", None), ("none", 4)]
)
def test_a_malformed_binding_is_a_clear_error(model: str, dim: object) -> None:
    with pytest.raises(ValueError, match="embedder binding"):
        EmbedderBinding(model, dim)  # type: ignore[arg-type]


def test_cli_stats_of_a_fresh_and_a_bound_store(tmp_path: Path, monkeypatch, capsys) -> None:
    """`shopsearch stats` shows no "0 × None-d" on a fresh store, and the recorded embedder once bound."""
    from middleware.cli import main

    for key in [k for k in os.environ if k.startswith("SHOPSEARCH_")]:
        monkeypatch.delenv(key)
    data_dir = tmp_path / "store"
    EmbeddedBackend(data_dir).close()
    assert main(["--data-dir", str(data_dir), "stats"]) == 0
    out = capsys.readouterr().out
    assert "None" not in out and "vectors      0\n" in out and "embedder     -\n" in out
    with EmbeddedBackend(data_dir) as store:
        store.bind_embedder(EmbedderBinding("model-a", DIM))
        store.upsert([Product(id="a", title="手表")], unit(np.random.default_rng(0), 1))
    assert main(["--data-dir", str(data_dir), "stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["products"], stats["vectors"], stats["dim"], stats["embedder"]) == (1, 1, DIM, "model-a")
    assert stats["bytes_on_disk"] > 0 and stats["backend_stats"]["embedder"] == {"model": "model-a", "dim": DIM}


# ---------------------------------------------------------------------------------------- seams


class _ArraySource:
    """Vectors held in plain arrays: the vector index needs no SQL, only (pks, vectors, generation)."""

    def __init__(self, pks: np.ndarray, vectors: np.ndarray, generation: int) -> None:
        self.pks, self.vectors, self.generation = pks, vectors, generation
        self.snapshots = 0

    @contextlib.contextmanager
    def snapshot(self):
        self.snapshots += 1
        batches = [(self.pks[i : i + 7], self.vectors[i : i + 7]) for i in range(0, len(self.pks), 7)]
        yield self.generation, len(self.pks), batches


@pytest.mark.parametrize("hnsw_threshold", [10_000, 10])
def test_vector_index_is_fed_pks_vectors_and_generation(tmp_path: Path, hnsw_threshold: int) -> None:
    rng = np.random.default_rng(5)
    source = _ArraySource(np.arange(1, 31, dtype=np.int64) * 3, unit(rng, 30), generation=4)
    index = VectorIndex(tmp_path / "v.faiss", source.snapshot, hnsw_threshold=hnsw_threshold, exact_max=5)
    index.open(4, 30, DIM, lambda: set(source.pks.tolist()))
    assert (index.generation, index.ntotal, index.kind) == (4, 30, "flat" if hnsw_threshold > 30 else "hnsw")
    query = source.vectors[7:8]  # pk 24's own vector
    scores = source.vectors @ query[0]
    brute = [int(source.pks[i]) for i in np.argsort(-scores, kind="stable")]
    allowed = source.pks[::2]
    with index.lock.read():
        assert [pk for pk, _ in index.search(query, None, 3)] == brute[:3]
        filtered = index.search(query, allowed, 4)  # HNSW: a subset this small is searched exactly
    assert [pk for pk, _ in filtered] == [pk for pk in brute if pk in set(allowed.tolist())][:4]
    # one committed write: pk 24 replaced by pk 100
    with index.lock.write():
        index.apply([24], [100], query.copy(), generation=5)
    with index.lock.read():
        assert index.search(query, None, 1)[0][0] == 100 and index.generation == 5
    # a write that skipped a generation (another process) rebuilds from the source
    source.generation, before = 9, source.snapshots
    with index.lock.write():
        index.apply([], [101], query.copy(), generation=7)
    assert source.snapshots == before + 1 and index.generation == 9
    # saved stamped with its generation: a store at another generation is not served from the file
    index.save()
    reopened = VectorIndex(tmp_path / "v.faiss", source.snapshot, hnsw_threshold=hnsw_threshold)
    reopened.open(9, 30, DIM, lambda: set(source.pks.tolist()))
    assert reopened.unsaved == 0 and reopened.ntotal == 30
    stale = VectorIndex(tmp_path / "v.faiss", source.snapshot, hnsw_threshold=hnsw_threshold)
    source.generation, before = 10, source.snapshots
    stale.open(10, 30, DIM, lambda: set(source.pks.tolist()))
    assert stale.generation == 10 and source.snapshots == before + 1


def test_lexical_index_keeps_in_step_with_the_store(store: EmbeddedBackend) -> None:
    products = [Product(id=str(i), title=t) for i, t in enumerate(["珐琅手表", "运动手表", "蓝牙耳机"])]
    store.upsert(products, None)
    store.upsert([Product(id="1", title="机械手表 手表")], None)  # replaced: a new pk, the old text removed
    store.delete(["2"])
    assert store.lexical.match_query("   ", None) is None
    query = store.lexical.match_query("手表", None)
    assert query is not None
    assert store.lexical.num_docs() == store.count() == 2
    hits = store.lexical.search(query, 10)
    assert [score for _, score in hits] == sorted((score for _, score in hits), reverse=True)
    with store.store.reader() as conn:
        ids = {pk: p.id for pk, p in store.store.products_by_pk(conn, [pk for pk, _ in hits]).items()}
    assert sorted(ids.values()) == ["0", "1"] and all(score > 0 for _, score in hits)
    only = store.lexical.match_query("手表", Filters(ids=["0"]))
    assert [ids[pk] for pk, _ in store.lexical.search(only, 10)] == ["0"]


def test_reopening_a_bound_store_without_vectors_for_another_embedder(tmp_path: Path) -> None:
    """A first run that bound the store but wrote nothing does not lock the next run's dimension."""
    with EmbeddedBackend(tmp_path, dim=DIM) as store:
        store.bind_embedder(EmbedderBinding("model-a", DIM))
    with EmbeddedBackend(tmp_path, dim=8) as store:
        store.bind_embedder(EmbedderBinding("model-b", 8))
        store.upsert([Product(id="a", title="手表")], unit(np.random.default_rng(0), 1, dim=8))
        assert store.stats().dim == 8 and store.embedder_binding() == EmbedderBinding("model-b", 8)
    with pytest.raises(ValueError, match="holds 8-d vectors but 16-d were asked for"):
        EmbeddedBackend(tmp_path, dim=DIM)
