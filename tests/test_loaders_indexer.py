"""The one write path: `Indexer` rules hold for file rows, API bodies and fresh indexes alike."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loaders.embed_cache import EmbeddingCache
from loaders.indexer import Indexer
from loaders.report import Summary
from loaders.sources import read_rows
from loaders.validate import DeadLetters
from middleware.backends.base import EmbedderBinding, EmbedderMismatch
from middleware.backends.embedded import EmbeddedBackend
from middleware.products import MAX_DESCRIPTION_CHARS, Product
from tests.test_loaders_pipeline import CountingEmbedder, catalog, write_jsonl
from tests.test_server_support import make_app, server_models

__all__ = ["server_models"]  # a fixture, imported for pytest


@pytest.fixture
def embedder(server_models: Any) -> CountingEmbedder:
    return CountingEmbedder(server_models[0])


def test_upsert_of_validated_products_skips_unchanged_and_binds_the_store(
    tmp_path: Path, embedder: CountingEmbedder
) -> None:
    products = [Product.model_validate(r) for r in catalog(4)]
    with EmbeddedBackend(tmp_path / "s") as store:
        indexer = Indexer(embedder)
        first = indexer.upsert(products, store)
        assert (first.indexed, first.embedded) == (4, 4)
        assert store.embedder_binding() == EmbedderBinding(embedder.model_id, embedder.dim)
        again = indexer.upsert([*products, products[0]], store)  # a repeated id: the last one wins
        assert (again.unchanged, again.duplicates, again.embedded) == (4, 1, 0)
        cheaper = products[1].model_copy(update={"price": 1.0})
        signals = indexer.upsert([cheaper], store)
        assert (signals.updated, signals.embedded) == (1, 0)  # price only: no re-embedding
        assert store.get([cheaper.id])[0].price == 1.0
        assert embedder.calls == 1
        with pytest.raises(EmbedderMismatch, match="cannot be mixed"):
            Indexer(None).upsert(products, store)  # vectors of one model, a lexical-only writer


def test_filling_a_fresh_index_uses_the_cache_and_dead_letters(tmp_path: Path, embedder: CountingEmbedder) -> None:
    rows = [*catalog(5), {"id": "bad", "title": ""}, {"id": "p9", "title": "长", "description": "x" * 20_000}]
    source = write_jsonl(tmp_path / "c.jsonl", rows)
    cache = EmbeddingCache(tmp_path / "cache.sqlite", embedder.model_id, embedder.dim)
    try:
        indexer = Indexer(embedder, cache=cache, batch_size=4)
        for attempt in range(2):
            dead = DeadLetters(tmp_path / f"dead-{attempt}.jsonl")
            summary = Summary(command="reindex")
            with EmbeddedBackend(tmp_path / f"fresh-{attempt}") as target:  # only its upsert is used
                indexer.fill(read_rows(str(source), "jsonl"), target, dead_letters=dead, summary=summary)
                dead.close()
                assert sorted(target.iter_ids()) == ["p0", "p1", "p2", "p3", "p4", "p9"]
                assert target.stats().vectors == 6 and target.stats().dim == embedder.dim
                assert len(target.get(["p9"])[0].description or "") <= MAX_DESCRIPTION_CHARS
            assert (summary.rejected, summary.truncated, dead.count) == (1, 1, 1)
            # the second build reads every vector from the cache
            assert (summary.embedded, summary.cache_hits) == ((6, 0) if attempt == 0 else (0, 6))
    finally:
        cache.close()


def test_post_products_writes_through_the_indexer(tmp_path: Path, server_models: Any) -> None:
    embedder, reranker = server_models
    with EmbeddedBackend(tmp_path / "s") as store:
        store.bind_embedder(EmbedderBinding("some-other-model", embedder.dim))
        old = Product(id="old", title="旧款 键盘")
        store.upsert([old], embedder.encode_documents([old.embedding_text()]))  # as if that model made it
        app = make_app(store, embedder, reranker, enable_writes=True)
        with TestClient(app) as c:
            new = {"id": "a/b?c#d", "title": "全新 机械键盘", "description": "长" * 50_000}
            r = c.post("/v1/products", json={"products": [new]})
            # the store is bound to another embedder: refused by the same rule as the loader
            assert r.status_code == 409 and "cannot be mixed" in r.json()["message"]
            assert store.count() == 1
    with EmbeddedBackend(tmp_path / "t") as store:
        app = make_app(store, embedder, reranker, enable_writes=True)
        with TestClient(app) as c:
            assert c.post("/v1/products", json={"products": [new]}).json() == {"upserted": 1}
        stored = store.get(["a/b?c#d"])[0]
        assert len(stored.description or "") == MAX_DESCRIPTION_CHARS  # the same text bound as a file row
        assert store.embedder_binding() == EmbedderBinding(embedder.model_id, embedder.dim)


def test_a_loaded_catalog_is_searchable_from_one_lexical_commit(tmp_path: Path) -> None:
    rows = write_jsonl(tmp_path / "catalog.jsonl", catalog(60))

    def slow_source() -> Any:  # pauses between batches longer than the lexical index's idle commit
        for row in read_rows(str(rows), "jsonl"):
            if row.line % 10 == 1:
                time.sleep(0.4)
            yield row

    with EmbeddedBackend(tmp_path / "s", dim=None) as store:
        summary = Indexer(None, batch_size=10).index(
            slow_source(), store, dead_letters=DeadLetters(tmp_path / "dead.jsonl")
        )
        assert summary.indexed == 60
        assert store.lexical.details()["segments"] == 1  # six batches, published once
        assert len(store.bm25("手表", None, 200)) == 60
