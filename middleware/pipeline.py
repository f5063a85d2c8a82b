"""The query path, top to bottom: retrieve → fuse → rerank → business score → rules, collapse → respond.

Every stage is a small module; this file only wires them and owns the request's time budget.
A stage that fails or runs out of budget is listed in `degraded` and the previous order stands.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from middleware import business, caps, fusion, paging, storefront
from middleware import rules as merch
from middleware.backends.base import Backend, MatchSet, SortKey
from middleware.budget import Deadline, Stopwatch
from middleware.config import BusinessSettings, Settings
from middleware.events.model import EventLog
from middleware.events.store import QueryLogger
from middleware.experiments import ExperimentStore, experiments_path
from middleware.products import Candidate, Filters
from middleware.query_expansion import QueryExpander, SynonymStore, synonyms_path
from middleware.redaction import redact
from middleware.rerank import NamedRerankers, PairScorer, QueuedPairScorer, rerank_head
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
        rules: merch.RuleStore | None = None,
        experiments: ExperimentStore | None = None,
        named_rerankers: NamedRerankers | None = None,
        event_log: EventLog | None = None,
    ) -> None:
        """`event_log`: every search is logged there (sampled by `events.query_log_sample_rate`),
        through a background writer that `close` flushes; the log stays the caller's."""
        self.settings = settings
        # merchandising rules: <data_dir>/rules.json, shared by every pipeline over this data directory
        self.rules = rules if rules is not None else merch.RuleStore(merch.rules_path(settings.data_dir))
        # A/B experiments (<data_dir>/experiments.json): applied before a search, by middleware.experiments
        self.experiments = experiments or ExperimentStore(experiments_path(settings.data_dir))
        # the other rerankers a search may name, loaded on first use
        self.named_rerankers = named_rerankers or NamedRerankers(settings.rerankers, _reranker_loader(settings))
        self.backend = backend
        self.embedder = embedder
        self.reranker = reranker
        self.owns_backend = owns_backend
        # top-K rerank is a GPU job: the full reranker is slow per pair on CPU cores
        self.default_rerank_k = settings.rerank_k if settings.rerank_k is not None else (100 if gpu else 20)
        self._executor = ThreadPoolExecutor(max_workers=stage_workers, thread_name_prefix="shopsearch-stage")
        self.expander = QueryExpander(backend, SynonymStore(synonyms_path(settings)), typos=settings.typo_tolerance)
        self.query_log = QueryLogger(event_log, settings.events, owns_store=False) if event_log is not None else None

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
            rules=self.rules,
            experiments=self.experiments,
            named_rerankers=self.named_rerankers,
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
        query = (req.query or "").strip()[: cfg.max_query_chars]  # longer text is cut for retrieval and the models
        filters = _with_stock_filter(req.filters, weights.out_of_stock == "filter" and req.business_enabled)
        sort = paging.parse_sort(req.sort)
        if not query and (req.filters is None or req.filters.is_empty()):
            raise paging.InvalidRequest("give a query, or filters to browse (e.g. a category) without one", "query")
        if req.reranker is not None and req.reranker not in cfg.rerankers:
            known = ", ".join(sorted(cfg.rerankers)) or "none configured (settings.rerankers)"
            raise paging.InvalidRequest(f"no reranker named {req.reranker!r} (named rerankers: {known})", "reranker")
        if req.search_after is not None and req.from_:
            raise paging.InvalidRequest("give either search_after or from, not both", "search_after")
        default_order = not sort or (query and [(k.field, k.descending) for k in sort] == [("_score", True)])
        if req.collapse and not (query and default_order):
            raise paging.InvalidRequest("collapse applies to a query's ranked order (no sort, no browse)", "collapse")
        parts = _order_parts(req, query, filters, weights, sort if not default_order else [])
        if req.rules or req.collapse:
            parts["merchandising"] = [self.rules.version() if req.rules else None, req.collapse]
        key = paging.query_key(parts)
        mark: str | None = None
        cursor = paging.Cursor(position=req.from_, listing_offset=0)
        if req.search_after is not None:
            mark = paging.store_mark(self.backend.stats())
            cursor = paging.decode_cursor(req.search_after, key, mark)

        degraded: list[str] = []
        reranked = 0
        floor: float | None = None
        shaped = Merchandised()
        if not query:  # a category page: the business order, or the requested one
            ruled = self._page_rules(req, query, filters, watch, degraded, pins=not sort)
            match, shaped = ruled.restrict(MatchSet(text=None, filters=filters)), ruled.shaped
            if sort:
                page, listing_offset = self._sorted_page(match, sort, cursor.position, req.size)
            else:
                page = self._pinned_browse(match, weights, req.business_enabled, cursor.position, req.size, ruled.pins)
                listing_offset = 0
        else:
            head, match, floor, degraded, reranked = self._ranked_head(req, query, filters, weights, deadline, watch)
            if default_order:
                head, shaped = self._merchandise(req, query, filters, head, watch, degraded)
                page, listing_offset = self._ranked_page(head, match, cursor, req.size, shaped)
            else:
                ruled = self._page_rules(req, query, filters, watch, degraded, pins=False)
                match, shaped = ruled.restrict(match), ruled.shaped
                page, listing_offset = self._sorted_page(match, sort, cursor.position, req.size)

        facets_future = self._start_facets(req, match, deadline)  # over the same match set as the total
        t = time.perf_counter()
        if req.track_total_hits is False:
            total, relation = cursor.position + len(page), "gte"
        else:
            total, relation = paging.capped_total(self.backend.count_matches(match), req.track_total_hits)
        watch.record("count", t)

        next_cursor = None
        reached = cursor.position + len(page)
        if page and len(page) == req.size and (relation == "gte" or reached < total):
            mark = mark or paging.store_mark(self.backend.stats())
            next_cursor = paging.encode_cursor(key, mark, paging.Cursor(reached, listing_offset))
        hits = [_hit(c, req.explain, floor, shaped) for c in page]

        # storefront: highlighted fragments of the page, and the facets
        self._highlight(req, query, hits, watch, degraded)
        facets = self._facets(facets_future, deadline, watch, degraded)
        resp = SearchResponse(
            hits=hits,
            total=total,
            relation=relation,
            next_cursor=next_cursor,
            took_ms=round(deadline.elapsed_ms(), 3),
            timings_ms=watch.timings,
            degraded=degraded,
            reranked=reranked,
            facets=facets,
            rules_report=shaped.report,
            query_id=uuid.uuid4().hex,
            experiment=req._exposure.experiment if req._exposure is not None else None,
            variant=req._exposure.variant if req._exposure is not None else None,
        )
        resp._match = match
        if self.query_log is not None:
            self.query_log.record(req, resp)
        return resp

    def _ranked_head(
        self,
        req: SearchRequest,
        query: str,
        filters: Filters | None,
        weights: BusinessSettings,
        deadline: Deadline,
        watch: Stopwatch,
    ) -> tuple[list[Candidate], MatchSet, float | None, list[str], int]:
        """The reranked, business-scored head of a query; the match set it heads; the kNN floor applied."""
        cfg = self.settings
        use_bm25 = req.retrieval != "vector"
        # 1. retrieve (the same head on every page: pages past it continue with the lexical tail)
        found = retrieve(
            backend=self.backend,
            embed_query=self._embed_query if self.embedder is not None else None,
            text=query,
            filters=filters,
            n=req.retrieve_n or cfg.retrieve_n,
            use_bm25=use_bm25,
            # without an embedder, hybrid is BM25 alone (configured, not degraded)
            use_knn=req.retrieval == "vector" or (req.retrieval == "hybrid" and self.embedder is not None),
            deadline=deadline,
            executor=self._executor,
            watch=watch,
            expand=self.expander.expand,
            # a request's own fusion (an A/B variant's, say) is not the backend's configured one
            server_fusion=all(v is None for v in (req.fusion, req.bm25_weight, req.knn_weight, req.rrf_k)),
        )
        degraded = list(found.degraded)

        # vector hits match only above the floor; lexical hits always do
        floor = paging.knn_floor(cfg.knn_floor, cfg.embedder)
        scale = paging.knn_score_scale(self.backend)
        threshold = None
        if found.fused is not None:
            # the server's fused hits do not say why they matched: the lexical ones are asked for by id,
            # the vector ones are the kNN hits above the floor (one more kNN query, for their scores)
            assert found.vector is not None
            knn_hits = self.backend.knn(found.vector, filters, req.retrieve_n or cfg.retrieve_n)
            kept, threshold = paging.above_floor(knn_hits, floor, scale)
            ids = [c.id for c in found.fused if c.bm25 is None]
            lexical = {c.id for c in found.fused if c.bm25 is not None}
            lexical |= self._lexical_ids(found.lexical_text, filters, ids)
            similarity = {c.id: c.knn for c in kept}
            fused = [c for c in found.fused if c.id in lexical or c.id in similarity]
            for cand in fused:
                cand.knn = similarity.get(cand.id, cand.knn)
            vector_ids = tuple(c.id for c in fused if c.id not in lexical)
        else:
            kept, threshold = paging.above_floor(found.lists.get("knn", []), floor, scale)
            if "knn" in found.lists:
                found.lists["knn"] = kept
            vector_ids = tuple(c.id for c in kept)
        match = MatchSet(text=found.lexical_text if use_bm25 else "", filters=filters, ids=vector_ids)

        # 2. fuse
        t = time.perf_counter()
        method = req.fusion or cfg.fusion.method
        if found.fused is not None:
            candidates = fused
        elif method == "rrf":
            rrf_weights = {"bm25": cfg.fusion.rrf_bm25_weight, "knn": cfg.fusion.rrf_knn_weight}
            candidates = fusion.rrf(found.lists, k=req.rrf_k or cfg.fusion.rrf_k, weights=rrf_weights)
        else:
            bm25_w = cfg.fusion.bm25_weight if req.bm25_weight is None else req.bm25_weight
            knn_w = cfg.fusion.knn_weight if req.knn_weight is None else req.knn_weight
            candidates = fusion.minmax(found.lists, {"bm25": bm25_w, "knn": knn_w})
        watch.record("fuse", t)

        # 3. rerank the head (with the configured reranker, or the one the request names)
        k = min(self.default_rerank_k if req.rerank_k is None else req.rerank_k, len(candidates))
        reranked = 0
        # None: disabled by configuration
        if req.rerank and k > 0 and (self.reranker is not None or req.reranker is not None):
            t = time.perf_counter()
            try:
                scorer = self.reranker if req.reranker is None else self.named_rerankers.get(req.reranker)
                candidates = rerank_head(
                    candidates,
                    score=lambda q, docs: self._score(scorer, q, docs),
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
        return candidates, match, threshold, degraded, reranked

    def _lexical_ids(self, query: str, filters: Filters | None, ids: list[str]) -> set[str]:
        """Which of `ids` match `query` lexically under the filters."""
        if not ids:
            return set()
        restricted = (filters or Filters()).model_copy(update={"ids": ids})
        return {c.id for c in self.backend.listing(MatchSet(text=query, filters=restricted), [], 0, len(ids))}

    # 5. merchandising rules, then collapse: after business scoring, on the ranked head, before paging
    def _merchandise(
        self,
        req: SearchRequest,
        query: str,
        filters: Filters | None,
        head: list[Candidate],
        watch: Stopwatch,
        degraded: list[str],
    ) -> tuple[list[Candidate], Merchandised]:
        shaped = Merchandised()
        t = time.perf_counter()
        fired: list[merch.Rule] = []
        try:
            fired = merch.matching(self.rules.all(), query, req.filters) if req.rules else []
            if fired:
                outcome = merch.apply(head, fired, filters, self.backend.get)
                head, shaped.actions, shaped.hidden = outcome.candidates, outcome.actions, frozenset(outcome.hidden)
                shaped.report = outcome.report()
        except Exception as err:  # an unreadable rules file or a failed pin fetch: the business order stands
            log.warning("rules degraded: %s", redact(str(err)))
            degraded.append("rules")
        if req.collapse:
            head, shaped.variants = merch.collapse(head)
            shaped.families = frozenset(merch.family(c) for c in head)
        if fired or req.collapse:
            watch.record("rules", t)
        return head, shaped

    def _page_rules(
        self,
        req: SearchRequest,
        query: str,
        filters: Filters | None,
        watch: Stopwatch,
        degraded: list[str],
        *,
        pins: bool,
    ) -> PageRules:
        """The rules of a category page (pins: True) or of a sorted page (pins: False). Such a page keeps
        its order (the business order, or the one asked for): hide leaves products out (not counted
        either); on a category page pins place products at their positions; boost and bury, which
        reorder a query's ranked results, do not apply, nor pins on a sorted page. The report names
        what was not applied and why."""
        out = PageRules()
        if not req.rules:
            return out
        t = time.perf_counter()
        try:
            fired = merch.matching(self.rules.all(), query, req.filters)
            if not fired:
                return out
            hidden: set[str] = set().union(*(r.hide for r in fired))
            not_applied: list[dict[str, str]] = []
            for rule in fired:
                for action in ("boost", "bury", "pin"):
                    if getattr(rule, action) and (action != "pin" or not pins):
                        reason = (
                            "a sorted page keeps the order asked for"
                            if action == "pin" or req.sort
                            else "boost and bury reorder a query's ranked results; a category page keeps "
                            "the business order"
                        )
                        not_applied.append({"rule": rule.id, "action": action, "reason": reason})
            missing: list[dict[str, str]] = []
            actions: dict[str, list[str]] = {}
            if pins:
                wanted = sorted(((p, r) for r in fired for p in r.pin), key=lambda pr: pr[0].position)
                found = {p.id: p for p in self.backend.get(list(dict.fromkeys(p.id for p, _ in wanted)))}
                for pin, rule in wanted:
                    if pin.id in actions:
                        continue
                    product = found.get(pin.id)
                    if product is None or (filters is not None and not filters.matches(product)):
                        why = "no such product" if product is None else "excluded by the request's filters"
                        missing.append({"rule": rule.id, "id": pin.id, "reason": why})
                        continue
                    out.pins.append((pin.position, Candidate(id=product.id, product=product)))
                    actions[pin.id] = [f"pin:{rule.id} position {pin.position}"]
                hidden -= set(actions)  # a pin wins over a hide
            out.hidden = hidden
            report = {"applied": [r.id for r in fired], "missing_pins": missing, "not_applied": not_applied}
            out.shaped = Merchandised(actions=actions, hidden=frozenset(hidden), report=report)
        except Exception as err:  # an unreadable rules file or a failed pin fetch: the page as it is
            log.warning("rules degraded: %s", redact(str(err)))
            degraded.append("rules")
            return PageRules()
        watch.record("rules", t)
        return out

    def _pinned_browse(
        self,
        match: MatchSet,
        weights: BusinessSettings,
        enabled: bool,
        position: int,
        size: int,
        pins: list[tuple[int, Candidate]],
    ) -> list[Candidate]:
        """Positions [position, + size) of the category page with the pinned products at their
        positions (one past the end lands at the end) and the rest in the business order."""
        if not pins:
            return self._business_browse(match, match.filters, weights, enabled, position, size)
        rest = _excluding(match.filters, [c.id for _, c in pins])
        rest_match = MatchSet(text=None, filters=rest)
        remaining = self.backend.count_matches(rest_match)
        placed: list[tuple[int, Candidate]] = []  # final index, product: later pins push earlier ones down
        for wanted, cand in pins:
            at = min(wanted - 1, remaining + len(placed))
            placed = [(i + 1 if i >= at else i, c) for i, c in placed] + [(at, cand)]
        where = dict(placed)
        before = sum(1 for i in where if i < position)
        inside = sum(1 for i in where if position <= i < position + size)
        others = iter(self._business_browse(rest_match, rest, weights, enabled, position - before, size - inside))
        page = []
        for i in range(position, position + size):
            cand = where.get(i) or next(others, None)
            if cand is not None:
                page.append(cand)
        return page

    def _ranked_page(
        self, head: list[Candidate], match: MatchSet, cursor: paging.Cursor, size: int, shaped: Merchandised
    ) -> tuple[list[Candidate], int]:
        """Positions [cursor.position, + size) of head-then-lexical-tail; the tail's resume offset.
        The tail leaves out hidden products and, collapsed, the families the head already shows."""
        page = head[cursor.position : cursor.position + size]
        offset = cursor.listing_offset
        if len(page) < size and match.text:
            skip = max(0, cursor.position - len(head)) if offset == 0 else 0
            seen = frozenset(c.id for c in head) | shaped.hidden
            tail = paging.walk(self.backend, match, paging.SCORE_ORDER, offset, seen)
            if shaped.families is not None:
                tail = ((o, c) for o, c in tail if merch.family(c) not in shaped.families)
            for offset, cand in tail:  # noqa: B007 (the offset after the last row taken resumes the walk)
                if skip:
                    skip -= 1
                    continue
                page.append(cand)
                if len(page) == size:
                    break
        return page, offset

    def _sorted_page(
        self, match: MatchSet, sort: list[SortKey], position: int, size: int
    ) -> tuple[list[Candidate], int]:
        page = self.backend.listing(match, sort, position, size) if size else []
        return page, 0

    def _business_browse(
        self,
        match: MatchSet,
        filters: Filters | None,
        weights: BusinessSettings,
        enabled: bool,
        position: int,
        size: int,
    ) -> list[Candidate]:
        """A category page by business score: every product is equally relevant here, so the score is
        business.py's sales bonus (smoothed, scaled to the category's best) less the out-of-stock
        penalty. In-stock and out-of-stock products each come by sales; merged by score, ties by id."""
        by_sales = [SortKey("sales", descending=True)]
        if not enabled or size == 0:
            return self.backend.listing(match, by_sales, position, size)
        top = self.backend.listing(match, by_sales, 0, 1)
        max_sales = top[0].product.sales if top and top[0].product is not None else 0
        prior = weights.sales_prior
        scale = math.log1p(max_sales + prior)
        band = weights.margin * weights.w_sales
        penalty = weights.margin * weights.out_of_stock_penalty

        def scored(rows: Iterator[tuple[int, Candidate]]) -> Iterator[Candidate]:
            for _, cand in rows:
                product = cand.product
                sales_term = math.log1p(product.sales + prior) / scale if product is not None and scale > 0 else 0.0
                cand.sales_bonus = band * sales_term
                cand.stock_penalty = 0.0 if product is None or product.in_stock else penalty
                cand.business = cand.sales_bonus - cand.stock_penalty
                cand.final = cand.business
                yield cand

        in_stock = MatchSet(text=None, filters=_with_stock_filter(filters, True))
        streams = [scored(paging.walk(self.backend, in_stock, by_sales))]
        if not (filters is not None and filters.in_stock):
            rest = paging.walk(self.backend, match, by_sales)
            streams.append(scored((o, c) for o, c in rest if c.product is not None and not c.product.in_stock))
        merged = heapq.merge(*streams, key=lambda c: (-(c.final or 0.0), c.id))
        return list(itertools.islice(merged, position, position + size))

    def _start_facets(self, req: SearchRequest, match: MatchSet, deadline: Deadline) -> Future | None:
        plan = storefront.facet_plan(req.facets)
        if not plan:
            return None

        def count() -> tuple[dict, float]:
            t = time.perf_counter()
            found = storefront.compute_facets(
                self.backend, match, plan, disjunctive=req.disjunctive_facets, deadline=deadline
            )
            return found, t

        return self._executor.submit(count)

    def _facets(self, future: Future | None, deadline: Deadline, watch: Stopwatch, degraded: list[str]) -> dict | None:
        """The facets once counted, or none (degraded) when counting fails or outlasts the request's
        budget: counts are whole or absent, never partial."""
        if future is None:
            return None
        try:
            found, started = deadline.wait(future, reserve_s=min(0.005, 0.05 * deadline.budget_s))
        except Exception as err:  # the hits still answer; the shopper sees no counts
            log.warning("facets degraded: %s", redact(str(err)))
            degraded.append("facets")
            return None
        watch.record("facets", started)  # from when counting began to when the response took them
        return found

    def _highlight(
        self, req: SearchRequest, query: str, hits: list[Hit], watch: Stopwatch, degraded: list[str]
    ) -> None:
        plan = storefront.highlight_plan(req.highlight)
        if plan is None or not hits:
            return
        t = time.perf_counter()
        try:
            found = self.backend.highlight(query, [h.id for h in hits], plan[1], plan[0])
        except Exception as err:  # hits without fragments; the titles are still there
            log.warning("highlight degraded: %s", redact(str(err)))
            degraded.append("highlight")
            return
        finally:
            watch.record("highlight", t)
        for hit in hits:
            hit.highlight = found.get(hit.id)

    def _embed_query(self, text: str) -> Future:
        assert self.embedder is not None
        if isinstance(self.embedder, QueuedQueryEncoder):
            return self.embedder.submit_queries([text])
        return self._executor.submit(self.embedder.encode_queries, [text])

    def _score(self, reranker: PairScorer | None, query: str, docs: list[str]) -> Future:
        assert reranker is not None
        if isinstance(reranker, QueuedPairScorer):
            return reranker.submit_scores(query, docs)
        return self._executor.submit(reranker.score, query, docs)

    async def asearch(self, req: SearchRequest) -> SearchResponse:
        """The same search, off the event loop (model calls and SQLite are blocking)."""
        return await asyncio.to_thread(self.search, req)

    def close(self) -> None:
        """Stop the stage threads; close the backend unless this pipeline borrows it (`with_models`)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.query_log is not None:
            self.query_log.close()
        if self.owns_backend:
            self.backend.close()
            self.named_rerankers.close()


@dataclass
class Merchandised:
    """What the rules and collapse stage did: per-hit actions and variant counts, the report, hidden ids."""

    actions: dict[str, list[str]] = field(default_factory=dict)
    variants: dict[str, int] = field(default_factory=dict)
    hidden: frozenset[str] = frozenset()
    families: frozenset[str] | None = None  # collapsed: the families the head shows
    report: dict | None = None


def _reranker_loader(settings: Settings):  # -> Callable[[str], PairScorer | None]
    def load(spec: str) -> PairScorer | None:
        from middleware.models import load_reranker

        return load_reranker(settings.model_copy(update={"reranker": spec}))

    return load


@dataclass
class PageRules:
    """The rules of a category or sorted page: products left out, products pinned (1-based position)."""

    hidden: set[str] = field(default_factory=set)
    pins: list[tuple[int, Candidate]] = field(default_factory=list)
    shaped: Merchandised = field(default_factory=Merchandised)

    def restrict(self, match: MatchSet) -> MatchSet:
        """The match set without the hidden products (so totals and facets leave them out too)."""
        if not self.hidden:
            return match
        return MatchSet(match.text, _excluding(match.filters, sorted(self.hidden)), match.ids)


def _excluding(filters: Filters | None, ids: list[str]) -> Filters | None:
    if not ids:
        return filters
    base = filters or Filters()
    return base.model_copy(update={"exclude": [*(base.exclude or ()), Filters(ids=ids)]})


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


def _order_parts(
    req: SearchRequest, query: str, filters: Filters | None, weights: BusinessSettings, sort: list[SortKey]
) -> dict[str, object]:
    """What decides a query's order (not the page): a cursor is valid only for the same parts."""
    return {
        "query": query,
        "filters": filters.model_dump(mode="json") if filters is not None else None,
        "sort": [(k.field, k.descending) for k in sort],
        "request": req.model_dump(
            mode="json",
            include={
                "retrieval",
                "fusion",
                "bm25_weight",
                "knn_weight",
                "rrf_k",
                "retrieve_n",
                "rerank",
                "rerank_k",
                "reranker",
            },
        ),
        "business": weights.model_dump(mode="json") if req.business_enabled else None,
    }


def _hit(c: Candidate, explain: bool, floor: float | None = None, shaped: Merchandised | None = None) -> Hit:
    product = c.product.model_dump(mode="json") if c.product is not None else {"id": c.id}
    actions = shaped.actions.get(c.id) if shaped is not None else None
    variants = shaped.variants.get(c.id) if shaped is not None and shaped.families is not None else None
    return Hit(
        id=c.id,
        score=_score(c),
        product=product,
        explain=Explanation(**c.scores(), ranks=dict(c.ranks), knn_floor=floor, rules=actions) if explain else None,
        variants=variants,
    )
