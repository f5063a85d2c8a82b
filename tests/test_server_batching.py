"""The shared batching queue (the one planner of model calls) and the LRU+TTL caches."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from middleware.backends.embedded import EmbeddedBackend
from middleware.config import Settings
from middleware.fusion import rrf
from middleware.models.tokenization import BATCH_OVERHEAD_TOKENS, plan_batches
from middleware.pipeline import Pipeline
from middleware.schema import SearchRequest
from middleware.server.batching import BatcherClosed, BatchingEmbedder, BatchingReranker, BatchQueue
from middleware.server.caches import LruTtlCache
from tests.test_server_support import server_models, server_store

__all__ = ["server_models", "server_store"]


class Recorder:
    """A batch function that remembers every batch it ran (upper-cases its inputs)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def __call__(self, items: list[str]) -> list[str]:
        with self.lock:
            self.batches.append(list(items))
        time.sleep(self.delay_s)
        return [s.upper() for s in items]


def queue(run: Recorder, **options: object) -> BatchQueue[str, str]:
    values: dict = {"max_batch_size": 32, "max_batch_tokens": 100_000, "max_wait_ms": 5, **options}
    return BatchQueue("t", run, **values)


def test_concurrent_callers_share_batches_and_get_their_own_results():
    run = Recorder(delay_s=0.01)
    batcher = queue(run, max_batch_size=8, max_wait_ms=20)
    try:
        texts = [f"q{i}" for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda t: batcher.submit([t], [2])[0].result(timeout=5), texts))
        assert results == [t.upper() for t in texts]
        assert max(len(b) for b in run.batches) > 1  # shared
        assert all(len(b) <= 8 for b in run.batches)  # bounded
        assert sum(len(b) for b in run.batches) == 16
    finally:
        batcher.close()


def test_a_model_call_stays_within_the_padded_token_budget():
    run = Recorder()
    batcher = queue(run, max_batch_tokens=100, max_wait_ms=30, overhead_tokens=None)
    try:
        lengths = [10] * 12 + [60, 60, 150]  # 150 alone exceeds the budget: it runs alone
        texts = [f"t{i}" for i in range(len(lengths))]
        futures = batcher.submit(texts, lengths)
        assert [f.result(timeout=5) for f in futures] == [t.upper() for t in texts]
        by_text = dict(zip(texts, lengths, strict=True))
        for batch in run.batches:
            width = max(by_text[t] for t in batch)
            assert len(batch) == 1 or len(batch) * width <= 100
        assert sorted(len(b) for b in run.batches) == [1, 1, 1, 2, 10]  # in arrival order: 10×10, 2×10, 60, 60, 150
    finally:
        batcher.close()


def test_the_queue_cuts_a_long_outlier_into_its_own_model_call():
    run = Recorder()
    batcher = queue(run, max_wait_ms=30)  # the default per-call overhead
    try:
        lengths = [20] * 31 + [200]
        texts = [f"t{i}" for i in range(32)]
        futures = batcher.submit(texts, lengths)
        assert [f.result(timeout=5) for f in futures] == [t.upper() for t in texts]
        assert sorted(map(len, run.batches)) == [1, 31]
        assert ["t31"] in run.batches  # the 200-token item pads nobody else
    finally:
        batcher.close()


def test_a_single_item_waits_at_most_about_max_wait():
    batcher = queue(Recorder(), max_wait_ms=5)
    try:
        started = time.perf_counter()
        assert batcher.submit(["x"], [1])[0].result(timeout=5) == "X"
        assert time.perf_counter() - started < 1.0  # generous: a stalled queue would hit the timeout
    finally:
        batcher.close()


def test_a_failing_batch_fails_its_callers_and_the_worker_lives_on():
    calls = {"n": 0}

    def flaky(items: list[str]) -> list[str]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("model exploded")
        return items

    batcher = BatchQueue("t", flaky, max_batch_size=4, max_batch_tokens=100, max_wait_ms=1)
    try:
        with pytest.raises(RuntimeError, match="model exploded"):
            batcher.submit(["a"], [1])[0].result(timeout=5)
        assert batcher.submit(["b"], [1])[0].result(timeout=5) == "b"
    finally:
        batcher.close()


def test_a_closed_batcher_refuses_work():
    batcher = queue(Recorder())
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit(["a"], [1])


def test_a_caller_that_gives_up_costs_no_model_time():
    run = Recorder()
    batcher = queue(run, max_wait_ms=300)
    try:
        gone = batcher.submit(["gone"], [1])[0]
        assert gone.cancel()
        assert batcher.submit(["kept"], [1])[0].result(timeout=5) == "KEPT"
        assert run.batches == [["kept"]]
    finally:
        batcher.close()


def test_cache_is_lru_and_expires():
    lookups: list[bool] = []
    cache: LruTtlCache[int] = LruTtlCache("c", maxsize=2, ttl_s=0.2, on_lookup=lambda _, hit: lookups.append(hit))
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)  # evicts b
    assert cache.get("b") is None and cache.get("c") == 3
    time.sleep(0.25)
    assert cache.get("a") is None
    assert lookups == [True, False, True, False]
    assert (cache.hits, cache.misses) == (2, 2)


def test_a_zero_size_cache_is_disabled():
    cache: LruTtlCache[int] = LruTtlCache("c", maxsize=0, ttl_s=10)
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0


def test_a_lone_caller_does_not_wait_when_nobody_else_can_join():
    run = Recorder()
    alone = queue(run, max_wait_ms=2000, more_expected=lambda n: n < 1)
    crowd = queue(run, max_wait_ms=300, more_expected=lambda n: n < 2)
    try:
        started = time.perf_counter()
        assert alone.submit(["x"], [1])[0].result(timeout=5) == "X"
        assert time.perf_counter() - started < 1.0  # far below the 2 s max wait
        started = time.perf_counter()
        assert crowd.submit(["y"], [1])[0].result(timeout=5) == "Y"
        assert time.perf_counter() - started >= 0.29  # another caller was expected: it waited
    finally:
        alone.close()
        crowd.close()


def test_rerank_pairs_run_in_the_model_calls_the_queue_plans(server_models):
    """The queue is the only planner: one search's pairs, tokenised before queueing, run as the cuts the
    queue makes over their token counts (the model runs each call as it is), scoring like the model."""
    _, reranker = server_models
    calls: list[int] = []
    batching = BatchingReranker(
        reranker, max_batch_size=32, max_wait_ms=1.0, on_batch=lambda _kind, n, _s: calls.append(n)
    )
    try:
        docs = ["表" * n for n in (2, 5, 11, 30, 70, 150)]
        scores = batching.score("手表", docs)
    finally:
        batching.close()
    lengths = np.array([len(e.ids) for e in reranker.tokenize_pairs([("手表", d) for d in docs])])
    assert sorted(calls) == sorted(len(b) for b in plan_batches(lengths, 32, BATCH_OVERHEAD_TOKENS))
    np.testing.assert_allclose(scores, reranker.score("手表", docs), atol=1e-5)


def test_searches_await_their_embeddings_without_holding_stage_threads(server_models, server_store):
    """Six concurrent searches on a pipeline with two stage threads share one embedding batch: a search
    waiting for its batch holds no stage thread, so batches are not capped by the thread count."""
    embedder, _ = server_models
    calls: list[int] = []
    batching = BatchingEmbedder(
        embedder, max_batch_size=6, max_wait_ms=3000, on_batch=lambda _kind, n, _s: calls.append(n)
    )
    base = Pipeline(
        Settings(deadline_ms=20_000, max_deadline_ms=20_000), server_store, embedder, None, owns_backend=False
    )
    pipeline = base.with_models(batching, None, stage_workers=2)
    try:
        queries = [f"手表 {i}" for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda q: pipeline.search(SearchRequest(query=q, size=3)), queries))
    finally:
        pipeline.close()
        batching.close()
        base.close()
    assert calls == [6]
    assert all(a.degraded == [] and a.hits for a in answers)


def test_a_pipeline_with_other_models_leaves_the_backend_to_its_base(server_models, server_store, tmp_path):
    embedder, _ = server_models
    store = EmbeddedBackend(tmp_path, dim=embedder.dim)
    base = Pipeline(Settings(), store, embedder, None)
    derived = base.with_models(None, None)
    derived.close()
    assert store.count() == 0  # still open
    base.close()
    with pytest.raises(Exception, match="closed"):
        store.count()


class ServerFusingStore(EmbeddedBackend):
    """The real embedded store answering as a store that fuses server-side does (hybrid: BM25 and kNN
    fused in one call), counting the queries it receives."""

    fuses_server_side = True

    def __init__(self, real: EmbeddedBackend, *, hybrid_fails: bool = False, hybrid_delay_s: float = 0.0) -> None:
        self.__dict__.update(real.__dict__)
        self.sent: list[str] = []
        self.hybrid_fails = hybrid_fails
        self.hybrid_delay_s = hybrid_delay_s

    def bm25(self, text, filters, n):  # type: ignore[no-untyped-def]
        self.sent.append("bm25")
        return super().bm25(text, filters, n)

    def knn(self, vector, filters, n):  # type: ignore[no-untyped-def]
        self.sent.append("knn")
        return super().knn(vector, filters, n)

    def hybrid(self, text, vector, filters, n):  # type: ignore[no-untyped-def]
        self.sent.append("hybrid")
        time.sleep(self.hybrid_delay_s)
        if self.hybrid_fails:
            raise RuntimeError("injected hybrid failure")
        return rrf({"bm25": super().bm25(text, filters, n), "knn": super().knn(vector, filters, n)}, k=60)


@pytest.mark.parametrize("hybrid_fails", [False, True])
def test_server_side_fusion_sends_only_the_queries_it_uses(server_models, server_store, hybrid_fails):
    embedder, _ = server_models
    store = ServerFusingStore(server_store, hybrid_fails=hybrid_fails)
    pipeline = Pipeline(Settings(), store, embedder, None, owns_backend=False)
    try:
        answer = pipeline.search(SearchRequest(query="手表", size=3))
    finally:
        pipeline.close()
    assert answer.hits
    if hybrid_fails:  # the plain queries answer instead, once each
        assert sorted(store.sent) == ["bm25", "hybrid", "knn"] and answer.degraded == ["hybrid"]
    else:  # no speculative BM25 query next to the hybrid one; the kNN one scores the similarity floor
        assert store.sent == ["hybrid", "knn"] and answer.degraded == []


def test_a_late_server_side_fusion_leaves_time_for_bm25_alone(server_models, server_store):
    embedder, _ = server_models
    store = ServerFusingStore(server_store, hybrid_delay_s=2.0)
    pipeline = Pipeline(Settings(deadline_ms=1000), store, embedder, None, owns_backend=False)
    try:
        started = time.perf_counter()
        answer = pipeline.search(SearchRequest(query="手表", size=3))
        elapsed = time.perf_counter() - started
    finally:
        pipeline.close()
    assert answer.hits and "hybrid" in answer.degraded
    assert elapsed < 1.9  # within the deadline (and its slack), not after the late hybrid query
