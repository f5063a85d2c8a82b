"""OpenSearch backend: the Backend Protocol over a versioned index behind read/write aliases.

Request bodies come from `opensearch_bodies` (pure, contract-tested against the API spec); the client
and its error translation from `opensearch_client`; cluster administration (templates, the startup
check, the zero-downtime rebuild) lives in `opensearch_admin`. This module owns the reads, the bulk
writes (`streaming_bulk`, 429 retries), the first index's creation, and the embedder binding kept in
the index mapping's `_meta`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np
import opensearchpy
from opensearchpy import helpers
from rapidfuzz.distance import OSA

from middleware.backends import opensearch_bodies as bodies
from middleware.backends.base import (
    BackendError,
    EmbedderBinding,
    EmbedderMismatch,
    Facet,
    FacetRange,
    FacetSpec,
    FacetStats,
    FacetValue,
    HighlightTags,
    MatchSet,
    SortKey,
    StoreStats,
    TermCount,
    check_highlight_fields,
)
from middleware.backends.opensearch_client import make_client, translate_errors
from middleware.config import FusionSettings, OpenSearchSettings
from middleware.products import Candidate, Filters, Product, SignalUpdate

if TYPE_CHECKING:
    from middleware.config import Settings

log = logging.getLogger(__name__)

ANALYZER_PLUGINS = {"smartcn": "analysis-smartcn", "ik_smart": "analysis-ik"}
_PROBE_TEXT = "红色连衣裙 red dress"
FORCE_MERGE_TIMEOUT_S = 3600  # the call returns when the merge is done, not the client's usual timeout


# ---------------------------------------------------------------- bulk report


@dataclass
class BulkReport:
    ok: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    not_found: list[str] = field(default_factory=list)
    results: dict[str, int] = field(default_factory=dict)  # "created"/"updated"/"deleted"/... counts

    def merge(self, other: BulkReport) -> None:
        self.ok += other.ok
        self.errors += other.errors
        self.not_found += other.not_found
        for outcome, n in other.results.items():
            self.results[outcome] = self.results.get(outcome, 0) + n

    def summary(self, limit: int = 5) -> str:
        head = "; ".join(f"{i}: {r}" for i, r in self.errors[:limit])
        more = f" (+{len(self.errors) - limit} more)" if len(self.errors) > limit else ""
        return f"{len(self.errors)} failed: {head}{more}"


# ---------------------------------------------------------------- hits


def _hits(response: dict[str, Any]) -> list[dict[str, Any]]:
    return response.get("hits", {}).get("hits", [])


def candidates_from_hits(response: dict[str, Any], stage: str) -> list[Candidate]:
    """Hits → Candidates with the stage score and 1-based rank set (`stage`: bm25 | knn | fused)."""
    out: list[Candidate] = []
    for rank, hit in enumerate(_hits(response), start=1):
        product = Product.model_validate(hit["_source"]) if hit.get("_source") else None
        cand = Candidate(id=str(hit["_id"]), product=product)
        setattr(cand, stage, float(hit.get("_score") or 0.0))
        cand.ranks[stage] = rank
        out.append(cand)
    return out


def products_from_mget(response: dict[str, Any]) -> list[Product]:
    return [Product.model_validate(d["_source"]) for d in response.get("docs", []) if d.get("found")]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


_VERSION_RE = re.compile(r"-v(\d+)$")


# ---------------------------------------------------------------- the backend


class OpenSearchBackend:
    """Backend Protocol on OpenSearch. Reads go to the read alias, writes to the write alias."""

    knn_score_scale = "opensearch_innerproduct"  # kNN scores: 1 + d for a dot product d >= 0 (middleware.paging)

    def __init__(
        self,
        client: opensearchpy.OpenSearch,
        cfg: OpenSearchSettings,
        *,
        dim: int | None = None,
        fusion: FusionSettings | None = None,
    ) -> None:
        self.client = client
        self.cfg = cfg
        self.dim = dim
        self.fusion = fusion or FusionSettings()
        self.read_alias = bodies.read_alias(cfg)
        self.write_alias = bodies.write_alias(cfg)
        self._word_analyzer: str | None = None
        self._has_write_alias = False
        self._binding: EmbedderBinding | None = None  # recorded in the first index this backend creates
        self._max_result_window: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, dim: int | None = None) -> OpenSearchBackend:
        cfg = settings.opensearch
        return cls(make_client(cfg), cfg, dim=dim, fusion=settings.fusion)

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        return translate_errors(self.cfg, action)

    # ------------------------------------------------------------ analyzers

    def analyzer_available(self, analyzer: str) -> bool:
        with self._errors("_analyze"):
            try:
                tokens = self.client.indices.analyze(body=bodies.analyze(analyzer, _PROBE_TEXT))
            except opensearchpy.RequestError:
                return False  # "failed to find global analyzer"
        return bool(tokens.get("tokens"))

    @property
    def word_analyzer(self) -> str:
        """The words analyzer: the configured one (verified), or for "auto" the first the cluster has."""
        if self._word_analyzer is None:
            wanted = self.cfg.word_analyzer
            if wanted == "auto":
                self._word_analyzer = next((a for a in bodies.WORD_ANALYZERS if self.analyzer_available(a)), "standard")
            elif self.analyzer_available(wanted):
                self._word_analyzer = wanted
            else:
                plugin = ANALYZER_PLUGINS.get(wanted, wanted)
                raise BackendError(
                    f"word analyzer {wanted!r} is not available on the cluster: install the {plugin} plugin "
                    "or set SHOPSEARCH_OPENSEARCH__WORD_ANALYZER=auto (or standard)"
                )
        return self._word_analyzer

    # ------------------------------------------------------------ index lifecycle

    def alias_indexes(self, alias: str) -> list[str]:
        with self._errors(f"get alias {alias}"):
            try:
                return sorted(self.client.indices.get_alias(name=alias).keys())
            except opensearchpy.NotFoundError:
                return []

    def versioned_indexes(self) -> list[str]:
        with self._errors("list indexes"):
            try:
                names = self.client.indices.get(index=bodies.index_pattern(self.cfg)).keys()
            except opensearchpy.NotFoundError:
                return []
        return sorted((n for n in names if _VERSION_RE.search(n)), key=lambda n: int(_VERSION_RE.search(n)[1]))

    def next_index(self) -> str:
        versions = [int(_VERSION_RE.search(n)[1]) for n in self.versioned_indexes()]
        return bodies.index_name(self.cfg, max(versions, default=0) + 1)

    def ensure_index(self) -> None:
        """The first write creates `<prefix>-v1` with both aliases if the write alias is missing."""
        if self._has_write_alias:
            return
        if not self.alias_indexes(self.write_alias):
            name = self.next_index()
            body = bodies.create_index(self.cfg, self.dim, self.word_analyzer, aliases=True, embedder=self._binding)
            with self._errors(f"create index {name}"):
                self.client.indices.create(index=name, body=body)
            log.info("created %s with aliases %s, %s", name, self.read_alias, self.write_alias)
        self._has_write_alias = True

    def refresh(self) -> None:
        with self._errors("refresh"), contextlib.suppress(opensearchpy.NotFoundError):
            self.client.indices.refresh(index=self.read_alias)

    # ------------------------------------------------------------ bulk

    def write_bulk(self, pairs: Iterable[bodies.BulkPair], *, refresh: str | None = None) -> BulkReport:
        """Send (action, source) pairs through streaming_bulk (429s retried with backoff); report per item."""
        report = BulkReport()
        params = {}
        refresh = refresh if refresh is not None else self.cfg.write_refresh
        if refresh != "false":
            params["refresh"] = refresh
        with self._errors("_bulk"):
            for ok, item in helpers.streaming_bulk(
                self.client,
                pairs,
                chunk_size=self.cfg.bulk_chunk_size,
                expand_action_callback=lambda pair: pair,
                raise_on_error=False,
                max_retries=self.cfg.bulk_max_retries,
                initial_backoff=self.cfg.bulk_initial_backoff_s,
                **params,
            ):
                ((op, result),) = item.items()
                doc_id = str(result.get("_id"))
                outcome = result.get("result", "error")
                report.results[outcome] = report.results.get(outcome, 0) + 1
                if ok:
                    report.ok += 1
                elif result.get("status") == 404:
                    report.not_found.append(doc_id)
                else:
                    error = result.get("error") or {}
                    reason = error.get("reason", str(error)) if isinstance(error, dict) else str(error)
                    report.errors.append((doc_id, f"{op}: {reason}"))
        return report

    def check_dim(self, vectors: np.ndarray | None) -> None:
        if vectors is None:
            return
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be 2-D [n, dim], got shape {vectors.shape}")
        if self.dim is None:
            self.dim = int(vectors.shape[1])
        elif vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, the index expects {self.dim}")

    # ------------------------------------------------------------ Backend Protocol: writes

    def upsert(self, products: Sequence[Product], vectors: np.ndarray | None) -> None:
        """Index or replace by id. OpenSearch bulk is per document, not atomic: failed items raise
        BackendError naming them, the others stay written."""
        if not products:
            return
        self.check_dim(vectors)
        self.ensure_index()
        report = self.write_bulk(bodies.bulk_index_actions(self.write_alias, products, vectors, require_alias=True))
        if report.errors:
            raise BackendError(f"upsert: {report.summary()}")

    def delete(self, ids: Sequence[str]) -> int:
        if not ids or not self.alias_indexes(self.write_alias):
            return 0
        report = self.write_bulk(bodies.bulk_delete_actions(self.write_alias, ids))
        if report.errors:
            raise BackendError(f"delete: {report.summary()}")
        return report.results.get("deleted", 0)

    def update_signals(self, updates: Sequence[SignalUpdate]) -> list[str]:
        """Partial `doc` updates (price/sales/stock) in one bulk call; text and vectors untouched."""
        if not updates:
            return []
        if not self.alias_indexes(self.write_alias):
            return [u.id for u in updates]
        report = self.write_bulk(bodies.bulk_update_actions(self.write_alias, updates, require_alias=True))
        if report.errors:
            raise BackendError(f"update_signals: {report.summary()}")
        return report.not_found

    # ------------------------------------------------------------ Backend Protocol: reads

    def _search(self, body: dict[str, Any], action: str, **params: Any) -> dict[str, Any]:
        with self._errors(action):
            try:
                return self.client.search(index=self.read_alias, body=body, params=params or None)
            except opensearchpy.NotFoundError:
                return {}  # no index behind the alias yet: an empty store

    def bm25(self, text: str, filters: Filters | None, n: int) -> list[Candidate]:
        if not text.strip() or n <= 0:
            return []
        return candidates_from_hits(self._search(bodies.bm25_search(text, filters, n), "bm25 search"), "bm25")

    def knn(self, vector: np.ndarray, filters: Filters | None, n: int) -> list[Candidate]:
        if n <= 0:
            return []
        body = bodies.knn_search(vector, filters, n, self.cfg.hnsw_ef_search)
        return candidates_from_hits(self._search(body, "knn search"), "knn")

    @property
    def fuses_server_side(self) -> bool:
        """True when configured for the hybrid query: the pipeline then calls hybrid() (HybridBackend)."""
        return self.cfg.retrieval == "hybrid"

    def hybrid(self, text: str, vector: np.ndarray, filters: Filters | None, n: int) -> list[Candidate]:
        """One hybrid query through the search pipeline; Candidate.fused is the pipeline's score."""
        if n <= 0:
            return []
        body = bodies.hybrid_search(text, vector, filters, n, self.cfg.hnsw_ef_search)
        response = self._search(body, "hybrid search", search_pipeline=self.cfg.search_pipeline)
        return candidates_from_hits(response, "fused")

    def get(self, ids: Sequence[str]) -> list[Product]:
        if not ids:
            return []
        with self._errors("mget"):
            try:
                response = self.client.mget(
                    index=self.read_alias,
                    body=bodies.ids_search(ids),
                    params={"_source_excludes": bodies.VECTOR_FIELD},
                )
            except opensearchpy.NotFoundError:
                return []
        return products_from_mget(response)

    def iter_ids(self, page_size: int = 1000) -> Iterator[str]:
        with self._errors("scan ids"):
            try:
                for hit in helpers.scan(self.client, index=self.read_alias, query=bodies.scan_all(), size=page_size):
                    yield str(hit["_id"])
            except opensearchpy.NotFoundError:
                return

    def content_hashes(self, ids: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for chunk in _chunks(ids, 1000):
            with self._errors("mget content hashes"):
                try:
                    response = self.client.mget(
                        index=self.read_alias,
                        body=bodies.ids_search(chunk),
                        params={"_source_excludes": bodies.VECTOR_FIELD},
                    )
                except opensearchpy.NotFoundError:
                    return {}
            for doc in response.get("docs", []):
                if doc.get("found"):
                    source = doc["_source"]
                    out[str(doc["_id"])] = source.get("content_hash") or Product.model_validate(source).content_hash()
        return out

    def _count(self, body: dict[str, Any] | None = None) -> int:
        with self._errors("count"):
            try:
                return int(self.client.count(index=self.read_alias, body=body)["count"])
            except opensearchpy.NotFoundError:
                return 0

    def count(self) -> int:
        return self._count()

    def _mappings(self, alias: str) -> dict[str, dict[str, Any]]:
        """index name -> its mapping, for the indexes behind `alias` ({} when there are none)."""
        with self._errors(f"get mapping {alias}"):
            try:
                response = self.client.indices.get_mapping(index=alias)
            except opensearchpy.NotFoundError:
                return {}
        return {name: body.get("mappings", {}) for name, body in sorted(response.items())}

    def embedder_binding(self) -> EmbedderBinding | None:
        """The binding recorded in the mapping `_meta` of the index behind the read alias."""
        for name, mapping in self._mappings(self.read_alias).items():
            return _recorded_binding(name, mapping)
        return None

    def bind_embedder(self, binding: EmbedderBinding) -> None:
        """Record the binding in the write index's mapping `_meta` (at creation when there is no index
        yet). A vector dimension the mapping cannot hold is a mismatch even on an empty index: a
        mapping's dimension is fixed, only a reindex changes it."""
        if not isinstance(binding, EmbedderBinding):
            raise TypeError(f"binding must be an EmbedderBinding, got {type(binding).__name__}")
        remedy = "rebuild the index with `shopsearch opensearch reindex`"
        if not self.alias_indexes(self.write_alias):
            self.dim = binding.dim  # the index is created for the binding's vectors (none: no vector field)
            self._binding = binding
            self.ensure_index()
        updates: dict[str, dict[str, Any]] = {}
        for name, mapping in self._mappings(self.write_alias).items():
            recorded = _recorded_binding(name, mapping)
            if recorded == binding:
                continue
            where = f"OpenSearch index {name}"
            if recorded is not None and self._index_count(name) > 0:
                raise EmbedderMismatch(where, recorded, binding, remedy)
            mapped_dim = _mapped_dim(mapping)
            if binding.dim is not None and mapped_dim != binding.dim:
                held = f"a mapping for {mapped_dim}-d vectors" if mapped_dim else "a mapping without vectors"
                raise EmbedderMismatch(where, held, binding, remedy)
            updates[name] = bodies.put_mapping_meta(mapping.get("_meta") or {}, binding)
        for name, body in updates.items():
            with self._errors(f"record the embedder in {name}"):
                self.client.indices.put_mapping(index=name, body=body)
        if binding.dim is not None:
            self.dim = binding.dim
        self._binding = binding

    def _index_count(self, index: str) -> int:
        """Documents in `index`, including writes not yet refreshed (a bind must see a fresh load)."""
        with self._errors(f"count {index}"):
            self.client.indices.refresh(index=index)
            return int(self.client.count(index=index)["count"])

    def stats(self) -> StoreStats:
        indexes = self.alias_indexes(self.read_alias)
        size_bytes = 0
        dim: int | None = None
        binding: EmbedderBinding | None = None
        details: dict[str, Any] = {
            "read_alias": self.read_alias,
            "write_alias": self.write_alias,
            "indexes": indexes,
            "retrieval": self.cfg.retrieval,
        }
        if indexes:
            with self._errors("index stats"):
                store = self.client.indices.stats(index=self.read_alias, metric="store")
                size_bytes = int(store["_all"]["total"]["store"]["size_in_bytes"])
            for name, mapping in self._mappings(self.read_alias).items():
                dim = _mapped_dim(mapping) or dim
                binding = binding or _recorded_binding(name, mapping)
                title = mapping.get("properties", {}).get("title", {})
                details["word_analyzer"] = title.get("analyzer", "standard")
        return StoreStats(
            backend="opensearch",
            products=self._count(),
            vectors=self._count(bodies.exists_query(bodies.VECTOR_FIELD)),
            dim=dim,
            size_bytes=size_bytes,
            embedder=binding,
            generation=None,
            details=details,
        )

    def _segments(self) -> int:
        with self._errors("segment stats"):
            found = self.client.indices.stats(index=self.read_alias, metric="segments")
        return int(found["_all"]["primaries"]["segments"]["count"])

    def force_merge(self) -> tuple[int, int]:
        """`_forcemerge` to one segment per shard of the indexes behind the read alias; (primary
        segments before, after). Waits for the merge, which on a large index takes minutes."""
        if not self.alias_indexes(self.read_alias):
            return 0, 0
        before = self._segments()
        with self._errors(f"force merge {self.read_alias}"):
            self.client.indices.forcemerge(
                index=self.read_alias, params={"max_num_segments": 1, "request_timeout": FORCE_MERGE_TIMEOUT_S}
            )
            self.client.indices.refresh(index=self.read_alias)  # searchers open the merged segments
        return before, self._segments()

    # ------------------------------------------------------------ Backend Protocol: storefront primitives

    def _match_query(self, match: MatchSet) -> dict[str, Any]:
        if not isinstance(match, MatchSet):
            raise TypeError(f"match must be a MatchSet, got {type(match).__name__}")
        ids = list(match.ids)  # checked by MatchSet itself
        return bodies.match_set_query(match.text, match.filters, ids)

    def count_matches(self, match: MatchSet) -> int:
        """The exact size of the match set (`_count`, never capped)."""
        return self._count({"query": self._match_query(match)})

    def _result_window(self) -> int:
        """index.max_result_window of the indexes behind the read alias (the smallest; 10,000 by default)."""
        if self._max_result_window is None:
            with self._errors("get index.max_result_window"):
                try:
                    response = self.client.indices.get_settings(
                        index=self.read_alias, name="index.max_result_window", params={"include_defaults": "true"}
                    )
                except opensearchpy.NotFoundError:
                    return 10_000
            windows = []
            for body in response.values():
                held = {**body.get("defaults", {}), **body.get("settings", {})}
                windows.append(int(held.get("index", {}).get("max_result_window", 10_000)))
            self._max_result_window = min(windows, default=10_000)
        return self._max_result_window

    def listing(self, match: MatchSet, sort: Sequence[SortKey], offset: int, n: int) -> list[Candidate]:
        """The match set ordered by `sort` then id, positions [offset, offset + n). Within
        index.max_result_window one from/size search; past it the pages are walked with search_after
        (sort values only until `offset`), so any depth works, at a cost growing with the offset.
        A `_score` order uses dfs_query_then_fetch: index-wide term statistics, the same on any shard count."""
        for name, value in (("offset", offset), ("n", n)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"listing: {name} must be a non-negative integer, got {value!r}")
        keys = list(sort)
        for key in keys:
            if not isinstance(key, SortKey):
                raise ValueError(f"listing: sort must hold SortKey values, got {type(key).__name__}")
        query = self._match_query(match)
        if n == 0:
            return []
        clauses = bodies.sort_clauses([(k.field, k.descending) for k in keys])
        window = self._result_window()
        # by relevance: term statistics of the whole index (dfs), not of each shard, so that the order
        # does not depend on which shard a product landed in
        params = (
            {"search_type": "dfs_query_then_fetch"} if match.text and any(k.field == "_score" for k in keys) else {}
        )
        if offset + n <= window:
            response = self._search(bodies.listing_search(query, clauses, n, offset=offset), "listing", **params)
            return _listing_candidates(_hits(response))
        out: list[Candidate] = []
        position = 0
        after: list[Any] | None = None
        if offset:
            # the last position the window reaches, in one hit: search_after starts from its sort values
            jump = min(offset, window)
            body = bodies.listing_search(query, clauses, 1, offset=jump - 1, source=False)
            hits = _hits(self._search(body, "listing (deep offset)", **params))
            if not hits:
                return []
            position, after = jump, hits[-1]["sort"]
        while len(out) < n:
            skipping = position < offset
            size = min(window, offset - position if skipping else n - len(out))
            body = bodies.listing_search(query, clauses, size, search_after=after, source=not skipping)
            hits = _hits(self._search(body, "listing (search_after)", **params))
            if not hits:
                break
            if not skipping:
                out += _listing_candidates(hits)
            position += len(hits)
            after = hits[-1]["sort"]
        return out

    def facets(self, match: MatchSet, specs: Sequence[FacetSpec]) -> list[Facet]:
        """terms / range / stats aggregations over the match set, one search for all specs."""
        specs = list(specs)
        for spec in specs:
            if not isinstance(spec, FacetSpec):
                raise ValueError(f"facets: specs must hold FacetSpec values, got {type(spec).__name__}")
        query = self._match_query(match)
        if not specs:
            return []
        aggs = {f"f{i}": bodies.facet_aggregation(s.field, s.size, s.ranges, s.stats) for i, s in enumerate(specs)}
        result = self._search(bodies.facets_search(query, aggs), "facets").get("aggregations", {})
        return [_facet(spec, result.get(f"f{i}", {})) for i, spec in enumerate(specs)]

    def highlight(
        self, text: str, ids: Sequence[str], fields: Sequence[str], tags: HighlightTags
    ) -> dict[str, dict[str, list[str]]]:
        """Highlights from the unified highlighter with `encoder: html`. Per field, the words analysis's
        fragments, or where it has none (CJK text the word analyzer splits per character) the cjk bigram
        sub-field's."""
        if not isinstance(text, str):
            raise ValueError(f"highlight: text must be a string, got {type(text).__name__}")
        fields = check_highlight_fields(fields)
        if not isinstance(tags, HighlightTags):
            raise ValueError(f"highlight: tags must be HighlightTags, got {type(tags).__name__}")
        ids = list(dict.fromkeys(str(i) for i in ids))
        if not text.strip() or not ids or not fields:
            return {}
        out: dict[str, dict[str, list[str]]] = {}
        hits: list[dict[str, Any]] = []
        for chunk in _chunks(ids, min(1000, self._result_window())):
            body = bodies.highlight_search(
                text, chunk, fields, tags.pre, tags.post, tags.fragment_chars, tags.fragments
            )
            hits += _hits(self._search(body, "highlight"))
        for hit in hits:
            found = hit.get("highlight") or {}
            per_field = {}
            for name in fields:
                words = found.get(name) or []
                cjk = found.get(f"{name}.cjk") or []
                chosen = cjk if cjk and _has_cjk(text) else words or cjk
                if chosen:
                    per_field[name] = list(chosen)
            if per_field:
                out[str(hit["_id"])] = per_field
        return out

    def prefix_terms(self, prefix: str, n: int) -> list[TermCount]:
        """Title words (lowercase, unstemmed; CJK bigrams) and brand / category values (case-insensitive
        prefix) starting with `prefix`; most frequent first, then by term, then title words before brands
        before categories. A prefix longer than MAX_PREFIX_CHARS matches nothing; n is capped at MAX_TERMS."""
        if not isinstance(prefix, str):
            raise ValueError(f"prefix_terms: prefix must be a string, got {type(prefix).__name__}")
        _check_n("prefix_terms", n)
        prefix = prefix.strip()
        if not prefix or n <= 0 or len(prefix) > bodies.MAX_PREFIX_CHARS:
            return []
        n = min(n, bodies.MAX_TERMS)
        aggs = self._search(bodies.prefix_terms_search(prefix, n), "prefix terms").get("aggregations", {})
        found: list[TermCount] = [
            TermCount(term=str(b["key"]), doc_freq=int(b["doc_count"]), kind="term")
            for b in aggs.get("term", {}).get("words", {}).get("buckets", [])
        ]
        for kind in ("brand", "category"):
            found += [
                TermCount(term=str(b["key"]), doc_freq=int(b["doc_count"]), kind=kind)  # type: ignore[arg-type]
                for b in aggs.get(kind, {}).get("buckets", [])
            ]
        order = {"term": 0, "brand": 1, "category": 2}
        found.sort(key=lambda t: (-t.doc_freq, t.term, order[t.kind]))
        return found[:n]

    def fuzzy_terms(self, word: str, max_edits: int, n: int) -> list[TermCount]:
        """Title words within `max_edits` edits of `word` (Damerau-Levenshtein, a transposition being one
        edit, as Lucene's fuzzy matching counts), the word itself included when indexed; nearest first,
        then most frequent, then by term."""
        if not isinstance(word, str):
            raise ValueError(f"fuzzy_terms: word must be a string, got {type(word).__name__}")
        if isinstance(max_edits, bool) or max_edits not in (1, 2):
            raise ValueError(f"fuzzy_terms: max_edits must be 1 or 2, got {max_edits!r}")
        _check_n("fuzzy_terms", n)
        word = word.strip()
        if not word or n <= 0 or len(word) > bodies.MAX_PREFIX_CHARS:
            return []
        n = min(n, bodies.MAX_TERMS)
        # the suggester ranks by its own similarity: ask for more, then order by edits here
        response = self._search(bodies.fuzzy_terms_search(word, max_edits, max(n * 4, 20)), "fuzzy terms")
        token = word.lower()
        best: dict[str, tuple[int, int]] = {}
        exact = int(response.get("hits", {}).get("total", {}).get("value", 0) or 0)
        if exact:
            best[token] = (0, exact)
        for entry in response.get("suggest", {}).get("fuzzy", []):
            for option in entry.get("options", []):
                term = str(option["text"])
                edits = OSA.distance(str(entry.get("text", token)), term)
                if edits <= max_edits and (term not in best or best[term][0] > edits):
                    best[term] = (edits, int(option.get("freq", 0)))
        ranked = sorted(best.items(), key=lambda item: (item[1][0], -item[1][1], item[0]))
        return [TermCount(term=term, doc_freq=freq, kind="term") for term, (_, freq) in ranked[:n]]

    def close(self) -> None:
        self.client.close()

    def swapped_to(self, embedder: EmbedderBinding | None) -> None:
        """After a rebuild swapped the aliases: writes now go to a new index, which records `embedder`."""
        self._has_write_alias = True
        self._binding = embedder


def _check_n(action: str, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"{action}: n must be an integer, got {n!r}")


_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def _has_cjk(text: str) -> bool:
    return bool(_CJK_RE.search(text))


def _listing_candidates(hits: list[dict[str, Any]]) -> list[Candidate]:
    """Listing hits → Candidates; bm25 set on the text matches (the named lexical clause matched)."""
    out = []
    for hit in hits:
        product = Product.model_validate(hit["_source"]) if hit.get("_source") else None
        cand = Candidate(id=str(hit["_id"]), product=product)
        if bodies.TEXT_QUERY_NAME in (hit.get("matched_queries") or []):
            cand.bm25 = float(hit.get("_score") or 0.0)
        out.append(cand)
    return out


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _facet(spec: FacetSpec, agg: dict[str, Any]) -> Facet:
    if spec.ranges is not None:
        buckets = agg.get("buckets", {})
        ranges = [
            FacetRange(start=start, end=end, count=int(buckets.get(str(i), {}).get("doc_count", 0)))
            for i, (start, end) in enumerate(spec.ranges)
        ]
        return Facet(spec=spec, ranges=ranges)
    if spec.stats:
        count = int(agg.get("count", 0) or 0)
        stats = FacetStats(
            count=count,
            min=_number(agg.get("min")) if count else None,
            max=_number(agg.get("max")) if count else None,
            sum=float(agg.get("sum") or 0.0),
            avg=_number(agg.get("avg")) if count else None,
        )
        return Facet(spec=spec, stats=stats)
    values = [FacetValue(value=str(b["key"]), count=int(b["doc_count"])) for b in agg.get("buckets", [])]
    return Facet(spec=spec, values=values, other=int(agg.get("sum_other_doc_count", 0) or 0))


def _mapped_dim(mapping: dict[str, Any]) -> int | None:
    vector = mapping.get("properties", {}).get(bodies.VECTOR_FIELD)
    return int(vector["dimension"]) if vector and vector.get("dimension") else None


def _recorded_binding(index: str, mapping: dict[str, Any]) -> EmbedderBinding | None:
    recorded = (mapping.get("_meta") or {}).get(bodies.EMBEDDER_META_KEY)
    if recorded is None:
        return None
    try:
        return EmbedderBinding(recorded["embedder"], recorded["dim"])
    except (KeyError, TypeError, ValueError) as err:
        raise BackendError(
            f"OpenSearch index {index}: mapping _meta.{bodies.EMBEDDER_META_KEY} is not a shopsearch "
            f"embedder record ({err}): rebuild with `shopsearch opensearch reindex`"
        ) from None
