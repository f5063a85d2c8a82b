"""The micro-batching queue and the LRU+TTL caches (generic parts, no models)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from middleware.server.batching import BatcherClosed, MicroBatcher, length_bucket
from middleware.server.caches import LruTtlCache
from tests.test_server_support import server_models

__all__ = ["server_models"]


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


def test_length_buckets_are_powers_of_two():
    assert [length_bucket(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 16, 17)] == [0, 0, 1, 2, 2, 3, 3, 4, 4, 5]


def test_concurrent_callers_share_batches_and_get_their_own_results():
    run = Recorder(delay_s=0.01)
    batcher = MicroBatcher("t", run, length=len, max_batch_size=8, max_wait_ms=20)
    try:
        texts = [f"q{i}" for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda t: batcher.submit([t])[0].result(timeout=5), texts))
        assert results == [t.upper() for t in texts]
        assert max(len(b) for b in run.batches) > 1  # shared
        assert all(len(b) <= 8 for b in run.batches)  # bounded
        assert sum(len(b) for b in run.batches) == 16
    finally:
        batcher.close()


def test_batches_never_mix_length_buckets():
    run = Recorder()
    batcher = MicroBatcher("t", run, length=len, max_batch_size=64, max_wait_ms=30)
    try:
        futures = batcher.submit(["a", "bb", "c" * 100, "d" * 120, "e"])
        assert [f.result(timeout=5) for f in futures] == ["A", "BB", "C" * 100, "D" * 120, "E"]
        for batch in run.batches:
            assert len({length_bucket(len(s)) for s in batch}) == 1
        assert sorted(map(len, run.batches)) == [1, 2, 2]  # {bb}, {a, e}, {c…, d…}
    finally:
        batcher.close()


def test_a_single_item_waits_at_most_about_max_wait():
    batcher = MicroBatcher("t", Recorder(), length=len, max_batch_size=32, max_wait_ms=5)
    try:
        started = time.perf_counter()
        assert batcher.submit(["x"])[0].result(timeout=5) == "X"
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

    batcher = MicroBatcher("t", flaky, length=len, max_batch_size=4, max_wait_ms=1)
    try:
        with pytest.raises(RuntimeError, match="model exploded"):
            batcher.submit(["a"])[0].result(timeout=5)
        assert batcher.submit(["b"])[0].result(timeout=5) == "b"
    finally:
        batcher.close()


def test_a_closed_batcher_refuses_work():
    batcher = MicroBatcher("t", Recorder(), length=len, max_batch_size=4, max_wait_ms=1)
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit(["a"])


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
    alone = MicroBatcher("t", run, length=len, max_batch_size=32, max_wait_ms=2000, more_expected=lambda n: n < 1)
    crowd = MicroBatcher("t", run, length=len, max_batch_size=32, max_wait_ms=300, more_expected=lambda n: n < 2)
    try:
        started = time.perf_counter()
        assert alone.submit(["x"])[0].result(timeout=5) == "X"
        assert time.perf_counter() - started < 1.0  # far below the 2 s max wait
        started = time.perf_counter()
        assert crowd.submit(["y"])[0].result(timeout=5) == "Y"
        assert time.perf_counter() - started >= 0.29  # another caller was expected: it waited
    finally:
        alone.close()
        crowd.close()


def test_one_search_rerank_pairs_take_one_model_pass(server_models):
    """The product's Reranker plans its own padding-minimising cuts, so the queue keeps one request's pairs
    together whatever their lengths (regression: length buckets split 20 pairs into 2-3 model passes)."""
    from middleware.server.batching import BatchingReranker

    _, reranker = server_models
    batches: list[int] = []
    batching = BatchingReranker(
        reranker, max_batch_size=32, max_wait_ms=1.0, on_batch=lambda _kind, n, _s: batches.append(n)
    )
    try:
        docs = ["表" * n for n in (2, 5, 11, 30, 70, 150)]  # five length buckets apart
        scores = batching.score("手表", docs)
    finally:
        batching.close()
    assert batches == [len(docs)]
    np.testing.assert_allclose(scores, reranker.score("手表", docs), atol=1e-5)
