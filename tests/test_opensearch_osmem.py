"""OpenSearch backend against osmem-server (in-memory, OpenSearch-compatible; no k-NN, no pipelines).

The suite classes are reused by tests/test_opensearch_cluster.py against a real cluster, where the
k-NN and hybrid tests run instead of skipping. One osmem process per session (the plugin's
`osmem_server`); each test gets its own clone, so tests never see each other's indexes.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import numpy as np
import opensearchpy
import pytest

from middleware.backends import opensearch_admin as admin
from middleware.backends import opensearch_bodies as bodies
from middleware.backends.base import Backend, BackendError, EmbedderBinding, EmbedderMismatch
from middleware.backends.opensearch import OpenSearchBackend
from middleware.config import Settings
from middleware.products import Filters, Product, SignalUpdate
from tests.support.stores import opensearch_settings

DIM = 4
BRANDS = ["Acme", "Zeta", "Omega"]
CATEGORIES = [["连衣裙"], ["衬衫"], ["连衣裙", "夏装"]]


def catalog(n: int = 12) -> list[Product]:
    return [
        Product(
            id=f"p{i}",
            title=f"{['红色', '蓝色', '白色'][i % 3]}连衣裙 款{i}" if i % 2 == 0 else f"纯棉衬衫 款{i}",
            description="夏季 轻薄 面料" if i % 4 == 0 else None,
            brand=BRANDS[i % 3],
            category=CATEGORIES[i % 3],
            price=10.0 * (i + 1),
            sales=i * 7,
            stock=[0, 5, None][i % 3],
        )
        for i in range(n)
    ]


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Target:
    """Where the suite runs: osmem here, a real cluster in test_opensearch_cluster.py."""

    knn_skip_reason: str | None = "osmem-server has no k-NN: `[knn] query is not supported by osmem`"
    pipeline_skip_reason: str | None = (
        "osmem-server has no search pipelines / hybrid query (PUT _search/pipeline: no handler)"
    )


@pytest.fixture
def target() -> type[Target]:
    return Target


@pytest.fixture
def os_url(osmem_clone) -> str:
    return osmem_clone.url


@pytest.fixture
def settings(os_url: str) -> Settings:
    return opensearch_settings(os_url)


@pytest.fixture
def backend(settings: Settings) -> Iterator[OpenSearchBackend]:
    b = OpenSearchBackend.from_settings(settings, dim=DIM)
    yield b
    b.close()


@pytest.fixture
def loaded(backend: OpenSearchBackend) -> tuple[OpenSearchBackend, list[Product], np.ndarray]:
    products = catalog()
    vectors = unit_vectors(len(products))
    backend.upsert(products, vectors)
    return backend, products, vectors


class TestSetup:
    def test_backend_protocol(self, backend: OpenSearchBackend) -> None:
        assert isinstance(backend, Backend)

    def test_install_is_idempotent_and_templates_apply(self, backend: OpenSearchBackend) -> None:
        first = admin.install(backend)
        second = admin.install(backend)
        assert [t for s, t in first.lines if s == "OK"] == [t for s, t in second.lines if s == "OK"]
        names = bodies.component_template_names(backend.cfg, with_vector=True)
        for name in names:
            got = backend.client.cluster.get_component_template(name=name)["component_templates"][0]
            assert got["component_template"]["_meta"]["owner"] == "shopsearch"
        # an index created WITHOUT a body still gets the product mapping from the index template
        backend.client.indices.create(index=bodies.index_name(backend.cfg, 99))
        mapping = backend.client.indices.get_mapping(index=bodies.index_name(backend.cfg, 99))
        props = next(iter(mapping.values()))["mappings"]["properties"]
        assert props["title"]["fields"]["cjk"]["analyzer"] == "cjk"
        assert props["vector"]["type"] == "knn_vector" and props["vector"]["dimension"] == DIM

    def test_first_write_creates_knn_index_behind_aliases(self, loaded) -> None:
        backend, products, _ = loaded
        assert backend.stats().details["indexes"] == [bodies.index_name(backend.cfg, 1)]
        mapping = backend.client.indices.get_mapping(index=backend.read_alias)
        vector = next(iter(mapping.values()))["mappings"]["properties"]["vector"]
        assert vector["dimension"] == DIM
        assert vector["method"]["engine"] == backend.cfg.knn_engine and vector["space_type"] == "innerproduct"
        stats = backend.stats()
        assert stats.products == len(products) and stats.dim == DIM
        assert stats.vectors == len(products) and stats.size_bytes > 0

    def test_check_says_what_is_missing(self, backend: OpenSearchBackend, target) -> None:
        report = admin.check(backend)
        text = report.render()
        assert "word analyzer:" in text
        if target.knn_skip_reason:
            assert not report.ok and "MISSING k-NN plugin (opensearch-knn)" in text
        assert f"alias {backend.read_alias} missing" in text

    def test_word_analyzer_not_installed_is_a_clear_error(self, os_url: str, target) -> None:
        b = OpenSearchBackend.from_settings(opensearch_settings(os_url, word_analyzer="ik_smart"), dim=DIM)
        if b.analyzer_available("ik_smart"):
            pytest.skip("this cluster has analysis-ik installed")
        with pytest.raises(BackendError, match="install the analysis-ik plugin"):
            b.ensure_index()


class TestWrites:
    def test_bulk_partial_failure_reports_items_and_keeps_good_ones(self, backend: OpenSearchBackend) -> None:
        backend.ensure_index()
        good = catalog(3)
        pairs = list(bodies.bulk_index_actions(backend.write_alias, good, unit_vectors(3), require_alias=True))
        pairs.insert(
            1,
            (
                {"index": {"_index": backend.write_alias, "_id": "bad-price"}},
                {"id": "bad-price", "title": "x", "price": "cheap"},
            ),
        )
        pairs.append(
            (
                {"index": {"_index": backend.write_alias, "_id": "bad-field"}},
                {"id": "bad-field", "title": "x", "titel": "typo"},
            )
        )
        report = backend.write_bulk(pairs)
        assert report.ok == 3
        failed = dict(report.errors)
        assert set(failed) == {"bad-price", "bad-field"}
        assert "price" in failed["bad-price"] and "titel" in failed["bad-field"]
        assert backend.count() == 3 and [p.id for p in backend.get(["p0", "p1", "p2"])] == ["p0", "p1", "p2"]

    def test_upsert_names_rejected_ids(self, backend: OpenSearchBackend) -> None:
        backend.ensure_index()
        pairs = list(bodies.bulk_index_actions(backend.write_alias, catalog(2), None, require_alias=True))
        pairs.append(
            ({"index": {"_index": backend.write_alias, "_id": "v"}}, {"id": "v", "title": "x", "vector": [1.0]})
        )
        report = backend.write_bulk(pairs)
        assert report.ok == 2 and [i for i, _ in report.errors] == ["v"]
        with pytest.raises(ValueError, match="dimension 3"):
            backend.upsert(catalog(1), np.ones((1, 3), dtype=np.float32))

    def test_partial_signal_updates(self, loaded) -> None:
        backend, products, _ = loaded
        before = backend.content_hashes(["p1", "p2"])
        missing = backend.update_signals(
            [
                SignalUpdate(id="p1", price=1.5, stock=0),
                SignalUpdate(id="p2", sales=999),
                SignalUpdate(id="nope", sales=1),
            ]
        )
        assert missing == ["nope"]
        p1, p2 = backend.get(["p1", "p2"])
        assert (p1.price, p1.stock, p1.sales) == (1.5, 0, products[1].sales)
        assert (p2.sales, p2.price, p2.title) == (999, products[2].price, products[2].title)
        assert backend.content_hashes(["p1", "p2"]) == before  # text untouched: no re-embedding needed
        assert backend.stats().vectors == len(products)  # vectors untouched

    def test_delete_and_get_order(self, loaded) -> None:
        backend, products, _ = loaded
        assert [p.id for p in backend.get(["p3", "zzz", "p0"])] == ["p3", "p0"]
        assert backend.delete(["p3", "zzz"]) == 1
        assert backend.count() == len(products) - 1 and backend.get(["p3"]) == []

    def test_upsert_replaces_by_id(self, loaded) -> None:
        backend, products, vectors = loaded
        changed = products[0].model_copy(update={"title": "全新标题 风衣"})
        backend.upsert([changed], vectors[:1])
        assert backend.count() == len(products)
        assert backend.get(["p0"])[0].title == "全新标题 风衣"
        assert backend.bm25("风衣", None, 5)[0].id == "p0"


class TestReads:
    def test_bm25_filters_agree_with_reference_semantics(self, loaded) -> None:
        backend, products, _ = loaded
        filter_sets = [
            None,
            Filters(brand="Acme"),
            Filters(category="连衣裙"),
            Filters(category=["夏装", "衬衫"], in_stock=True),
            Filters(price_min=30, price_max=90),
            Filters(in_stock=True),
            Filters(ids=["p0", "p2", "p4"], brand=["Acme", "Omega"]),
            Filters(exclude=[{"brand": "Acme"}]),
            Filters(category="连衣裙", exclude=[{"price_min": 30, "price_max": 90}, {"ids": ["p0"]}]),
            Filters(exclude={"in_stock": True}),  # only the out-of-stock ones
        ]
        for filters in filter_sets:
            for query in ("连衣裙", "衬衫", "款"):
                got = backend.bm25(query, filters, 50)
                allowed = {p.id for p in products if filters is None or filters.matches(p)}
                # any shared CJK character: what the standard analyzer (unigrams) matches
                overlap = {p.id for p in products if set(query) & set(p.title + p.search_text())}
                ids = {c.id for c in got}
                assert ids <= allowed & overlap, (query, filters)
                if backend.word_analyzer == "standard":
                    assert ids == allowed & overlap, (query, filters)
                assert [c.ranks["bm25"] for c in got] == list(range(1, len(got) + 1))
                scores = [c.bm25 for c in got]
                assert scores == sorted(scores, reverse=True)
                assert all(c.product is not None and c.product.id == c.id for c in got)

    def test_bm25_title_boost_and_cjk_bigrams(self, backend: OpenSearchBackend) -> None:
        backend.upsert(
            [
                Product(id="t", title="真丝围巾", description="礼盒"),
                Product(id="d", title="礼盒", description="真丝围巾 配件"),
                Product(id="x", title="棉袜"),
            ],
            None,
        )
        assert [c.id for c in backend.bm25("真丝围巾", None, 10)] == ["t", "d"]
        assert backend.bm25("   ", None, 10) == []

    def test_iter_ids_pages(self, loaded) -> None:
        backend, products, _ = loaded
        assert sorted(backend.iter_ids(page_size=5)) == sorted(p.id for p in products)
        assert len(list(backend.iter_ids(page_size=1))) == len(products)

    def test_content_hashes(self, loaded) -> None:
        backend, products, _ = loaded
        assert backend.content_hashes(["p0", "p5", "none"]) == {
            "p0": products[0].content_hash(),
            "p5": products[5].content_hash(),
        }

    def test_empty_store_reads(self, backend: OpenSearchBackend) -> None:
        assert backend.count() == 0 and backend.bm25("连衣裙", None, 5) == []
        assert list(backend.iter_ids()) == [] and backend.get(["a"]) == [] and backend.content_hashes(["a"]) == {}
        assert backend.update_signals([SignalUpdate(id="a", sales=1)]) == ["a"] and backend.delete(["a"]) == 0


class TestVectors:
    def test_knn_with_filters_inside(self, loaded, target) -> None:
        if target.knn_skip_reason:
            pytest.skip(target.knn_skip_reason)
        backend, products, vectors = loaded
        hits = backend.knn(vectors[4], None, 3)
        assert hits[0].id == "p4" and hits[0].ranks["knn"] == 1
        filters = Filters(brand="Zeta")
        filtered = backend.knn(vectors[4], filters, 20)
        assert filtered and all(filters.matches(c.product) for c in filtered)
        assert {c.id for c in filtered} == {p.id for p in products if filters.matches(p)}
        excluding = Filters(exclude=[{"brand": "Zeta"}, {"ids": ["p4"]}])  # must_not inside the knn filter
        kept = backend.knn(vectors[4], excluding, len(products))
        assert {c.id for c in kept} == {p.id for p in products if excluding.matches(p)} != set()

    def test_hybrid_through_pipeline(self, loaded, target) -> None:
        if target.pipeline_skip_reason:
            pytest.skip(target.pipeline_skip_reason)
        backend, _products, vectors = loaded
        admin.install(backend)
        hits = backend.hybrid("连衣裙", vectors[0], Filters(in_stock=True), 10)
        assert hits and all(c.fused is not None for c in hits)
        assert all(Filters(in_stock=True).matches(c.product) for c in hits)

    def test_knn_unsupported_is_a_backend_error(self, loaded, target) -> None:
        if not target.knn_skip_reason:
            pytest.skip("this cluster supports k-NN")
        backend, _, vectors = loaded
        with pytest.raises(BackendError, match="knn search failed"):
            backend.knn(vectors[0], None, 3)


class TestEmbedderBinding:
    def test_fresh_store_is_unbound(self, backend: OpenSearchBackend) -> None:
        stats = backend.stats()
        assert backend.embedder_binding() is None
        assert (stats.backend, stats.products, stats.vectors, stats.dim, stats.embedder) == (
            "opensearch",
            0,
            0,
            None,
            None,
        )
        assert stats.generation is None and stats.size_bytes == 0 and stats.details["indexes"] == []

    def test_first_bind_creates_the_index_with_the_binding_in_its_mapping(self, backend: OpenSearchBackend) -> None:
        binding = EmbedderBinding("bge-small-zh-v1.5", DIM)
        backend.bind_embedder(binding)
        mapping = next(iter(backend.client.indices.get_mapping(index=backend.write_alias).values()))["mappings"]
        assert mapping["_meta"]["shopsearch"] == {"embedder": "bge-small-zh-v1.5", "dim": DIM}
        assert mapping["_meta"]["owner"] == "shopsearch" and mapping["properties"]["vector"]["dimension"] == DIM
        backend.bind_embedder(binding)  # the same again: nothing to do
        backend.upsert(catalog(2), unit_vectors(2))
        assert backend.embedder_binding() == binding and backend.stats().embedder == binding

    def test_an_unbound_index_with_products_adopts_a_binding_of_its_dimension(self, loaded) -> None:
        backend, _products, _ = loaded
        with pytest.raises(EmbedderMismatch, match=f"mapping for {DIM}-d vectors"):
            backend.bind_embedder(EmbedderBinding("wide", DIM * 2))
        backend.bind_embedder(EmbedderBinding("model-a", DIM))
        meta = next(iter(backend.client.indices.get_mapping(index=backend.read_alias).values()))["mappings"]["_meta"]
        assert meta["owner"] == "shopsearch" and meta["shopsearch"] == {"embedder": "model-a", "dim": DIM}
        fresh = OpenSearchBackend(backend.client, backend.cfg)  # another process sees it
        assert fresh.embedder_binding() == EmbedderBinding("model-a", DIM)

    def test_another_embedder_on_an_index_with_products_is_refused(self, backend: OpenSearchBackend) -> None:
        backend.bind_embedder(EmbedderBinding("model-a", DIM))
        for other in (EmbedderBinding("model-b", DIM), EmbedderBinding("none", None)):
            backend.bind_embedder(other)  # no products yet: re-binding is allowed
            backend.bind_embedder(EmbedderBinding("model-a", DIM))
        backend.upsert(catalog(3), unit_vectors(3))
        with pytest.raises(EmbedderMismatch, match=r"model-a.*not embedder 'model-b'.*reindex"):
            backend.bind_embedder(EmbedderBinding("model-b", DIM))
        assert backend.embedder_binding() == EmbedderBinding("model-a", DIM)

    def test_reindex_records_the_new_embedder(self, loaded) -> None:
        backend, products, vectors = loaded
        backend.bind_embedder(EmbedderBinding("model-a", DIM))
        report = admin.reindex(backend, zip(products, vectors, strict=True), embedder=EmbedderBinding("model-b", DIM))
        assert backend.stats().details["indexes"] == [report.new_index]
        assert backend.embedder_binding() == EmbedderBinding("model-b", DIM)

    def test_a_malformed_record_is_a_clear_error(self, backend: OpenSearchBackend) -> None:
        backend.upsert(catalog(1), unit_vectors(1))
        backend.client.indices.put_mapping(index=backend.write_alias, body={"_meta": {"shopsearch": {"dim": "x"}}})
        with pytest.raises(BackendError, match=r"_meta\.shopsearch is not a shopsearch embedder record"):
            backend.embedder_binding()


class TestReindex:
    def test_alias_swap_while_reads_keep_working(self, loaded) -> None:
        backend, products, vectors = loaded
        old_index = bodies.index_name(backend.cfg, 1)
        reads_during_build: list[set[str]] = []
        new_catalog = [p.model_copy(update={"title": f"新款 {p.title}"}) for p in products[:6]]

        def feed() -> Iterator[tuple[Product, np.ndarray]]:
            for i, (product, vector) in enumerate(zip(new_catalog, vectors, strict=False)):
                if i == 3:  # mid-build: the read alias still serves the old index, complete
                    reads_during_build.append({c.id for c in backend.bm25("款", None, 50)})
                    assert backend.stats().details["indexes"] == [old_index]
                yield product, vector

        log: list[str] = []
        report = admin.reindex(backend, feed(), batch_size=2, progress=log.append)
        assert reads_during_build == [{p.id for p in products}]
        assert report.new_index == bodies.index_name(backend.cfg, 2)
        assert report.indexed == report.count == 6 and report.deleted_old == [old_index]
        assert report.aliases == {backend.read_alias: [report.new_index], backend.write_alias: [report.new_index]}
        assert backend.count() == 6 and backend.get(["p0"])[0].title.startswith("新款")
        assert not backend.client.indices.exists(index=old_index)
        settings = backend.client.indices.get_settings(index=report.new_index)[report.new_index]["settings"]["index"]
        assert settings["refresh_interval"] == backend.cfg.refresh_interval  # bulk-load tuning restored
        assert str(settings["number_of_replicas"]) == str(backend.cfg.replicas)
        assert any("one _aliases call" in line for line in log)
        # writes now go to the new index through the write alias
        backend.update_signals([SignalUpdate(id="p0", sales=1)])
        assert backend.get(["p0"])[0].sales == 1

    def test_rebuild_takes_the_load_step_as_a_callable(self, loaded) -> None:
        backend, products, vectors = loaded
        old_index = backend.alias_indexes(backend.read_alias)

        def load(target: admin.IndexLoader) -> None:
            target.upsert(products[:4], vectors[:4])
            target.upsert([products[4].model_copy(update={"title": "换新 连衣裙"})], vectors[4:5])
            assert backend.alias_indexes(backend.read_alias) == old_index  # nothing swapped while loading

        report = admin.rebuild(backend, load, embedder=EmbedderBinding("model-a", DIM))
        assert (report.indexed, report.count, report.failed) == (5, 5, [])
        assert backend.alias_indexes(backend.write_alias) == [report.new_index] and backend.count() == 5
        assert backend.get(["p4"])[0].title == "换新 连衣裙"
        assert backend.embedder_binding() == EmbedderBinding("model-a", DIM)

        def load_with_a_bad_document(target: admin.IndexLoader) -> None:
            target.upsert(products[:2], vectors[:2])
            # a price the mapping cannot hold: one failed item, reported rather than raised
            pairs = list(bodies.bulk_index_actions(target.index, products[2:3], vectors[2:3], require_alias=False))
            pairs[0][1]["price"] = "not a number"
            target.report.merge(backend.write_bulk(pairs, refresh="false"))

        with pytest.raises(BackendError, match="aborted, aliases unchanged: 1 failed"):
            admin.rebuild(backend, load_with_a_bad_document)
        assert backend.alias_indexes(backend.read_alias) == [report.new_index]
        partial = admin.rebuild(backend, load_with_a_bad_document, max_failures=1, keep_old=True)
        assert (partial.indexed, len(partial.failed), backend.count()) == (2, 1, 2)

    def test_keep_old_and_abort_keeps_aliases(self, loaded) -> None:
        backend, products, vectors = loaded
        report = admin.reindex(backend, zip(products, vectors, strict=True), keep_old=True)
        assert report.deleted_old == [] and backend.client.indices.exists(index=report.old_indexes[0])
        # a vector of the wrong size is rejected before anything is created or swapped
        with pytest.raises(ValueError, match="dimension"):
            admin.reindex(backend, [(products[0], np.ones(DIM + 1, dtype=np.float32))])
        assert backend.stats().details["indexes"] == [report.new_index]

    def test_reindex_bm25_only_then_cli(self, os_url: str, tmp_path, capsys) -> None:
        from middleware.cli import main

        path = tmp_path / "catalog.jsonl"
        rows = [p.model_dump(mode="json") for p in catalog(5)]
        lines = [json.dumps(r, ensure_ascii=False) for r in rows] + ["{not json", json.dumps({"id": "x"})]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        args = ["opensearch", "reindex", str(path), "--url", os_url, "--embedder", "none"]
        args += ["--dead-letter", str(tmp_path / "rejects.jsonl")]
        assert main(args) == 3  # two rejected rows, five indexed
        assert main([*args, "--keep-old"]) == 3
        out, err = capsys.readouterr()
        assert "built products-v1: 5 indexed" in out and "built products-v2: 5 indexed" in out
        assert "aliases now: products -> products-v2, products-write -> products-v2" in out
        assert "kept old: products-v1" in out
        assert "2 rows rejected; first: line 6: invalid JSON" in err
        b = OpenSearchBackend.from_settings(opensearch_settings(os_url))
        assert b.count() == 5 and b.stats().dim is None and b.stats().vectors == 0
        assert (
            main(["opensearch", "reindex", str(tmp_path / "missing.jsonl"), "--url", os_url, "--embedder", "none"]) == 2
        )


class TestErrors:
    def test_unreachable_cluster_is_one_clear_error_without_secrets(self) -> None:
        s = opensearch_settings("http://127.0.0.1:9", username="u", password="hunter2", max_retries=0, timeout_s=2)
        b = OpenSearchBackend.from_settings(s, dim=DIM)
        with pytest.raises(BackendError, match="unreachable") as err:
            b.count()
        assert "hunter2" not in str(err.value)

    def test_cli_check_and_init_exit_codes(self, os_url: str, capsys) -> None:
        from middleware.cli import main

        assert main(["opensearch", "init", "--url", os_url, "--embedder", "none"]) == 0
        out = capsys.readouterr().out
        assert "index template products-shopsearch -> products-v*" in out
        assert main(["opensearch", "check", "--url", os_url, "--embedder", "none"]) == 0
        assert main(["opensearch", "init", "--url", os_url, "--embedder", "none", "--dim", "0"]) == 2
        assert main(["opensearch", "check", "--url", "http://127.0.0.1:9", "--embedder", "none"]) == 1
        assert "unreachable" in capsys.readouterr().err


def test_client_errors_are_translated(osmem_clone) -> None:
    client = opensearchpy.OpenSearch(hosts=[osmem_clone.url])
    b = OpenSearchBackend(client, opensearch_settings(osmem_clone.url).opensearch, dim=DIM)
    b.ensure_index()
    with pytest.raises(BackendError, match=r"failed \(400\)"):
        b._search({"query": {"no_such_query": {}}}, "bad search")
    assert list(itertools.islice(b.iter_ids(), 1)) == []
