"""One evaluation run: index the corpus per pool, search every query in every mode, score, time.

Every product mode goes through the product's own `Pipeline` over the configured backend holding the
BEIR documents as Products (id=_id, title=title, description=text), so the figures are what users get:
an `EmbeddedBackend` under the workdir, or OpenSearch, loaded through the one `Indexer` into an index
prefix of its own (`shopsearch-eval-<key>`) so that no production index is read or written.
`bm25s-peer` is the outside reference: the `bm25s` library with its defaults over the same tokens.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import re
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from middleware.evaluation.data import BeirDataset, sample_queries
from middleware.evaluation.metrics import (
    DEFAULT_GAIN,
    DEPTH,
    METRIC_NAMES,
    RunEvaluation,
    evaluable_queries,
    evaluate_run,
    zero_gain_warning,
)
from middleware.evaluation.pools import POOL_NAMES, Pool, build_pool

log = logging.getLogger(__name__)

# mode -> the SearchRequest fields that select it (everything else: the run's settings)
PIPELINE_MODES: dict[str, dict[str, Any]] = {
    "bm25": {"retrieval": "bm25", "rerank": False, "business_enabled": False},
    "bm25-jieba": {"retrieval": "bm25", "rerank": False, "business_enabled": False},
    "bm25-cjk": {"retrieval": "bm25", "rerank": False, "business_enabled": False},
    "vector": {"retrieval": "vector", "rerank": False, "business_enabled": False},
    "hybrid-rrf": {"retrieval": "hybrid", "fusion": "rrf", "rerank": False, "business_enabled": False},
    "hybrid-minmax": {"retrieval": "hybrid", "fusion": "minmax", "rerank": False, "business_enabled": False},
    "hybrid+rerank": {"retrieval": "hybrid", "rerank": True, "business_enabled": False},
    "hybrid+rerank+business": {"retrieval": "hybrid", "rerank": True, "business_enabled": True},
}
# lexical analyses of the embedded backend: query-time boosts of its lexical fields, the fields of
# one analysis alone ("words_*": jieba words; "cjk_*": CJK characters); "default" is the store exactly
# as `open_backend` opens it for users
ANALYSES: dict[str, str] = {"default": "", "jieba": "words_", "cjk": "cjk_"}


def analysis_boosts(analysis: str) -> dict[str, float]:
    """The field boosts of an analysis variant (the default ones restricted to its fields)."""
    from middleware.text import FIELD_BOOSTS

    prefix = ANALYSES[analysis]
    return {name: boost for name, boost in FIELD_BOOSTS.items() if name.startswith(prefix)}


MODE_ANALYSIS: dict[str, str] = {"bm25-jieba": "jieba", "bm25-cjk": "cjk"}
# bm25s with its defaults over the tokens of the same analyses (the default: both, combined as ours)
PEER_MODES: dict[str, str] = {"bm25s-peer": "default", "bm25s-jieba": "jieba", "bm25s-cjk": "cjk"}
ALL_MODES: tuple[str, ...] = (*PIPELINE_MODES, *PEER_MODES)
NEEDS_EMBEDDER = {"vector", "hybrid-rrf", "hybrid-minmax", "hybrid+rerank", "hybrid+rerank+business"}
NEEDS_RERANKER = {"hybrid+rerank", "hybrid+rerank+business"}
EMBEDDED_ONLY_MODES = set(MODE_ANALYSIS)  # analysis variants: query-time weights of the embedded store
EVAL_INDEX_PREFIX = "shopsearch-eval-"
EVAL_DEADLINE_MS = 600_000.0  # a loaded machine must not turn slow stages into "degraded" results


@dataclass
class EvalConfig:
    modes: Sequence[str] = ("bm25", "bm25s-peer")
    pools: Sequence[str] = POOL_NAMES
    embedder: str | None = None  # path or name understood by middleware.models; None: no vector modes
    reranker: str | None = None
    max_queries: int | None = None
    seed: int = 0
    gain: str = DEFAULT_GAIN
    relevant_min: float = 1.0
    workdir: Path = Path("./eval-work")
    retrieve_n: int = DEPTH
    rerank_k: int | None = None  # None: the pipeline's default (20 on CPU, 100 on GPU)
    rerank_fusion: str = "rrf"  # the fusion under the rerank modes
    bm25_weight: float = 0.3
    knn_weight: float = 0.7
    compare_metrics: Sequence[str] = ("ndcg@10", "recall@10")
    n_resamples: int = 10_000
    embedder_runtime: str | None = None  # None: the Settings default
    embedder_precision: str | None = None
    reranker_precision: str | None = None
    threads: int | None = None
    backend: str = "embedded"  # or "opensearch": the cluster of `opensearch` (its index_prefix is replaced)
    opensearch: Any = None  # OpenSearchSettings; None: the Settings default

    def __post_init__(self) -> None:
        if self.backend not in ("embedded", "opensearch"):
            raise ValueError(f"backend must be embedded or opensearch, got {self.backend!r}")
        unknown = [m for m in self.modes if m not in ALL_MODES]
        if unknown:
            raise ValueError(f"unknown mode(s): {', '.join(unknown)}; choose from {', '.join(ALL_MODES)}")
        if not self.modes:
            raise ValueError("no modes to evaluate")
        bad_pools = [p for p in self.pools if p not in POOL_NAMES]
        if bad_pools or not self.pools:
            raise ValueError(f"pools must be among {', '.join(POOL_NAMES)}, got {', '.join(self.pools)}")
        bad_metrics = [m for m in self.compare_metrics if m not in METRIC_NAMES]
        if bad_metrics:
            raise ValueError(f"unknown metric(s) to compare: {', '.join(bad_metrics)}")
        if self.retrieve_n < DEPTH:
            raise ValueError(f"retrieve_n must be at least {DEPTH} (recall@{DEPTH} needs that many results)")


@dataclass
class ModeRun:
    """Rankings and timings of one mode on one pool."""

    rankings: dict[str, list[str]] = field(default_factory=dict)
    latency_ms: list[float] = field(default_factory=list)
    stage_ms: dict[str, list[float]] = field(default_factory=dict)
    degraded: int = 0
    errors: int = 0  # searches that raised (scored as empty rankings)
    first_error: str | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "model"


@functools.cache
def _opensearch_code_version() -> str:
    """Changes when the OpenSearch mappings, analysis or writes change: part of the eval index key."""
    import loaders.indexer as indexer
    from middleware.backends import opensearch, opensearch_bodies

    digest = hashlib.sha1()
    for module in (opensearch_bodies, opensearch, indexer):
        digest.update(inspect.getsource(module).encode("utf-8"))
    return digest.hexdigest()[:10]


# the OpenSearch settings that shape an index (the rest, such as the url or timeouts, do not)
_INDEX_SHAPING = ("word_analyzer", "knn_engine", "hnsw_m", "hnsw_ef_construction", "vector_compression", "shards")


@functools.cache  # once per process: the code that runs is the code first read, even if files change
def _analysis_version() -> str:
    """Changes when the lexical analysis or the embedded store changes: part of the index cache key."""
    import middleware.text as text
    from middleware.backends.embedded import backend, lexical, store, vectors

    digest = hashlib.sha1()
    for module in (text, backend, lexical, store, vectors):
        digest.update(inspect.getsource(module).encode("utf-8"))
    return digest.hexdigest()[:10]


class PeerBM25:
    """bm25s (defaults: Lucene BM25, k1=1.5, b=0.75) over the very tokens `middleware.text` gives the store.

    Our store scores each lexical field apart and sums them with boosts; bm25s has no fields, so the
    peer gets one bag per analysis (title and body tokens together) and sums the analyses' scores.
    """

    def __init__(self, doc_ids: Sequence[str], texts: Sequence[str], analysis: str) -> None:
        import bm25s

        from middleware.text import analyze_product

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
        self.fields = sorted(analysis_boosts(analysis))
        self.bags = sorted({name.split("_")[0] for name in self.fields})
        self.doc_ids = np.asarray(doc_ids)
        self.by_id = np.argsort(self.doc_ids, kind="stable")  # ties: id ascending
        analysed = [analyze_product(t, "") for t in texts]
        self.indexes = {}
        for bag in list(self.bags):
            corpus = [
                [tok for name in self.fields if name.startswith(bag + "_") for tok in doc[name]] for doc in analysed
            ]
            if not any(corpus):  # no CJK text in an English corpus: bm25s cannot index an empty vocabulary
                self.bags.remove(bag)
                continue
            index = bm25s.BM25()
            index.index(corpus, show_progress=False)
            self.indexes[bag] = index

    def search(self, query: str, k: int) -> list[str]:
        from middleware.text import analyze_query

        per_field = analyze_query(query)
        total = np.zeros(len(self.doc_ids), dtype=np.float64)
        for bag in self.bags:
            tokens = list(
                dict.fromkeys(t for name in self.fields if name.startswith(bag + "_") for t in per_field[name])
            )
            if tokens:
                total += self.indexes[bag].get_scores(tokens).astype(np.float64)
        order = self.by_id[np.argsort(-total[self.by_id], kind="stable")][:k]
        return [str(self.doc_ids[i]) for i in order if total[i] > 0]  # matches only, as the store


class Evaluation:
    def __init__(self, dataset: BeirDataset, config: EvalConfig) -> None:
        self.dataset = dataset
        self.config = config
        self.skipped_modes: dict[str, str] = {}
        self.notes: list[str] = list(dataset.notes)
        self.embedder: Any = None
        self.reranker: Any = None

    # ---------------------------------------------------------------- models
    def _settings(self, **overrides: Any) -> Any:
        from middleware.config import FusionSettings, Settings

        cfg = self.config
        values: dict[str, Any] = {
            "backend": "embedded",
            "data_dir": cfg.workdir,
            "embedder": cfg.embedder or "none",
            "reranker": cfg.reranker or "none",
            "retrieve_n": cfg.retrieve_n,
            "rerank_k": cfg.rerank_k,
            "deadline_ms": EVAL_DEADLINE_MS,
            "fusion": FusionSettings(method=cfg.rerank_fusion, bm25_weight=cfg.bm25_weight, knn_weight=cfg.knn_weight),
            "threads": cfg.threads,
        }
        for key, value in (
            ("embedder_runtime", cfg.embedder_runtime),
            ("embedder_precision", cfg.embedder_precision),
            ("reranker_precision", cfg.reranker_precision),
        ):
            if value is not None:
                values[key] = value
        values.update(overrides)
        return Settings(**values)

    def _load_models(self) -> None:
        if self.config.backend != "embedded":
            self._skip(
                EMBEDDED_ONLY_MODES, f"an analysis variant of the embedded store (backend {self.config.backend})"
            )
        modes = set(self.config.modes)
        if not modes & NEEDS_EMBEDDER:
            return  # lexical modes only: no model code needed
        from middleware.models import ModelLoadError, load_embedder, load_reranker

        settings = self._settings()
        if modes & NEEDS_EMBEDDER:
            if not self.config.embedder:
                self._skip(NEEDS_EMBEDDER, "no embedder given (--embedder)")
            else:
                try:
                    self.embedder = load_embedder(settings)
                except ModelLoadError as err:
                    self._skip(NEEDS_EMBEDDER, f"embedder not available: {err}")
        if modes & NEEDS_RERANKER and self.embedder is not None:
            if not self.config.reranker:
                self._skip(NEEDS_RERANKER, "no reranker given (--reranker)")
            else:
                try:
                    self.reranker = load_reranker(settings)
                except ModelLoadError as err:
                    self._skip(NEEDS_RERANKER, f"reranker not available: {err}")

    def _skip(self, modes: set[str], reason: str) -> None:
        for mode in self.config.modes:
            if mode in modes and mode not in self.skipped_modes:
                self.skipped_modes[mode] = reason

    @property
    def active_modes(self) -> list[str]:
        return [m for m in self.config.modes if m not in self.skipped_modes]

    # ---------------------------------------------------------------- corpus vectors + indexes
    def _model_key(self) -> str:
        """The embedder and the options that change its vectors (runtime, precision)."""
        settings = self._settings()
        return _slug(f"{self.embedder.model_id}-{settings.embedder_runtime}-{settings.embedder_precision}")

    def _document_vectors(self) -> np.ndarray | None:
        """Embeddings of every corpus document (Product.embedding_text), cached on disk."""
        if self.embedder is None:
            return None
        ids = list(self.dataset.corpus)
        key = f"{self.dataset.fingerprint[:16]}-{self._model_key()}"
        cache = self.config.workdir / "vectors" / f"{key}.npy"
        if cache.is_file():
            vectors = np.load(cache)
            if vectors.shape == (len(ids), self.embedder.dim):
                log.info("document vectors from cache %s", cache)
                return vectors
        texts = [self.dataset.corpus[i].to_product().embedding_text() for i in ids]
        started = time.perf_counter()
        chunks = []
        step = 4096
        for start in range(0, len(texts), step):
            chunks.append(np.asarray(self.embedder.encode_documents(texts[start : start + step]), np.float32))
            log.info("embedded %d/%d documents", min(start + step, len(texts)), len(texts))
        vectors = np.concatenate(chunks) if chunks else np.zeros((0, self.embedder.dim), np.float32)
        self.notes.append(
            f"embedded {len(texts)} documents in {time.perf_counter() - started:.1f} s ({self.embedder.model_id})"
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(cache)
        return vectors

    def _open_index(self, pool: Pool, vectors: np.ndarray | None) -> tuple[Path, int | None]:
        """An embedded store holding exactly the pool's documents; reused when already built."""
        from middleware.backends.embedded import EmbeddedBackend

        model = self._model_key() if self.embedder is not None else "lexical"
        key = f"{self.dataset.fingerprint[:12]}-{pool.fingerprint}-{model}-{_analysis_version()}"
        path = self.config.workdir / "indexes" / key
        marker = path / "eval-index.json"
        dim = self.embedder.dim if self.embedder is not None else None
        if marker.is_file():
            backend = EmbeddedBackend(path, dim=dim)
            count = backend.count()
            backend.close()
            if count == len(pool):
                log.info("index for the %s pool from cache %s", pool.name, path)
                return path, dim
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        backend = EmbeddedBackend(path, dim=dim)
        row_of = {doc_id: row for row, doc_id in enumerate(self.dataset.corpus)}
        started = time.perf_counter()
        batch = 2000
        for start in range(0, len(pool.doc_ids), batch):
            ids = pool.doc_ids[start : start + batch]
            products = [self.dataset.corpus[i].to_product() for i in ids]
            batch_vectors = vectors[[row_of[i] for i in ids]] if vectors is not None else None
            backend.upsert(products, batch_vectors)
            if (start // batch) % 10 == 9:
                log.info("%s pool: indexed %d/%d documents", pool.name, start + len(ids), len(pool))
        seconds = time.perf_counter() - started
        marker.write_text(json.dumps({"documents": len(pool), "seconds": round(seconds, 1)}), encoding="utf-8")
        backend.close()
        self.notes.append(f"indexed the {pool.name} pool ({len(pool)} documents) in {seconds:.1f} s")
        return path, dim

    def _opensearch_settings(self, pool: Pool) -> Any:
        """Settings for the pool's eval index on the configured cluster: its own prefix and aliases."""
        from middleware.config import OpenSearchSettings

        base = self.config.opensearch if self.config.opensearch is not None else OpenSearchSettings()
        model = self._model_key() if self.embedder is not None else "lexical"
        shape = json.dumps({k: getattr(base, k) for k in _INDEX_SHAPING}, sort_keys=True, default=str)
        key = hashlib.sha1(
            f"{self.dataset.fingerprint}|{pool.fingerprint}|{model}|{shape}|{_opensearch_code_version()}".encode()
        ).hexdigest()[:12]
        cfg = base.model_copy(update={"index_prefix": EVAL_INDEX_PREFIX + key, "read_alias": None, "write_alias": None})
        return self._settings(backend="opensearch", opensearch=cfg)

    def _open_opensearch_index(self, pool: Pool) -> Any:
        """The pool's documents in an eval index of their own, loaded through the `Indexer`; an index
        already holding exactly them (same corpus, pool, embedder, mapping code) is searched as it is."""
        from loaders.embed_cache import EmbeddingCache
        from loaders.indexer import Indexer
        from middleware.backends import opensearch_admin
        from middleware.backends.opensearch import OpenSearchBackend

        settings = self._opensearch_settings(pool)
        dim = self.embedder.dim if self.embedder is not None else None
        backend = OpenSearchBackend.from_settings(settings, dim=dim)
        indexer_binding = (
            (self.embedder.model_id, int(self.embedder.dim)) if self.embedder is not None else ("none", None)
        )
        binding = backend.embedder_binding()
        if binding is not None and (binding.model, binding.dim) == indexer_binding and backend.count() == len(pool):
            log.info("index for the %s pool reused: %s", pool.name, settings.opensearch.index_prefix)
            self.notes.append(f"{pool.name} pool: reused OpenSearch index {backend.read_alias}")
            return backend
        stale = backend.versioned_indexes()  # only under the eval prefix: never a shop's index
        if stale:
            backend.client.indices.delete(index=",".join(stale))
            backend.close()
            backend = OpenSearchBackend.from_settings(settings, dim=dim)
        if settings.opensearch.retrieval == "hybrid":
            opensearch_admin.install(backend)  # the search pipeline of the hybrid query
        cache = None
        if self.embedder is not None:
            cache = EmbeddingCache(
                self.config.workdir / "embedding-cache.sqlite", self.embedder.model_id, self.embedder.dim
            )
        started = time.perf_counter()
        try:
            indexer = Indexer(self.embedder, cache=cache)
            products = [self.dataset.corpus[i].to_product() for i in pool.doc_ids]
            step = 5000
            for start in range(0, len(products), step):
                indexer.upsert(products[start : start + step], backend)
                log.info("%s pool: indexed %d/%d documents", pool.name, min(start + step, len(products)), len(pool))
        finally:
            if cache is not None:
                cache.close()
        backend.refresh()
        count = backend.count()
        if count != len(pool):
            raise ValueError(f"the eval index {backend.read_alias} holds {count} documents, expected {len(pool)}")
        seconds = time.perf_counter() - started
        self.notes.append(
            f"indexed the {pool.name} pool ({len(pool)} documents) into OpenSearch {backend.read_alias}"
            f" in {seconds:.1f} s"
        )
        return backend

    # ---------------------------------------------------------------- searching
    def _run_pipeline_mode(self, pipeline: Any, mode: str, query_ids: list[str]) -> ModeRun:
        from middleware.schema import SearchRequest

        cfg = self.config
        fields = dict(PIPELINE_MODES[mode])
        if mode == "hybrid-minmax":
            fields.update(bm25_weight=cfg.bm25_weight, knn_weight=cfg.knn_weight)
        run = ModeRun()

        def request(text: str) -> Any:
            return SearchRequest(
                query=text, size=DEPTH, retrieve_n=cfg.retrieve_n, deadline_ms=EVAL_DEADLINE_MS, **fields
            )

        with contextlib.suppress(Exception):  # warm-up (first-call costs); failures show below
            pipeline.search(request(self.dataset.queries[query_ids[0]]))
        for qid in query_ids:
            req = request(self.dataset.queries[qid])
            started = time.perf_counter()
            try:
                response = pipeline.search(req)
            except Exception as err:  # counted and reported: the query scores as an empty ranking
                run.errors += 1
                run.first_error = run.first_error or f"query {qid}: {type(err).__name__}: {err}"
                run.rankings[qid] = []
                continue
            run.latency_ms.append((time.perf_counter() - started) * 1000.0)
            run.rankings[qid] = [hit.id for hit in response.hits]
            for stage, ms in response.timings_ms.items():
                run.stage_ms.setdefault(stage, []).append(ms)
            if response.degraded:
                run.degraded += 1
        return run

    def _run_peer(self, peer: PeerBM25, query_ids: list[str]) -> ModeRun:
        run = ModeRun()
        for qid in query_ids:
            started = time.perf_counter()
            run.rankings[qid] = peer.search(self.dataset.queries[qid], DEPTH)
            run.latency_ms.append((time.perf_counter() - started) * 1000.0)
        return run

    # ---------------------------------------------------------------- the whole run
    def run(self) -> dict[str, Any]:
        from middleware.pipeline import Pipeline

        cfg = self.config
        ds = self.dataset
        started = time.perf_counter()
        judged = ds.judged_query_ids()
        selected = sample_queries(judged, cfg.max_queries, cfg.seed)
        query_ids, skipped = evaluable_queries(selected, ds.qrels, cfg.relevant_min)
        if not query_ids:
            raise ValueError(f"no query has a judged document with score >= {cfg.relevant_min}")
        # returned, not logged: the caller decides where a user sees it (the CLI: stderr)
        warnings = [w for w in [zero_gain_warning(ds.qrels, query_ids, cfg.gain)] if w]
        self._load_models()
        if not self.active_modes:
            reasons = "; ".join(f"{m}: {r}" for m, r in self.skipped_modes.items())
            raise ValueError(f"no mode can run: {reasons}")
        pools = [build_pool(name, ds.corpus, ds.qrels, query_ids) for name in cfg.pools]
        pipeline_modes = [m for m in self.active_modes if m in PIPELINE_MODES]
        on_opensearch = cfg.backend == "opensearch"
        vectors = self._document_vectors() if pipeline_modes and not on_opensearch else None

        evaluations: dict[str, dict[str, RunEvaluation]] = {}
        rankings: dict[str, dict[str, dict[str, list[str]]]] = {}
        results: dict[str, dict[str, Any]] = {m: {} for m in self.active_modes}
        for pool in pools:
            runs: dict[str, ModeRun] = {}
            if pipeline_modes and on_opensearch:
                pipeline = Pipeline(
                    self._opensearch_settings(pool), self._open_opensearch_index(pool), self.embedder, self.reranker
                )
                try:
                    for mode in pipeline_modes:
                        t = time.perf_counter()
                        runs[mode] = self._run_pipeline_mode(pipeline, mode, query_ids)
                        log.info("%s pool, %s: %.1f s", pool.name, mode, time.perf_counter() - t)
                finally:
                    pipeline.close()
            elif pipeline_modes:
                from middleware.backends.embedded import EmbeddedBackend

                path, dim = self._open_index(pool, vectors)
                for analysis in dict.fromkeys(MODE_ANALYSIS.get(m, "default") for m in pipeline_modes):
                    backend = EmbeddedBackend(path, dim=dim, field_boosts=analysis_boosts(analysis))
                    pipeline = Pipeline(self._settings(), backend, self.embedder, self.reranker)
                    try:
                        for mode in pipeline_modes:
                            if MODE_ANALYSIS.get(mode, "default") != analysis:
                                continue
                            t = time.perf_counter()
                            runs[mode] = self._run_pipeline_mode(pipeline, mode, query_ids)
                            log.info("%s pool, %s: %.1f s", pool.name, mode, time.perf_counter() - t)
                    finally:
                        pipeline.close()  # closes the backend too
            peer_modes = [m for m in self.active_modes if m in PEER_MODES]
            if peer_modes:
                products = [ds.corpus[i].to_product() for i in pool.doc_ids]
                # the fields our BM25 indexes: the title and Product.search_text()
                texts = [f"{p.title} {p.search_text()}" for p in products]
                for mode in peer_modes:
                    peer = PeerBM25(pool.doc_ids, texts, PEER_MODES[mode])
                    runs[mode] = self._run_peer(peer, query_ids)
            for mode in self.active_modes:
                ev = evaluate_run(
                    runs[mode].rankings,
                    ds.qrels,
                    query_ids,
                    relevant_min=cfg.relevant_min,
                    gain_mapping=cfg.gain,
                )
                evaluations.setdefault(mode, {})[pool.name] = ev
                rankings.setdefault(mode, {})[pool.name] = runs[mode].rankings
                results[mode][pool.name] = _summarise(ev, runs[mode])

        significance = self._significance(evaluations, [p.name for p in pools])
        return {
            "dataset": {
                "name": ds.name,
                "split": ds.split,
                "documents": len(ds.corpus),
                "judged_queries": len(judged),
                "fingerprint": ds.fingerprint,
            },
            "settings": {
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "opensearch"},
                "opensearch": _opensearch_summary(cfg.opensearch) if on_opensearch else None,
                "modes": list(cfg.modes),
                "pools": list(cfg.pools),
                "compare_metrics": list(cfg.compare_metrics),
                "embedder_id": getattr(self.embedder, "model_id", None),
                "reranker_id": getattr(self.reranker, "model_id", None),
                "analysis_default": {"field_boosts": analysis_boosts("default")},
                "peer": "bm25s defaults (lucene, k1=1.5, b=0.75), one index per analysis, same tokens",
                "deadline_ms": EVAL_DEADLINE_MS,
            },
            "queries": {
                "selected": len(selected),
                "selection": f"seeded sample of {cfg.max_queries} (seed {cfg.seed})"
                if cfg.max_queries is not None and cfg.max_queries < len(judged)
                else "all judged queries",
                "evaluated": len(query_ids),
                "skipped_no_relevant": len(skipped),
                "skipped_rule": f"queries without a judged document scored >= {cfg.relevant_min} are skipped",
            },
            "pools": {p.name: {"documents": len(p)} for p in pools},
            "results": results,
            "skipped_modes": dict(self.skipped_modes),
            "significance": significance,
            "notes": self.notes,
            "warnings": warnings,
            "elapsed_s": round(time.perf_counter() - started, 1),
            # not JSON: per-query arrays and rankings, for callers (the CLI pops them)
            "_evaluations": evaluations,
            "_rankings": rankings,
        }

    def _significance(self, evaluations: dict[str, dict[str, RunEvaluation]], pools: list[str]) -> list[dict[str, Any]]:
        """Every other mode against the first mode evaluated, per pool and compared metric."""
        from middleware.evaluation.significance import compare  # scipy: imported only when used

        modes = self.active_modes
        if len(modes) < 2:
            return []
        if len(evaluations[modes[0]][pools[0]].query_ids) < 2:
            self.notes.append("paired tests skipped: they need at least two evaluated queries")
            return []
        base = modes[0]
        out = []
        for pool in pools:
            for mode in modes[1:]:
                for metric in self.config.compare_metrics:
                    result = compare(
                        metric,
                        mode,
                        evaluations[mode][pool].per_query[metric],
                        base,
                        evaluations[base][pool].per_query[metric],
                        n_resamples=self.config.n_resamples,
                        seed=self.config.seed,
                    )
                    out.append({"pool": pool, **result.to_dict()})
        return out


def _opensearch_summary(cfg: Any) -> dict[str, Any]:
    """The cluster settings a reader of the results needs (no credentials)."""
    from middleware.config import OpenSearchSettings

    cfg = cfg if cfg is not None else OpenSearchSettings()
    return {k: getattr(cfg, k) for k in ("url", "retrieval", "hybrid_normalization", *_INDEX_SHAPING)}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _summarise(ev: RunEvaluation, run: ModeRun) -> dict[str, Any]:
    cell: dict[str, Any] = {m: round(v, 6) for m, v in ev.means.items()}
    cell["queries"] = len(ev.query_ids)
    if run.latency_ms:
        cell["latency_ms"] = {
            "median": round(statistics.median(run.latency_ms), 3),
            "p95": round(_percentile(run.latency_ms, 95), 3),
            "mean": round(statistics.fmean(run.latency_ms), 3),
        }
    if run.stage_ms:
        cell["stage_ms_median"] = {s: round(statistics.median(v), 3) for s, v in sorted(run.stage_ms.items())}
    cell["degraded_queries"] = run.degraded
    cell["failed_queries"] = run.errors
    if run.first_error:
        cell["first_error"] = run.first_error
    return cell


def per_query_document(evaluations: dict[str, dict[str, RunEvaluation]]) -> dict[str, Any]:
    """Per-query values for later significance checks: results[mode][pool] = {query_ids, metric: [...]}."""
    return {
        mode: {
            pool: {"query_ids": ev.query_ids, **{m: [round(x, 6) for x in v.tolist()] for m, v in ev.per_query.items()}}
            for pool, ev in pools.items()
        }
        for mode, pools in evaluations.items()
    }
