"""Shared batches: concurrent requests' query embeddings and rerank pairs share model calls.

The queue is the one planner of model calls (router → queue → backend, as text-embeddings-inference
does): a request's cache lookups and tokenisation run on a small preparation pool, its cache misses are
queued as encodings, and the search awaits their futures without holding a thread; one worker thread
per model cuts the queue into batches and hands each batch to the model as it is.

- a batch takes waiting items in arrival order while it stays within `max_batch_size` rows and
  `max_batch_tokens` padded tokens (rows × longest row); an item waits at most `max_wait_ms` for
  company, and not at all when nobody else can join (`more_expected`);
- that window is cut, longest first, into the model calls that minimise padded tokens plus a fixed
  cost per call (`plan_batches`), so a few long outliers do not pad the short rows to their length.

`BatchingEmbedder` and `BatchingReranker` put the LRU+TTL caches in front (only misses reach the
queue) and offer both the blocking calls (`encode_queries`, `score`) and the futures the pipeline
awaits (`submit_queries`, `submit_scores`). The product's models are batched by their token counts
(`tokenize_*` / `*_encoded`); any other model by characters, one `encode_queries` / `score` call per
batch (per query in the batch for a scorer).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Executor, Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from middleware.models.tokenization import BATCH_OVERHEAD_TOKENS, plan_batches
from middleware.redaction import redact
from middleware.server.caches import LruTtlCache, text_hash

log = logging.getLogger(__name__)

E = TypeVar("E")  # a queued (tokenised) item
O = TypeVar("O")  # noqa: E741 - one item's output
R = TypeVar("R")

BatchObserver = Callable[[str, int, float], None]  # (model kind, rows in the model call, seconds)


class BatcherClosed(RuntimeError):
    pass


@dataclass
class _Queued(Generic[E, O]):
    item: E
    tokens: int
    future: Future[O]
    caller: int  # one id per submit() call
    enqueued: float = field(default_factory=time.perf_counter)


class BatchQueue(Generic[E, O]):
    """Tokenised items in arrival order, and one worker thread that cuts them into model calls."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[E]], Sequence[O]],
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        overhead_tokens: int | None = BATCH_OVERHEAD_TOKENS,
        on_batch: BatchObserver | None = None,
        more_expected: Callable[[int], bool] | None = None,
    ) -> None:
        """`run_batch(items)`: one model call over exactly these items, one output each.
        `overhead_tokens`: the cost of one more model call in padded tokens (None: the window is one
        call). `more_expected(callers_waiting)`: can anyone else still join? When it says no, waiting
        for company is pointless (a lone request at low load), and the batch runs at once."""
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch_size and max_batch_tokens must be at least 1")
        self.name = name
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self._overhead_tokens = overhead_tokens
        self._on_batch = on_batch
        self._more_expected = more_expected
        self._next_caller = 0
        self._queue: deque[_Queued[E, O]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name=f"shopsearch-batch-{name}", daemon=True)
        self._worker.start()

    def submit(self, items: Sequence[E], tokens: Sequence[int]) -> list[Future[O]]:
        """Queue one caller's items (`tokens`: each item's length); one future per item."""
        if len(items) != len(tokens):
            raise ValueError(f"{len(items)} items but {len(tokens)} token counts")
        futures: list[Future[O]] = []
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"{self.name} batcher is closed")
            self._next_caller += 1
            for item, n in zip(items, tokens, strict=True):
                fut: Future[O] = Future()
                self._queue.append(_Queued(item, max(1, int(n)), fut, self._next_caller))
                futures.append(fut)
            self._cond.notify()
        return futures

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=5)

    # -- worker ---------------------------------------------------------------------------------

    def _window_end(self) -> int:
        """How many items from the head fit one model call's rows and padded-token budget (at least 1)."""
        width = 0
        for count, queued in enumerate(self._queue):
            width = max(width, queued.tokens)
            if count >= self.max_batch_size or (count > 0 and (count + 1) * width > self.max_batch_tokens):
                return count
        return len(self._queue)

    def _next_window(self) -> list[_Queued[E, O]] | None:
        """Block until a call's worth is waiting or the oldest item has waited long enough; None when
        closed and drained."""
        with self._cond:
            while True:
                while self._queue and self._queue[0].future.cancelled():  # its caller gave up
                    self._queue.popleft()
                if not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                end = self._window_end()
                full = end < len(self._queue) or end >= self.max_batch_size
                remaining = self._queue[0].enqueued + self.max_wait_s - time.perf_counter()
                if full or remaining <= 0 or self._closed or not self._others_may_join():
                    return [self._queue.popleft() for _ in range(end)]
                self._cond.wait(remaining)

    def _others_may_join(self) -> bool:
        if self._more_expected is None:
            return True
        return self._more_expected(len({q.caller for q in self._queue}))

    def _loop(self) -> None:
        while True:
            window = self._next_window()
            if window is None:
                return
            # a caller that gave up (cancelled future) does not cost model time
            window = [q for q in window if q.future.set_running_or_notify_cancel()]
            if not window:
                continue
            lengths = np.array([q.tokens for q in window], dtype=np.int64)
            for indices in plan_batches(lengths, self.max_batch_size, self._overhead_tokens):
                self._run([window[i] for i in indices])

    def _run(self, batch: list[_Queued[E, O]]) -> None:
        started = time.perf_counter()
        try:
            outputs = self._run_batch([q.item for q in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"{self.name}: {len(outputs)} outputs for {len(batch)} inputs")
        except BaseException as err:  # the callers see the model's failure, the worker lives on
            for q in batch:
                q.future.set_exception(err)
            return
        finally:
            if self._on_batch is not None:
                self._on_batch(self.name, len(batch), time.perf_counter() - started)
        for q, out in zip(batch, outputs, strict=True):
            q.future.set_result(out)


def gather(parts: Sequence[Future[O]], combine: Callable[[list[O]], R]) -> Future[R]:
    """One future for several: `combine(results)` once all are done, the first failure otherwise.
    Cancelling it cancels the parts still queued (the queue then skips them)."""
    out: Future[R] = Future()
    if not parts:
        _settle(out, lambda: combine([]))
        return out
    left = [len(parts)]
    lock = threading.Lock()

    def part_done(_: Future[O]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        failed = next((p for p in parts if p.cancelled() or p.exception() is not None), None)
        if failed is not None:
            _settle_exception(out, CancelledError() if failed.cancelled() else failed.exception())  # type: ignore[arg-type]
        else:
            _settle(out, lambda: combine([p.result() for p in parts]))

    def cancelled(fut: Future[R]) -> None:
        if fut.cancelled():
            for p in parts:
                p.cancel()

    out.add_done_callback(cancelled)
    for p in parts:
        p.add_done_callback(part_done)
    return out


def _settle(out: Future[R], compute: Callable[[], R]) -> None:
    try:
        value = compute()
    except BaseException as err:
        _settle_exception(out, err)
        return
    with contextlib.suppress(InvalidStateError):  # cancelled by its caller meanwhile
        out.set_result(value)


def _settle_exception(out: Future[Any], err: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        out.set_exception(err)


def done(value: R) -> Future[R]:
    fut: Future[R] = Future()
    fut.set_result(value)
    return fut


def deferred(pool: Executor, start: Callable[[], Future[R]]) -> Future[R]:
    """The future `start()` returns, with `start` itself run on `pool`: the caller's thread never
    blocks, and a pool thread is held only while `start` runs (not while its future waits)."""
    out: Future[R] = Future()

    def copy(inner: Future[R]) -> None:
        if inner.cancelled():
            _settle_exception(out, CancelledError())
        elif inner.exception() is not None:
            _settle_exception(out, inner.exception())  # type: ignore[arg-type]
        else:
            _settle(out, inner.result)

    def run() -> None:
        if out.cancelled():  # its caller gave up before it started
            return
        try:
            inner = start()
        except BaseException as err:
            _settle_exception(out, err)
            return
        out.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
        inner.add_done_callback(copy)

    pool.submit(run)
    return out


# ------------------------------------------------------------------------------------ model wrappers


class _QueryEncoder(Protocol):
    def encode_queries(self, texts: list[str]) -> np.ndarray: ...


class _PairScorer(Protocol):
    def score(self, query: str, docs: list[str]) -> np.ndarray: ...


@runtime_checkable
class TokenizingEncoder(Protocol):
    """An encoder that lets the caller plan its batches (the product's `Embedder`)."""

    def tokenize_queries(self, texts: Sequence[str]) -> list[Any]: ...

    def embed_encoded(self, encodings: Sequence[Any]) -> np.ndarray: ...


@runtime_checkable
class TokenizingScorer(Protocol):
    """A scorer that lets the caller plan its batches (the product's `Reranker`)."""

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Any]: ...

    def score_encoded(self, encodings: Sequence[Any]) -> np.ndarray: ...


def _model_id(model: Any) -> str:
    return str(getattr(model, "model_id", None) or type(model).__name__)


def _cache_get(cache: LruTtlCache[Any] | None, key: Any) -> Any:
    """A cache lookup that can only miss: a failing cache costs hits, never the model stage."""
    if cache is None:
        return None
    try:
        return cache.get(key)
    except Exception as err:
        log.warning("%s cache lookup failed, treated as a miss: %s", getattr(cache, "name", "a"), redact(str(err)))
        return None


def _cache_put(cache: LruTtlCache[Any] | None, key: Any, value: Any) -> None:
    if cache is None:
        return
    try:
        cache.put(key, value)
    except Exception as err:
        log.warning("%s cache store failed, value not cached: %s", getattr(cache, "name", "a"), redact(str(err)))


class _Runner(Generic[E, O]):
    """Where a wrapper's work goes. Each request's preparation (cache lookups, tokenisation) runs on a
    small pool, so a slow step can be abandoned at the request's deadline; its cache misses then wait
    in the shared queue, holding no thread (batching off: one model call per request, in that step)."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[E]], Sequence[O]],
        *,
        batching: bool,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        overhead_tokens: int | None,
        on_batch: BatchObserver | None,
        more_expected: Callable[[int], bool] | None,
        workers: int,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._on_batch = on_batch
        self.queue: BatchQueue[E, O] | None = None
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"shopsearch-{name}")
        if batching:
            self.queue = BatchQueue(
                name,
                run_batch,
                max_batch_size=max_batch_size,
                max_batch_tokens=max_batch_tokens,
                max_wait_ms=max_wait_ms,
                overhead_tokens=overhead_tokens,
                on_batch=on_batch,
                more_expected=more_expected,
            )

    def submit(self, prepare: Callable[[], Future[R] | tuple[list[E], list[int], Callable[[list[O]], R]]]) -> Future[R]:
        """`prepare()` (on the pool): a finished future (all cache hits), or the cache misses to run
        as (items, token counts, combine(outputs) -> result)."""
        return deferred(self._pool, lambda: self._start(prepare()))

    def _start(self, prepared: Future[R] | tuple[list[E], list[int], Callable[[list[O]], R]]) -> Future[R]:
        if isinstance(prepared, Future):
            return prepared
        items, tokens, combine = prepared
        if self.queue is not None:
            return gather(self.queue.submit(items, tokens), combine)
        started = time.perf_counter()
        try:
            outputs = list(self._run_batch(items))
        finally:
            if self._on_batch is not None:
                self._on_batch(self.name, len(items), time.perf_counter() - started)
        return done(combine(outputs))

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class BatchingEmbedder:
    """Query embeddings through the embedding cache and the shared batching queue."""

    def __init__(
        self,
        inner: _QueryEncoder,
        *,
        cache: LruTtlCache[np.ndarray] | None = None,
        batching: bool = True,
        max_batch_size: int = 32,
        max_batch_tokens: int = 16_384,
        max_wait_ms: float = 3.0,
        on_batch: BatchObserver | None = None,
        more_expected: Callable[[int], bool] | None = None,
        workers: int = 8,
    ) -> None:
        self.inner = inner
        self.model_id = _model_id(inner)
        self.cache = cache
        self._tokenizing = isinstance(inner, TokenizingEncoder)
        self._runner: _Runner[Any, np.ndarray] = _Runner(
            "embed",
            self._run,
            batching=batching,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            max_wait_ms=max_wait_ms,
            overhead_tokens=BATCH_OVERHEAD_TOKENS if self._tokenizing else None,
            on_batch=on_batch,
            more_expected=more_expected,
            workers=workers,
        )

    @property
    def dim(self) -> int:
        return int(self.inner.dim)  # type: ignore[attr-defined]

    def _run(self, items: list[Any]) -> list[np.ndarray]:
        tokenized = self._tokenizing
        vectors = self.inner.embed_encoded(items) if tokenized else self.inner.encode_queries(items)  # type: ignore[attr-defined]
        return list(np.asarray(vectors, dtype=np.float32))

    def submit_queries(self, texts: list[str]) -> Future[np.ndarray]:
        """A future of the queries' vectors (n, dim); cache hits cost no model time."""
        texts = list(texts)
        return self._runner.submit(lambda: self._prepare(texts))

    def _prepare(self, texts: list[str]) -> Any:
        vectors: list[np.ndarray | None] = [None] * len(texts)
        missing: list[int] = []
        for i, text in enumerate(texts):
            cached = _cache_get(self.cache, (self.model_id, text))
            if cached is None:
                missing.append(i)
            else:
                vectors[i] = cached
        if not missing:
            return done(self._stack(vectors))
        todo = [texts[i] for i in missing]
        if self._tokenizing:
            items: list[Any] = self.inner.tokenize_queries(todo)  # type: ignore[attr-defined]
            tokens = [len(e.ids) for e in items]
        else:
            items, tokens = todo, [len(t) for t in todo]

        def combine(computed: list[np.ndarray]) -> np.ndarray:
            for i, vector in zip(missing, computed, strict=True):
                vector.setflags(write=False)  # shared through the cache
                vectors[i] = vector
                _cache_put(self.cache, (self.model_id, texts[i]), vector)
            return self._stack(vectors)

        return items, tokens, combine

    def _stack(self, vectors: list[np.ndarray | None]) -> np.ndarray:
        if not vectors:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack(vectors)  # type: ignore[arg-type]

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self.submit_queries(texts).result()

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        return self.inner.encode_documents(texts)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._runner.close()


class _EncodedLogits:
    """A tokenising reranker's raw logits as a scorer of its own (its own cache keys)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.model_id = f"{_model_id(inner)} (logits)"

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Any]:
        return self.inner.tokenize_pairs(pairs)  # type: ignore[no-any-return]

    def score_encoded(self, encodings: Sequence[Any]) -> np.ndarray:
        return np.asarray(self.inner.logits_encoded(encodings), dtype=np.float32)


class _QueryLogits:
    """Any reranker with `score_logits(query, docs)` as a scorer of raw logits."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.model_id = f"{_model_id(inner)} (logits)"

    def score(self, query: str, docs: list[str]) -> np.ndarray:
        return np.asarray(self.inner.score_logits(query, docs), dtype=np.float32)


def logit_scorer(reranker: Any) -> _PairScorer | None:
    """The reranker's raw logits as a scorer for `BatchingReranker`, or None when it gives none."""
    if callable(getattr(reranker, "logits_encoded", None)) and callable(getattr(reranker, "tokenize_pairs", None)):
        return _EncodedLogits(reranker)
    if callable(getattr(reranker, "score_logits", None)):
        return _QueryLogits(reranker)
    return None


class BatchingReranker:
    """Rerank scores through the rerank-score cache and the shared batching queue. Pairs of different
    requests (different queries) share model calls."""

    def __init__(
        self,
        inner: _PairScorer,
        *,
        cache: LruTtlCache[float] | None = None,
        batching: bool = True,
        max_batch_size: int = 32,
        max_batch_tokens: int = 16_384,
        max_wait_ms: float = 3.0,
        on_batch: BatchObserver | None = None,
        more_expected: Callable[[int], bool] | None = None,
        workers: int = 8,
    ) -> None:
        self.inner = inner
        self.model_id = _model_id(inner)
        self.cache = cache
        self._tokenizing = isinstance(inner, TokenizingScorer)
        self._runner: _Runner[Any, float] = _Runner(
            "rerank",
            self._run,
            batching=batching,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            max_wait_ms=max_wait_ms,
            overhead_tokens=BATCH_OVERHEAD_TOKENS if self._tokenizing else None,
            on_batch=on_batch,
            more_expected=more_expected,
            workers=workers,
        )

    def _run(self, items: list[Any]) -> list[float]:
        if self._tokenizing:
            return [float(s) for s in np.asarray(self.inner.score_encoded(items), dtype=np.float32)]  # type: ignore[attr-defined]
        by_query: dict[str, list[int]] = {}
        for i, (query, _) in enumerate(items):
            by_query.setdefault(query, []).append(i)
        out = [0.0] * len(items)
        for query, idx in by_query.items():
            scores = np.asarray(self.inner.score(query, [items[i][1] for i in idx]), dtype=np.float32)
            for i, s in zip(idx, scores, strict=True):
                out[i] = float(s)
        return out

    def submit_scores(self, query: str, docs: list[str]) -> Future[np.ndarray]:
        """A future of one score per document; cache hits cost no model time."""
        docs = list(docs)
        return self._runner.submit(lambda: self._prepare(query, docs))

    def _prepare(self, query: str, docs: list[str]) -> Any:
        scores: list[float | None] = [None] * len(docs)
        keys = [(self.model_id, query, text_hash(d)) for d in docs]
        missing: list[int] = []
        for i, key in enumerate(keys):
            cached = _cache_get(self.cache, key)
            if cached is None:
                missing.append(i)
            else:
                scores[i] = cached
        if not missing:
            return done(np.asarray(scores, dtype=np.float32))
        pairs = [(query, docs[i]) for i in missing]
        if self._tokenizing:
            items: list[Any] = self.inner.tokenize_pairs(pairs)  # type: ignore[attr-defined]
            tokens = [len(e.ids) for e in items]
        else:
            items, tokens = pairs, [len(q) + len(d) for q, d in pairs]

        def combine(computed: list[float]) -> np.ndarray:
            for i, value in zip(missing, computed, strict=True):
                scores[i] = value
                _cache_put(self.cache, keys[i], value)
            return np.asarray(scores, dtype=np.float32)

        return items, tokens, combine

    def score(self, query: str, docs: list[str]) -> np.ndarray:
        return self.submit_scores(query, docs).result()

    def close(self) -> None:
        self._runner.close()
