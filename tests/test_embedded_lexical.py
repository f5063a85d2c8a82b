"""The embedded store's lexical index (tantivy, derived from SQLite): catching up, rebuilding,
upgrading FTS5-era stores, one writer across processes, and query text that is never syntax."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from middleware.backends.embedded import DB_NAME, EmbeddedBackend
from middleware.backends.embedded.lexical import INDEX_DIR, STAMP_NAME
from middleware.products import Filters, Product, SignalUpdate

REPO = Path(__file__).resolve().parents[1]


def catalog(n: int = 30) -> list[Product]:
    kinds = ["手表", "耳机", "running shoes", "口红", "连衣裙"]
    return [
        Product(id=f"p{i}", title=f"{kinds[i % 5]} 款式{i}", price=10.0 + i, stock=i % 3, brand=f"b{i % 4}")
        for i in range(n)
    ]


def ids(store: EmbeddedBackend, query: str, filters: Filters | None = None) -> list[str]:
    return sorted(c.id for c in store.bm25(query, filters, 100))


def test_a_stale_index_catches_up_from_the_change_log_on_open(tmp_path: Path) -> None:
    with EmbeddedBackend(tmp_path) as store:
        store.upsert(catalog(), None)
        stamp = json.loads((tmp_path / INDEX_DIR / STAMP_NAME).read_text())
    # what a kill between SQLite's commit and tantivy's leaves: SQLite ahead of the index's stamp
    db = sqlite3.connect(tmp_path / DB_NAME)
    generation = int(db.execute("SELECT value FROM meta WHERE key = 'lexical_generation'").fetchone()[0])
    db.close()
    with EmbeddedBackend(tmp_path) as store:
        store.upsert([Product(id="new", title="珐琅手表 新款")], None)
        store.delete(["p0"])
        store.update_signals([SignalUpdate(id="p5", stock=0)])
        after = store.store.meta_int("lexical_generation")
    (tmp_path / INDEX_DIR / STAMP_NAME).write_text(json.dumps({**stamp, "generation": generation}))
    with EmbeddedBackend(tmp_path) as store:
        assert store.lexical.generation == after
        watches = ids(store, "手表")
        assert "new" in watches and "p0" not in watches and len(watches) == len(set(watches))
        assert "p5" not in ids(store, "手表", Filters(in_stock=True))
        assert store.lexical.num_docs() == store.count()


@pytest.mark.parametrize("damage", ["stamp", "directory", "garbage"])
def test_a_missing_or_broken_index_is_rebuilt_from_sqlite(tmp_path: Path, damage: str) -> None:
    with EmbeddedBackend(tmp_path) as store:
        store.upsert(catalog(), None)
        before = {q: ids(store, q) for q in ("手表", "running", "口红")}
    index_dir = tmp_path / INDEX_DIR
    if damage == "stamp":
        (index_dir / STAMP_NAME).unlink()
    elif damage == "directory":
        for path in index_dir.iterdir():
            path.unlink()
    else:
        for path in index_dir.iterdir():
            if path.name.endswith(".json") and path.name != STAMP_NAME:
                path.write_text("{not json")
    with EmbeddedBackend(tmp_path) as store:
        assert {q: ids(store, q) for q in before} == before
        assert store.lexical.num_docs() == store.count() == 30


def test_an_fts5_era_store_is_upgraded_on_open(tmp_path: Path) -> None:
    with EmbeddedBackend(tmp_path) as store:
        store.upsert(catalog(), None)
    # the layout earlier versions wrote: tokens in product_text's columns, two FTS5 tables over it
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript(
        """
        DROP TABLE product_text; DROP TABLE lexical_changes; DELETE FROM meta WHERE key = 'lexical_generation';
        CREATE TABLE product_text (pk INTEGER PRIMARY KEY, words_title TEXT NOT NULL, words_body TEXT NOT NULL,
                                   cjk_title TEXT NOT NULL, cjk_body TEXT NOT NULL);
        CREATE VIRTUAL TABLE fts_words USING fts5 (words_title, words_body, content='product_text', content_rowid='pk');
        CREATE VIRTUAL TABLE fts_cjk USING fts5 (cjk_title, cjk_body, content='product_text', content_rowid='pk');
        INSERT INTO product_text SELECT pk, 'x', '', 'x', '' FROM products;
        """
    )
    db.commit()
    db.close()
    for path in (tmp_path / INDEX_DIR).iterdir():
        path.unlink()
    (tmp_path / INDEX_DIR).rmdir()
    with EmbeddedBackend(tmp_path) as store:
        assert len(ids(store, "手表")) == 6 and ids(store, "x") == []
        assert store.lexical.num_docs() == store.count() == 30
    db = sqlite3.connect(tmp_path / DB_NAME)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    assert not tables & {"fts_words", "fts_cjk"}


def test_another_analysis_version_rebuilds_with_fresh_tokens(tmp_path: Path, monkeypatch) -> None:
    import middleware.text as text

    with EmbeddedBackend(tmp_path) as store:
        store.upsert(catalog(), None)
        before = ids(store, "手表")
    monkeypatch.setattr(text, "ANALYSIS_VERSION", text.ANALYSIS_VERSION + 100)
    with EmbeddedBackend(tmp_path) as store:
        assert ids(store, "手表") == before
        assert store.stats().details["lexical"]["analysis_version"] == text.ANALYSIS_VERSION
    db = sqlite3.connect(tmp_path / DB_NAME)
    versions = {r[0] for r in db.execute("SELECT DISTINCT analysis FROM product_text")}
    db.close()
    assert versions == {text.ANALYSIS_VERSION}


def test_products_without_token_rows_are_analysed_on_open(tmp_path: Path) -> None:
    with EmbeddedBackend(tmp_path) as store:
        store.upsert(catalog(), None)
        before = ids(store, "手表")
    db = sqlite3.connect(tmp_path / DB_NAME)
    with db:
        db.execute("DELETE FROM product_text WHERE pk IN (SELECT pk FROM products WHERE id IN ('p0', 'p5', 'p7'))")
    db.close()
    with EmbeddedBackend(tmp_path) as store:
        assert ids(store, "手表") == before
        assert store.lexical.num_docs() == store.count() == 30
    db = sqlite3.connect(tmp_path / DB_NAME)
    missing = db.execute("SELECT count(*) FROM products WHERE pk NOT IN (SELECT pk FROM product_text)").fetchone()
    db.close()
    assert missing == (0,)


@pytest.mark.parametrize(
    "query",
    ["title:手表 AND NOT", "*", "手表~2", '"unclosed', "(a OR b", "+running -shoes", "brand:b1", "[1 TO 5]", "\\"],
)
def test_query_syntax_in_user_text_is_only_text(tmp_path: Path, query: str) -> None:
    with EmbeddedBackend(tmp_path) as store:
        store.upsert(catalog(), None)
        store.upsert([Product(id="literal", title="brand title not and or to")], None)
        hits = store.bm25(query, None, 100)
        if "手表" in query:
            assert {c.id for c in hits} >= set(ids(store, "手表"))
        if query == "brand:b1":
            assert "literal" in {c.id for c in hits}  # the word "brand", never a field


WRITER = textwrap.dedent(
    """
    import sys
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.products import Product
    store = EmbeddedBackend(sys.argv[1])
    owner = store.lexical.owns_writer
    store.upsert([Product(id="from-child", title="珐琅手表 子进程")], None)
    print(owner, flush=True)
    store.close()
    """
)


def test_a_write_in_another_process_is_searchable_here_within_a_second(tmp_path: Path) -> None:
    with EmbeddedBackend(tmp_path) as store:
        store.upsert(catalog(), None)
        assert store.lexical.owns_writer
        done = subprocess.run(
            [sys.executable, "-c", WRITER, str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "False"  # this process holds the writer: the child only wrote SQLite
        written = time.monotonic()
        while "from-child" not in ids(store, "珐琅"):
            assert time.monotonic() - written < 1.0, "the other process's write did not show up within 1 s"
            time.sleep(0.01)


def test_the_writer_is_taken_over_when_its_owner_closes(tmp_path: Path) -> None:
    first = EmbeddedBackend(tmp_path)
    second = EmbeddedBackend(tmp_path)
    try:
        assert first.lexical.owns_writer and not second.lexical.owns_writer
        second.upsert([Product(id="a", title="蓝牙耳机")], None)  # applied by the owner, then visible here
        written = time.monotonic()
        while ids(second, "耳机") != ["a"]:
            assert time.monotonic() - written < 1.0, "the owner did not apply another writer's change within 1 s"
            time.sleep(0.01)
        assert ids(first, "耳机") == ["a"]
        first.close()
        second.upsert([Product(id="b", title="降噪耳机")], None)
        assert second.lexical.owns_writer
        assert ids(second, "耳机") == ["a", "b"]
    finally:
        first.close()
        second.close()


def test_parallel_analysis_gives_the_tokens_of_in_process_analysis(tmp_path: Path) -> None:
    from middleware.backends.embedded.lexical import ParallelAnalysis, tokens_json

    products = [*catalog(300), Product(id="x", title="Apple iPhone15 手机壳", description="送女友 <b>礼物</b>")]
    pool = ParallelAnalysis(2, min_batch=10)
    try:
        assert pool.tokens(products) == [tokens_json(p) for p in products]
        assert pool.tokens(products[:5]) == [tokens_json(p) for p in products[:5]]  # small: in process
        assert pool.workers == 2
    finally:
        pool.close()
    with EmbeddedBackend(tmp_path, analysis_workers=2) as store:
        store.upsert(products, None)
        assert ids(store, "iphone") == ["x"] and len(store.bm25("款式", None, 1000)) == 300


def test_search_results_carry_the_stored_product_after_any_process_changes_it(tmp_path: Path) -> None:
    """Parsed products are cached per process; a write anywhere (signals included) is seen at once."""
    first, second = EmbeddedBackend(tmp_path), EmbeddedBackend(tmp_path)
    try:
        first.upsert(catalog(10), None)
        before = {c.id: c.product.price for c in first.bm25("手表", None, 10)}
        assert before == {"p0": 10.0, "p5": 15.0}
        second.update_signals([SignalUpdate(id="p0", price=99.0)])  # another store instance: its own cache
        assert {c.id: c.product.price for c in first.bm25("手表", None, 10)}["p0"] == 99.0
        first.update_signals([SignalUpdate(id="p5", stock=0, price=1.0)])
        hit = {c.id: c.product for c in first.bm25("手表", None, 10)}["p5"]
        assert (hit.price, hit.stock) == (1.0, 0)
    finally:
        first.close()
        second.close()


def test_a_bulk_load_is_published_in_one_commit_and_searchable_when_it_ends(tmp_path: Path) -> None:
    products = catalog(60)
    with EmbeddedBackend(tmp_path / "small-commits") as store:
        for start in range(0, 60, 10):  # a search commits this process's writes first: a segment each
            store.upsert(products[start : start + 10], None)
            assert len(ids(store, "手表")) == len({p.id for p in products[: start + 10] if "手表" in p.title})
        assert store.lexical.details()["segments"] == 6
    with EmbeddedBackend(tmp_path / "bulk") as store:
        with store.bulk_load():
            for start in range(0, 60, 10):
                store.upsert(products[start : start + 10], None)
                ids(store, "手表")  # searching during the load does not commit it piecemeal
        watches = ids(store, "手表")
        assert watches == sorted(p.id for p in products if "手表" in p.title)
        assert store.lexical.details()["segments"] == 1
        assert store.lexical.num_docs() == store.count() == 60


def test_a_store_killed_during_a_bulk_load_catches_up_on_open(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from middleware.backends.embedded import EmbeddedBackend
        from middleware.products import Product
        store = EmbeddedBackend({str(tmp_path)!r})
        with store.bulk_load():
            store.upsert([Product(id=f"b{{i}}", title=f"珐琅手表 {{i}}") for i in range(40)], None)
            os._exit(9)  # no commit, no close: what SIGKILL leaves
        """
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 9
    with EmbeddedBackend(tmp_path) as store:
        assert store.count() == 40
        assert ids(store, "手表") == sorted(f"b{i}" for i in range(40))
