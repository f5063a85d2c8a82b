"""The osmem integration suite against a real OpenSearch cluster, plus what only a real engine shows:
k-NN recall with filters, the hybrid query through each pipeline against client-side fusion, reindex
under reads, `_analyze`, the CLI end to end, and `serve` passing requests through.

Runs when OPENSEARCH_URL is set: `tests/opensearch/with-node python -m pytest` starts the Maven-built
test node and sets it (the compose stack works too: OPENSEARCH_URL=http://localhost:9200 with
SHOPSEARCH_TEST_KNN_ENGINE=faiss). Each test uses its own index prefix and deletes what it created.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import opensearchpy
import pytest

from middleware import fusion
from middleware.backends import opensearch_admin as admin
from middleware.backends import opensearch_bodies as bodies
from middleware.backends.opensearch import OpenSearchBackend
from middleware.config import Settings
from middleware.products import Filters, Product, SignalUpdate
from tests import test_opensearch_osmem as osmem_suite
from tests.support.stores import opensearch_settings
from tests.test_opensearch_osmem import (
    BRANDS,
    Target,
    TestReads,
    TestSetup,
    TestWrites,
)
from tests.test_opensearch_osmem import TestReindex as _OsmemReindex
from tests.test_opensearch_osmem import TestVectors as _OsmemVectors

# the suite classes' fixtures, shared with the osmem run
backend = osmem_suite.backend
loaded = osmem_suite.loaded

OPENSEARCH_URL = os.environ.get("OPENSEARCH_URL")
KNN_ENGINE = os.environ.get("SHOPSEARCH_TEST_KNN_ENGINE", "lucene")
# with-node names what failed when the test node could not start
SKIP_REASON = os.environ.get("SHOPSEARCH_TEST_OPENSEARCH_UNAVAILABLE") or (
    "OPENSEARCH_URL is not set: run through tests/opensearch/with-node, or point it at a cluster"
)
pytestmark = [pytest.mark.opensearch, pytest.mark.skipif(not OPENSEARCH_URL, reason=SKIP_REASON)]

__all__ = ["TestReads", "TestReindex", "TestSetup", "TestVectors", "TestWrites"]


class TestReindex(_OsmemReindex):
    # writes the default `products` aliases: osmem only (TestCommandLine reindexes here, under its prefix)
    test_reindex_bm25_only_then_cli = None


class TestVectors(_OsmemVectors):
    test_knn_unsupported_is_a_backend_error = None  # osmem only: this node has k-NN


class ClusterTarget(Target):
    knn_skip_reason = None
    pipeline_skip_reason = None


@pytest.fixture
def target() -> type[Target]:
    return ClusterTarget


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"shopsearch-test-{uuid.uuid4().hex[:8]}"
    yield name
    client = opensearchpy.OpenSearch(hosts=[OPENSEARCH_URL])
    client.indices.delete(index=f"{name}-v*", ignore=[404])
    client.indices.delete_index_template(name=f"{name}-shopsearch", ignore=[404])
    for part in ("settings", "text", "vector"):
        client.cluster.delete_component_template(name=f"{name}-shopsearch-{part}", ignore=[404])
    client.close()


@pytest.fixture
def os_url(prefix: str) -> str:
    return OPENSEARCH_URL or ""


@pytest.fixture
def settings(os_url: str, prefix: str) -> Settings:
    # lucene: the test node's k-NN zip (from Maven Central) has no faiss natives
    return opensearch_settings(os_url, index_prefix=prefix, search_pipeline=f"{prefix}-hybrid", knn_engine=KNN_ENGINE)


# ------------------------------------------------------------------ what only a real engine can show

RECALL_DIM = 16
WORDS = ["红色", "蓝色", "连衣裙", "衬衫", "纯棉", "真丝", "夏季", "轻薄", "外套", "围巾", "礼盒", "运动"]


def word_catalog(n: int, seed: int = 1) -> list[Product]:
    """Products with 2-4 words each from a small vocabulary: BM25 scores spread, many ties avoided."""
    rng = np.random.default_rng(seed)
    return [
        Product(
            id=f"w{i}",
            title=" ".join(rng.choice(WORDS, size=int(rng.integers(2, 5)), replace=False)),
            brand=BRANDS[i % 3],
            category=["连衣裙"] if i % 2 else ["衬衫"],
            price=float(1 + i % 100),
            sales=int(i * 3 % 50),
            stock=[0, 5, None][i % 3],
        )
        for i in range(n)
    ]


def vectors_of(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def wide(settings: Settings) -> Iterator[tuple[OpenSearchBackend, list[Product], np.ndarray]]:
    """600 products with 16-d unit vectors: enough for HNSW to have a graph worth measuring."""
    backend = OpenSearchBackend.from_settings(settings, dim=RECALL_DIM)
    products = word_catalog(600)
    vectors = vectors_of(len(products), RECALL_DIM, seed=2)
    backend.upsert(products, vectors)
    yield backend, products, vectors
    backend.close()


def exact_top(vectors: np.ndarray, allowed: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    scores = np.where(allowed, vectors @ query, -np.inf)
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order[: min(k, int(allowed.sum()))]]


class TestKnnRecall:
    FILTERS = (
        None,
        Filters(brand="Acme"),
        Filters(price_min=10, price_max=40),
        Filters(in_stock=True, category="连衣裙"),
    )

    def test_filtered_knn_recall_at_10_against_exact_search(self, wide) -> None:
        """Filters inside the k-NN clause keep recall: ≥ 0.95 of the exact top 10 over the same vectors."""
        backend, products, vectors = wide
        queries = vectors_of(20, RECALL_DIM, seed=3)
        recalls: list[float] = []
        for filters in self.FILTERS:
            allowed = np.array([filters is None or filters.matches(p) for p in products])
            for query in queries:
                got = backend.knn(query, filters, 10)
                assert all(filters is None or filters.matches(c.product) for c in got)
                truth = {products[i].id for i in exact_top(vectors, allowed, query, 10)}
                recalls.append(len(truth & {c.id for c in got}) / len(truth))
        recall = float(np.mean(recalls))
        print(f"\nkNN recall@10 ({backend.cfg.knn_engine}, {len(recalls)} queries, 4 filter sets): {recall:.4f}")
        assert recall >= 0.95

    def test_knn_scores_follow_inner_product(self, wide) -> None:
        """innerproduct space: OpenSearch scores a dot product d ≥ 0 as 1 + d (the order is the dot product's)."""
        backend, products, vectors = wide
        query = vectors[7]
        got = backend.knn(query, None, 5)
        assert got[0].id == products[7].id
        by_id = {p.id: i for i, p in enumerate(products)}
        for cand in got:
            dot = float(vectors[by_id[cand.id]] @ query)
            expected = 1.0 + dot if dot >= 0 else 1.0 / (1.0 - dot)
            assert cand.knn == pytest.approx(expected, abs=1e-4)


class TestPartialUpdates:
    def test_signal_updates_leave_text_and_vector_byte_identical(self, loaded) -> None:
        backend, _products, _ = loaded
        client = backend.client

        def source(pid: str) -> dict:
            return client.get(index=backend.read_alias, id=pid)["_source"]

        before = {pid: source(pid) for pid in ("p1", "p2", "p3")}
        backend.update_signals([SignalUpdate(id="p1", price=1.5, stock=0), SignalUpdate(id="p2", sales=999)])
        after = {pid: source(pid) for pid in ("p1", "p2", "p3")}
        signals = {"price", "stock", "sales"}
        for pid in before:
            unchanged = {k: v for k, v in before[pid].items() if k not in signals}
            kept = {k: v for k, v in after[pid].items() if k not in signals}
            # the stored JSON of everything but the signals, vector floats included, is byte-identical
            assert json.dumps(kept, sort_keys=True) == json.dumps(unchanged, sort_keys=True), pid
        assert (after["p1"]["price"], after["p1"]["stock"]) == (1.5, 0)
        assert after["p2"]["sales"] == 999 and after["p3"] == before["p3"]
        assert backend.knn(np.asarray(before["p2"]["vector"], dtype=np.float32), None, 1)[0].id == "p2"


class TestAnalyze:
    def test_cjk_sub_field_and_word_analyzer(self, backend: OpenSearchBackend) -> None:
        backend.ensure_index()
        client = backend.client
        index = bodies.index_name(backend.cfg, 1)

        def tokens(**body: str) -> list[str]:
            return [t["token"] for t in client.indices.analyze(index=index, body=body)["tokens"]]

        assert tokens(field="title.cjk", text="红色连衣裙") == ["红色", "色连", "连衣", "衣裙"]
        assert tokens(field="title.cjk", text="ＡＢＣ") == ["abc"]  # cjk_width folds full-width forms
        # auto picks the first installed words analyzer; the test node has no smartcn (not served at 2.19.1)
        assert backend.word_analyzer in bodies.WORD_ANALYZERS
        if backend.word_analyzer == "standard":
            assert tokens(field="title", text="红色 Dress") == ["红", "色", "dress"]
        for name in bodies.WORD_ANALYZERS:
            assert backend.analyzer_available(name) == (name == "standard" or backend.word_analyzer == name)


FUSION_QUERIES = (
    ("红色 连衣裙", None),
    ("真丝 围巾", Filters(brand="Acme")),
    ("纯棉 衬衫 夏季", Filters(in_stock=True)),
    ("运动 外套", Filters(price_min=10, price_max=60)),
)


def normalised(candidates: list, stage: str, technique: str) -> dict[str, float]:
    """One sub-query's scores as neural-search normalises them (min_max floors at 0.001, so the
    lowest hit still counts a little)."""
    scores = np.array([getattr(c, stage) for c in candidates], dtype=np.float64)
    if technique == "min_max":
        low, high = scores.min(), scores.max()
        scaled = np.ones_like(scores) if high == low else np.maximum((scores - low) / (high - low), 0.001)
    elif technique == "l2":
        scaled = scores / np.sqrt((scores**2).sum())
    else:  # z_score
        std = scores.std()
        scaled = np.zeros_like(scores) if std == 0 else (scores - scores.mean()) / std
    return {c.id: float(s) for c, s in zip(candidates, scaled, strict=True)}


def client_side_fusion(bm25: list, knn: list, technique: str, settings: Settings) -> dict[str, float]:
    """id -> fused score from the two lists the middleware would fetch, fused as the pipeline does."""
    if technique == "rrf":
        return {c.id: float(c.fused) for c in fusion.rrf({"bm25": bm25, "knn": knn}, k=settings.fusion.rrf_k)}
    w_bm25, w_knn = bodies.normalized_weights(settings.fusion)
    by_bm25, by_knn = normalised(bm25, "bm25", technique), normalised(knn, "knn", technique)
    return {i: w_bm25 * by_bm25.get(i, 0.0) + w_knn * by_knn.get(i, 0.0) for i in by_bm25.keys() | by_knn.keys()}


class TestHybridAgainstClientFusion:
    @pytest.mark.parametrize("technique", ["min_max", "l2", "z_score", "rrf"])
    def test_hybrid_query_matches_client_side_fusion(self, wide, prefix: str, os_url: str, technique: str) -> None:
        """The hybrid query through each pipeline returns the client-side fusion's top 10: the same fused
        score at every rank, and every hit carrying its client-side score. Only the order inside a tie
        differs (the middleware breaks ties by id, OpenSearch by internal doc id)."""
        base, _products, _vectors = wide
        cfg = opensearch_settings(
            os_url,
            index_prefix=prefix,
            knn_engine=KNN_ENGINE,
            retrieval="hybrid",
            hybrid_normalization=technique,
            search_pipeline=f"{prefix}-{technique}",
        )
        backend = OpenSearchBackend.from_settings(cfg, dim=RECALL_DIM)
        try:
            report = admin.install(backend)
            if technique == "z_score" and not backend.client.search_pipeline.get(
                id=cfg.opensearch.search_pipeline, ignore=[404]
            ):
                major = int(backend.client.info()["version"]["number"].split(".")[0])
                assert major < 3, report.render()  # z_score exists from neural-search 3.0 on
                pytest.skip(
                    "z_score normalization needs neural-search >= 3.0: org.opensearch.plugin:neural-search:3.x "
                    "zips are not served on Maven Central (2.19.1.0: 'provided normalization technique is not "
                    "supported')"
                )
            queries = vectors_of(len(FUSION_QUERIES), RECALL_DIM, seed=10)
            ties = 0
            for (text, filters), vector in zip(FUSION_QUERIES, queries, strict=True):
                hybrid = backend.hybrid(text, vector, filters, 10)
                expected = client_side_fusion(
                    base.bm25(text, filters, 10), base.knn(vector, filters, 10), technique, cfg
                )
                ranked = sorted(expected.items(), key=lambda item: (-item[1], item[0]))[:10]
                assert [c.fused for c in hybrid] == pytest.approx([s for _, s in ranked], abs=1e-4), text
                for cand in hybrid:
                    assert cand.fused == pytest.approx(expected[cand.id], abs=1e-4), (text, cand.id)
                    assert filters is None or filters.matches(cand.product)
                ties += [c.id for c in hybrid] != [i for i, _ in ranked]
            print(
                f"\nhybrid {technique}: same top 10 in {len(FUSION_QUERIES)}/{len(FUSION_QUERIES)} queries, "
                f"{ties} with a tie ordered differently"
            )
        finally:
            backend.client.search_pipeline.delete(id=cfg.opensearch.search_pipeline, ignore=[404])
            backend.close()


class TestReindexUnderReads:
    def test_alias_swap_while_a_reader_searches_throughout(self, wide, settings: Settings) -> None:
        """A reader searching (BM25 and k-NN) all through a rebuild never fails and never sees an empty
        or partial store: before the swap it reads the old index, after it the new one, complete."""
        backend, products, vectors = wide
        renamed = [p.model_copy(update={"title": f"新款 {p.title}"}) for p in products]
        reader = OpenSearchBackend.from_settings(settings, dim=RECALL_DIM)
        stop = threading.Event()
        failures: list[str] = []
        seen = {"old": 0, "new": 0}
        reads = 0

        def read_loop() -> None:
            nonlocal reads
            query = vectors_of(1, RECALL_DIM, seed=20)[0]
            while not stop.is_set():
                try:
                    total = reader.count()
                    knn = reader.knn(query, None, 10)
                    words = reader.bm25("连衣裙", None, 5)
                except Exception as err:  # a failed read is what this test counts
                    failures.append(repr(err))
                    continue
                reads += 1
                if total != len(products) or len(knn) != 10 or not words:
                    failures.append(f"partial store: count={total} knn={len(knn)} bm25={len(words)}")
                seen["new" if words[0].product and words[0].product.title.startswith("新款") else "old"] += 1

        thread = threading.Thread(target=read_loop)
        thread.start()
        started = time.perf_counter()
        try:
            report = admin.reindex(backend, zip(renamed, vectors, strict=True), batch_size=50)
        finally:
            time.sleep(0.5)  # keep reading a moment after the swap
            stop.set()
            thread.join(timeout=30)
            reader.close()
        elapsed = time.perf_counter() - started
        print(
            f"\nreindex of {report.indexed} products under reads: {reads} reads in {elapsed:.1f}s, "
            f"{len(failures)} failed, {seen['old']} saw the old index, {seen['new']} the new one"
        )
        assert failures == []
        assert report.indexed == len(products) and seen["old"] > 0 and seen["new"] > 0
        assert backend.get(["w0"])[0].title.startswith("新款")


class TestCommandLine:
    @pytest.fixture
    def cli_env(
        self, os_url: str, prefix: str, tiny_embedder_dir, model_cache_dir, tmp_path, monkeypatch: pytest.MonkeyPatch
    ) -> Settings:
        for key in list(os.environ):
            if key.startswith("SHOPSEARCH_"):
                monkeypatch.delenv(key)
        env = {
            "SHOPSEARCH_BACKEND": "opensearch",
            "SHOPSEARCH_OPENSEARCH__URL": os_url,
            "SHOPSEARCH_OPENSEARCH__INDEX_PREFIX": prefix,
            "SHOPSEARCH_OPENSEARCH__SEARCH_PIPELINE": f"{prefix}-hybrid",
            "SHOPSEARCH_OPENSEARCH__KNN_ENGINE": KNN_ENGINE,
            "SHOPSEARCH_OPENSEARCH__REPLICAS": "0",
            "SHOPSEARCH_OPENSEARCH__WRITE_REFRESH": "true",
            "SHOPSEARCH_EMBEDDER": str(tiny_embedder_dir),
            "SHOPSEARCH_RERANKER": "none",
            "SHOPSEARCH_MODEL_CACHE_DIR": str(model_cache_dir),
            "SHOPSEARCH_DATA_DIR": str(tmp_path / "state"),
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield Settings()
        opensearchpy.OpenSearch(hosts=[os_url]).search_pipeline.delete(id=f"{prefix}-hybrid", ignore=[404])

    def test_check_init_index_search_update_delete_reindex(self, cli_env: Settings, tmp_path, capsys) -> None:
        from tests.test_loaders_pipeline import catalog as loader_catalog
        from tests.test_loaders_pipeline import run_cli, write_jsonl

        code, out, err = run_cli(capsys, "opensearch", "init")
        assert code == 0, out + err
        code, out, err = run_cli(capsys, "opensearch", "check")
        assert code == 0, out + err
        assert "k-NN plugin" in out and "neural-search plugin" in out

        source = write_jsonl(tmp_path / "c.jsonl", loader_catalog(40))
        code, out, err = run_cli(capsys, "index", str(source), "--json", "--batch-size", "16")
        assert code == 0, err
        assert json.loads(out)["indexed"] == 40
        backend = OpenSearchBackend.from_settings(cli_env)
        stats = backend.stats()
        assert stats.products == 40 and stats.vectors == 40

        code, out, err = run_cli(capsys, "search", "卡西欧 手表", "--json", "--no-rerank", "--size", "5")
        assert code == 0, err
        hits = json.loads(out)["hits"]
        assert len(hits) == 5 and any(h["id"] in {"p1", "p6", "p11"} for h in hits)

        def stored(pid: str) -> dict:
            return backend.client.get(index=backend.read_alias, id=pid)["_source"]

        before = stored("p3")
        changes = write_jsonl(tmp_path / "s.jsonl", [{"id": "p3", "price": 1, "stock": 0, "sales": 5}])
        code, out, err = run_cli(capsys, "update-signals", str(changes), "--json")
        assert code == 0 and json.loads(out)["updated"] == 1, out + err
        after = stored("p3")
        assert after["vector"] == before["vector"] and after["title"] == before["title"]
        assert (after["price"], after["stock"], after["sales"]) == (1, 0, 5)

        code, out, err = run_cli(capsys, "delete", "--ids", "p0,nope", "--json")
        assert json.loads(out)["deleted"] == 1, out + err

        prefix = cli_env.opensearch.index_prefix
        old_index = backend.stats().details["indexes"]
        code, out, err = run_cli(capsys, "opensearch", "reindex", str(source))
        assert code == 0, out + err
        assert "40 indexed" in out and f"{prefix} -> {prefix}-v2" in out
        assert backend.stats().details["indexes"] == [f"{prefix}-v2"] != old_index
        assert backend.count() == 40 and backend.get(["p0"])  # the catalog is the truth again
        code, out, err = run_cli(capsys, "search", "华为", "--json", "--no-rerank", "--retrieval", "vector")
        assert code == 0 and len(json.loads(out)["hits"]) == 10, err
        backend.close()


class TestServe:
    def test_serve_on_the_opensearch_backend_answers_aggs_highlight_and_sort(
        self, os_url: str, prefix: str, tiny_embedder_dir, tiny_reranker_dir, model_cache_dir
    ) -> None:
        """The service on the OpenSearch backend answers storefront bodies (aggregations, highlight, sorts
        on fields) with the node's primitives, in OpenSearch's response shape."""
        import httpx

        from middleware.cli.search import load_demo_catalog
        from middleware.models import Embedder, Reranker
        from middleware.pipeline import Pipeline
        from middleware.server.app import create_app
        from tests.test_server_support import LiveServer

        embedder = Embedder(str(tiny_embedder_dir), cache_dir=model_cache_dir)
        reranker = Reranker(str(tiny_reranker_dir), cache_dir=model_cache_dir, precision="fp32")
        settings = Settings(
            _env_file=None,
            backend="opensearch",
            rerank_k=10,
            deadline_ms=5000,
            opensearch={
                "url": os_url,
                "index_prefix": prefix,
                "knn_engine": KNN_ENGINE,
                "replicas": 0,
                "write_refresh": "true",
            },
            server={"allowed_indices": [f"{prefix}*"], "index_name": prefix},
        )
        store = OpenSearchBackend.from_settings(settings, dim=embedder.dim)
        products = load_demo_catalog(None)
        store.upsert(products, embedder.encode_documents([p.embedding_text() for p in products]))
        app = create_app(settings, Pipeline(settings, store, embedder, reranker))
        with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
            aggs = c.post(
                f"/{prefix}/_search", json={"size": 0, "aggs": {"b": {"terms": {"field": "brand.keyword", "size": 50}}}}
            )
            assert aggs.status_code == 200, aggs.text
            buckets = aggs.json()["aggregations"]["b"]["buckets"]
            assert sum(b["doc_count"] for b in buckets) == len(products)

            body = {"query": {"match": {"title": "手表"}}, "highlight": {"fields": {"title": {}}}, "size": 3}
            lit = c.post(f"/{prefix}/_search", json=body)
            assert lit.status_code == 200, lit.text
            assert all("<em>" in h["highlight"]["title"][0] for h in lit.json()["hits"]["hits"])

            by_price = c.post(f"/{prefix}/_search", json={"query": {"match_all": {}}, "sort": [{"price": "asc"}]})
            assert by_price.status_code == 200, by_price.text
            prices = [h["_source"]["price"] for h in by_price.json()["hits"]["hits"]]
            assert prices == sorted(prices) and len(prices) == 10

            text = c.post(f"/{prefix}/_search", json={"query": {"match": {"title": "手表"}}, "size": 3})
            assert text.status_code == 200 and "x-shopsearch-passthrough" not in text.headers, text.text
            assert len(text.json()["hits"]["hits"]) == 3
            assert "vector" not in text.json()["hits"]["hits"][0]["_source"]
        store.close()
