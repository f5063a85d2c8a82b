"""The query path, top to bottom: retrieve → fuse → rerank → business score → respond.

Every stage is a small module; this file only wires them and owns the request's time budget.
A stage that fails or runs out of budget is listed in `degraded` and the previous order stands.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from middleware import business, caps, fusion
from middleware.backends.base import Backend
from middleware.budget import Deadline, Stopwatch
from middleware.config import Settings
from middleware.products import Candidate, Filters
from middleware.redaction import redact
from middleware.rerank import PairScorer, QueuedPairScorer, rerank_head
from middleware.retrieve import QueryEncoder, QueuedQueryEncoder, retrieve
from middleware.schema import Explanation, Hit, SearchRequest, SearchResponse

log = logging.getLogger(__name__)


class Pipeline:
    """One search over a backend and optional models. Models that queue their own work (the server's
    shared batches: `QueuedQueryEncoder`, `QueuedPairScorer`) are awaited through their futures; any
    other model call runs on one of the pipeline's stage threads, as do the backend's queries."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        embedder: QueryEncoder | None = None,
        reranker: PairScorer | None = None,
        *,
        gpu: bool = False,
        stage_workers: int = 8,
        owns_backend: bool = True,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.embedder = embedder
        self.reranker = reranker
        self.owns_backend = owns_backend
        # top-K rerank is a GPU job: the full reranker is slow per pair on CPU cores
        self.default_rerank_k = settings.rerank_k if settings.rerank_k is not None else (100 if gpu else 20)
        self._executor = ThreadPoolExecutor(max_workers=stage_workers, thread_name_prefix="shopsearch-stage")

    def with_models(
        self,
        embedder: QueryEncoder | None,
        reranker: PairScorer | None,
        *,
        settings: Settings | None = None,
        stage_workers: int = 8,
    ) -> Pipeline:
        """A pipeline over the same backend and rerank default with other models (e.g. the same models
        behind caches and shared batches) and optionally other settings. It has its own stage threads;
        closing it leaves the backend to this pipeline."""
        derived = Pipeline(
            settings or self.settings,
            self.backend,
            embedder,
            reranker,
            stage_workers=stage_workers,
            owns_backend=False,
        )
        derived.default_rerank_k = self.default_rerank_k
        return derived

    @classmethod
    def from_settings(cls, settings: Settings) -> Pipeline:
        """Load the configured models and open the configured backend."""
        from middleware.backends import open_backend
        from middleware.models import load_embedder, load_reranker

        embedder = load_embedder(settings)
        reranker = load_reranker(settings)
        backend = open_backend(settings, dim=embedder.dim if embedder is not None else None)
        gpu = bool(reranker is not None and getattr(reranker, "device", "cpu") == "cuda")
        return cls(settings, backend, embedder, reranker, gpu=gpu)

    def search(self, req: SearchRequest) -> SearchResponse:
        """Raises CapExceeded (a ValueError naming the parameter) for a request above a configured cap."""
        cfg = self.settings
        caps.check(req, cfg)
        deadline = Deadline(req.deadline_ms or cfg.deadline_ms)
        watch = Stopwatch()
        weights = req.business or cfg.business
        query = req.query.strip()[: cfg.max_query_chars]  # longer text is cut for retrieval and the models
        filters = _with_stock_filter(req.filters, weights.out_of_stock == "filter" and req.business_enabled)
        n = max(req.retrieve_n or cfg.retrieve_n, req.from_ + req.size)

        # 1. retrieve
        found = retrieve(
            backend=self.backend,
            embed_query=self._embed_query if self.embedder is not None else None,
            text=query,
            filters=filters,
            n=n,
            use_bm25=req.retrieval != "vector",
            # without an embedder, hybrid is BM25 alone (configured, not degraded)
            use_knn=req.retrieval == "vector" or (req.retrieval == "hybrid" and self.embedder is not None),
            deadline=deadline,
            executor=self._executor,
            watch=watch,
        )
        degraded = list(found.degraded)

        # 2. fuse
        t = time.perf_counter()
        method = req.fusion or cfg.fusion.method
        if found.fused is not None:
            candidates = found.fused
        elif method == "rrf":
            candidates = fusion.rrf(found.lists, k=cfg.fusion.rrf_k)
        else:
            bm25_w = cfg.fusion.bm25_weight if req.bm25_weight is None else req.bm25_weight
            knn_w = cfg.fusion.knn_weight if req.knn_weight is None else req.knn_weight
            candidates = fusion.minmax(found.lists, {"bm25": bm25_w, "knn": knn_w})
        watch.record("fuse", t)

        # 3. rerank the head
        k = min(self.default_rerank_k if req.rerank_k is None else req.rerank_k, len(candidates))
        reranked = 0
        if req.rerank and k > 0 and self.reranker is not None:  # None: disabled by configuration
            t = time.perf_counter()
            try:
                candidates = rerank_head(
                    candidates,
                    score=self._score,
                    query=query,
                    k=k,
                    deadline=deadline,
                    # leave a sliver of the budget for scoring, paging and the response
                    reserve_s=min(0.05, 0.1 * deadline.budget_s),
                )
                reranked = k
            except Exception as err:  # failure or budget spent: the fused order stands
                log.warning("rerank degraded: %s", redact(str(err)))
                degraded.append("rerank")
            watch.record("rerank", t)

        # 4. business score: within the reranked head, then within the tail (scales differ)
        t = time.perf_counter()
        if req.business_enabled:
            candidates = business.apply(candidates[:reranked], weights) + business.apply(candidates[reranked:], weights)
        watch.record("business", t)

        # 5. page and respond
        page = candidates[req.from_ : req.from_ + req.size]
        hits = [_hit(c, req.explain) for c in page]
        return SearchResponse(
            hits=hits,
            total=len(candidates),
            took_ms=round(deadline.elapsed_ms(), 3),
            timings_ms=watch.timings,
            degraded=degraded,
            reranked=reranked,
        )

    def _embed_query(self, text: str) -> Future:
        assert self.embedder is not None
        if isinstance(self.embedder, QueuedQueryEncoder):
            return self.embedder.submit_queries([text])
        return self._executor.submit(self.embedder.encode_queries, [text])

    def _score(self, query: str, docs: list[str]) -> Future:
        assert self.reranker is not None
        if isinstance(self.reranker, QueuedPairScorer):
            return self.reranker.submit_scores(query, docs)
        return self._executor.submit(self.reranker.score, query, docs)

    async def asearch(self, req: SearchRequest) -> SearchResponse:
        """The same search, off the event loop (model calls and SQLite are blocking)."""
        return await asyncio.to_thread(self.search, req)

    def close(self) -> None:
        """Stop the stage threads; close the backend unless this pipeline borrows it (`with_models`)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.owns_backend:
            self.backend.close()


def _with_stock_filter(filters: Filters | None, only_in_stock: bool) -> Filters | None:
    if not only_in_stock:
        return filters
    base = filters or Filters()
    return base.model_copy(update={"in_stock": True})


def _score(c: Candidate) -> float:
    for value in (c.final, c.rerank, c.fused):
        if value is not None:
            return float(value)
    return 0.0


def _hit(c: Candidate, explain: bool) -> Hit:
    product = c.product.model_dump(mode="json") if c.product is not None else {"id": c.id}
    return Hit(
        id=c.id,
        score=_score(c),
        product=product,
        explain=Explanation(**c.scores(), ranks=dict(c.ranks)) if explain else None,
    )
