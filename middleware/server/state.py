"""What every request handler shares, built once per app: settings, the pipeline over batching model
wrappers, the in-flight limit, metrics and the upstream cluster."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request

from middleware.backends.base import BackendError
from middleware.caps import CapExceeded
from middleware.config import Settings
from middleware.events.store import QueryLogger
from middleware.pipeline import Pipeline
from middleware.schema import SearchRequest, SearchResponse
from middleware.server.batching import BatchingEmbedder, BatchingReranker, logit_scorer
from middleware.server.caches import LruTtlCache
from middleware.server.errors import ApiError, redact
from middleware.server.limits import InflightLimiter, RateLimiter, capped_deadline_ms, queue_full
from middleware.server.metrics import ServiceMetrics
from middleware.server.upstream import Upstream
from middleware.storefront import PopularQueries

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelService:
    """The models behind caches and shared batches, the in-flight limit and metrics: all a models-only
    server has, and the part of every service that answers model calls."""

    def __init__(self, settings: Settings, embedder: Any, reranker: Any, *, owns_models: bool) -> None:
        srv = settings.server
        self.settings = settings
        self.owns_models = owns_models
        self.metrics = ServiceMetrics()
        self.limiter = InflightLimiter(srv.max_queue)
        self.embedder: BatchingEmbedder | None = None
        self.reranker: BatchingReranker | None = None
        self.logit_reranker: BatchingReranker | None = None  # TEI's raw_scores, batched and cached too
        batching: dict[str, Any] = {
            "batching": srv.batching_enabled,
            "max_batch_size": srv.batch_max_size,
            "max_batch_tokens": srv.batch_max_tokens,
            "max_wait_ms": srv.batch_max_wait_ms,
            "on_batch": self.metrics.observe_batch,
            "more_expected": self._more_expected,
            "workers": srv.max_queue,
        }
        if embedder is not None:
            cache = LruTtlCache("embedding", srv.embedding_cache_size, srv.cache_ttl_s, self.metrics.observe_cache)
            self.embedder = BatchingEmbedder(embedder, cache=cache, **batching)
        if reranker is not None:
            cache = LruTtlCache("rerank", srv.rerank_cache_size, srv.cache_ttl_s, self.metrics.observe_cache)
            self.reranker = BatchingReranker(reranker, cache=cache, **batching)
            logits = logit_scorer(reranker)
            if logits is not None:
                self.logit_reranker = BatchingReranker(logits, cache=cache, **batching)
        self.executor = ThreadPoolExecutor(max_workers=srv.max_queue + 4, thread_name_prefix="shopsearch-req")
        self.started = time.time()

    def _more_expected(self, callers_waiting: int) -> bool:
        # admitted requests not yet waiting in this batcher may still join its batch
        return self.limiter.in_flight > callers_waiting

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close_models(self) -> None:
        """The batchers and the request threads; the models themselves when this service loaded them."""
        for wrapper in (self.embedder, self.reranker, self.logit_reranker):
            if wrapper is not None:
                wrapper.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.owns_models:
            for wrapper in (self.embedder, self.reranker):
                close = getattr(wrapper.inner, "close", None) if wrapper is not None else None
                if callable(close):
                    close()

    async def close(self) -> None:
        self.close_models()

    async def admitted(
        self, fn: Callable[..., T], *args: Any, bounded: bool = True, deadline_ms: float | None = None
    ) -> T:
        """Run blocking work if a slot is free, else 429 at once.

        bounded: answer 504 once the default deadline has passed (writes are not bounded). The slot is
        held until the work really ends, even when the caller has given up: threads stay bounded too.
        """
        if not self.limiter.try_acquire():
            self.metrics.rejected.labels("queue_full").inc()
            raise queue_full()
        self.metrics.in_flight.inc()
        work = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

        def release(_: asyncio.Future[Any]) -> None:
            self.limiter.release()
            self.metrics.in_flight.dec()

        work.add_done_callback(release)
        timeout_s = capped_deadline_ms(self.settings, deadline_ms) / 1000.0
        try:
            if not bounded:
                return await work
            # a search bounds itself (the pipeline's deadline); the margin only covers the thread hop
            return await asyncio.wait_for(asyncio.shield(work), timeout=timeout_s + 1.0)
        except TimeoutError:
            self.metrics.rejected.labels("deadline").inc()
            raise ApiError(
                504, f"no answer within the deadline ({timeout_s * 1000:.0f} ms)", os_type="timeout_exception"
            ) from None
        except BackendError as err:  # every route (search, _count, _doc, products…): 503, never a bare 500
            self.metrics.rejected.labels("backend_unavailable").inc()
            raise ApiError(
                503,
                f"search backend unavailable: {redact(str(err))}",
                os_type="unavailable_exception",
                headers={"Retry-After": "1"},
            ) from None


class ServiceState(ModelService):
    """Everything a request handler needs, built once per app."""

    def __init__(self, settings: Settings, base: Pipeline, *, owns_pipeline: bool) -> None:
        super().__init__(settings, base.embedder, base.reranker, owns_models=False)
        srv = settings.server
        self.base = base
        self.owns_pipeline = owns_pipeline
        # `settings` govern the service's searches, its query cut included; model calls wait in the
        # batching queues, not on stage threads: a search holds at most two (its BM25 and kNN queries)
        self.pipeline = base.with_models(
            self.embedder,
            self.reranker,
            settings=settings.model_copy(update={"max_query_chars": srv.max_query_chars}),
            stage_workers=2 * srv.max_queue + 4,
        )
        self.upstream = Upstream.from_settings(settings, self.metrics)
        self.popular = PopularQueries()  # autocomplete's past queries: this process's, bounded
        # the learning loop's log: the library pipeline's own when it has one, else the configured one
        self.owns_query_log = base.query_log is None and settings.events.enabled
        self.query_log: QueryLogger | None = (
            QueryLogger.open(settings) if self.owns_query_log else base.query_log if settings.events.enabled else None
        )
        self.event_limiter = RateLimiter(settings.events.rate_limit_events_per_s, settings.events.rate_limit_burst)

    def _record(self, req: SearchRequest, resp: SearchResponse) -> None:
        if req.query and resp.total > 0 and req.from_ == 0:  # a query that found something, once (its first page)
            self.popular.record(req.query)
        if self.query_log is not None:
            self.query_log.record(req, resp)

    async def search(
        self, req: SearchRequest, *, served: bool = True, query_id: str | None = None, user_query: str | None = None
    ) -> SearchResponse:
        """`served`: the response is what the client is shown (logged, counted for autocomplete);
        False for the searches behind a proxy answer's aggregations and counts. `query_id`: the
        client's own id for this search (OpenSearch UBI's `ext.ubi.query_id`), instead of a new one;
        `user_query`: the shopper's text, logged instead of the request's when given."""
        try:
            resp = await self.admitted(self.pipeline.search, req, deadline_ms=req.deadline_ms)
        except CapExceeded as err:  # a request above a cap (the routes check first; this is the backstop)
            raise ApiError(400, str(err), param=err.param) from None
        except ValueError as err:  # a request the configuration cannot answer (e.g. vector without embedder)
            raise ApiError(400, str(err), param=getattr(err, "param", None)) from None
        self.metrics.observe_search(resp.timings_ms, resp.degraded)
        if query_id is not None:
            resp.query_id = query_id
        if served:
            self._record(req if user_query is None else req.model_copy(update={"query": user_query}), resp)
        return resp

    def warm_up(self) -> None:
        """One search before taking traffic: the first one pays for lazy loads (jieba's dictionary,
        onnxruntime's first run, the vector index) and would otherwise spend a real request's budget."""
        started = time.perf_counter()
        try:
            warm = SearchRequest(query="warm up 预热", size=1, deadline_ms=self.settings.max_deadline_ms)
            self.pipeline.search(warm)
        except Exception as err:  # an empty or unreachable store still serves health and errors
            log.warning("warm-up search failed: %s", redact(str(err)))
        log.info("warm-up search took %.0f ms", (time.perf_counter() - started) * 1000.0)

    async def close(self) -> None:
        if self.owns_query_log and self.query_log is not None:
            await asyncio.to_thread(self.query_log.close)  # flush what is queued
        self.close_models()
        self.pipeline.close()  # its stage threads; the backend stays with the base pipeline
        if self.upstream is not None:
            await self.upstream.aclose()
        if self.owns_pipeline:
            self.base.close()


def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "service", None)
    if state is None:
        raise ApiError(503, "service is starting: models and backend not loaded yet", headers={"Retry-After": "1"})
    return state
