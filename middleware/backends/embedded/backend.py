"""EmbeddedBackend: the Backend Protocol over the SQLite store, its lexical index and its vector index.

This module holds the write and read paths that touch more than one of them; each of the three
keeps its own rules (see `store.py`, `lexical.py`, `vectors.py`). Lock order, always: the store's
`write_mutex`, then the vector index's write lock, then the SQLite transaction. Both derived
indexes are brought up to date with a write before it returns (the lexical one by the process that
owns its writer: another process's write is applied within its poll interval).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tantivy
from cachetools import LRUCache

from middleware.backends.base import (
    NO_EMBEDDER,
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
    WriterBusy,
    check_highlight_fields,
)
from middleware.backends.embedded import lexical
from middleware.backends.embedded.lexical import KEY_SEPARATOR, SUGGEST_FIELD, ParallelAnalysis, TantivyLexicalIndex
from middleware.backends.embedded.store import SqliteStore, filter_sql
from middleware.backends.embedded.vectors import AllowedIds, VectorIndex
from middleware.products import Candidate, Filters, Product, SignalUpdate
from middleware.text import normalize

log = logging.getLogger(__name__)

DB_NAME = "catalog.sqlite3"
LEXICAL_GENERATION = "lexical_generation"  # meta key: counts the commits that changed what BM25 indexes
_PRUNE_EVERY = 64  # write transactions between prunes of the lexical change log
MAX_TERMS = 10_000  # prefix_terms / fuzzy_terms: at most this many, whatever n asks
MAX_TERM_CHARS = 100  # longer prefixes and words match no indexed term worth offering
FAISS_NAME = "vectors.faiss"
_NEW_DATA_DIR = "index into a new data directory (--data-dir)"


class EmbeddedBackend:
    """SQLite as the source of truth, tantivy for BM25 and faiss for kNN, derived from it, in one directory."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        dim: int | None = None,
        *,
        field_boosts: dict[str, float] | None = None,  # query-time BM25 boost per lexical field (text.FIELD_BOOSTS)
        analysis_workers: int | None = None,  # processes analysing large write batches (None: cores - 1)
        filter_cache_pks: int = 2_000_000,  # kNN: the pks of recent filters, at most this many in all, per process
        prepared_size: int = 4096,  # analysed texts kept by `prepare` until their upsert
        hnsw_threshold: int = 50_000,
        hnsw_m: int = 32,
        hnsw_ef_construction: int = 128,
        hnsw_ef_search: int = 128,
        exact_max: int = 20_000,  # HNSW: filtered subsets this small (or < 5%) are searched exactly
        durable: bool = True,
        save_interval_s: float = 30.0,
        save_every: int = 10_000,
        merge_take_s: float = lexical.MERGE_TAKE_S,  # force merge: how long the writer's owner may take to start it
    ) -> None:
        if dim is not None and (not isinstance(dim, int) or dim <= 0):
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.data_dir = Path(data_dir)
        self._expected_dim = dim
        self._closed = False
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create data directory {self.data_dir}: {exc}") from exc

        self.store = SqliteStore(
            self.data_dir / DB_NAME, durable=durable, extra_schema=lexical.SCHEMA, migrate=self._migrate_lexical
        )
        self.lexical = TantivyLexicalIndex(self.data_dir, self.store.reader, field_boosts=field_boosts)
        self._merge_take_s = merge_take_s
        self._writes = 0
        self._cache_lock = threading.Lock()
        # (filters as JSON, lexical generation) -> the pks they allow: every write bumps that generation
        self._filter_cache: LRUCache[tuple[str, int], AllowedIds] = LRUCache(
            maxsize=max(1, filter_cache_pks), getsizeof=lambda allowed: allowed.size + 1
        )
        self._filter_cache_pks = max(1, filter_cache_pks)
        # one core is left to this process: it stores the batches and feeds tantivy meanwhile
        workers = (os.cpu_count() or 1) - 1 if analysis_workers is None else analysis_workers
        self._analysis = ParallelAnalysis(max(workers, 0))
        # (title, search text) -> tokens_json, analysed by `prepare` ahead of the upsert that writes them
        self._prepared: LRUCache[tuple[str, str], str] = LRUCache(maxsize=max(1, prepared_size))
        self.vectors = VectorIndex(
            self.data_dir / FAISS_NAME,
            self.store.vector_snapshot,
            hnsw_threshold=hnsw_threshold,
            hnsw_m=hnsw_m,
            hnsw_ef_construction=hnsw_ef_construction,
            hnsw_ef_search=hnsw_ef_search,
            exact_max=exact_max,
            save_interval_s=save_interval_s,
            save_every=save_every,
        )
        try:
            stored_dim = self.store.meta_int("dim")
            n_vectors = self.store.vector_count()
            if dim is not None and stored_dim is not None and dim != stored_dim:
                if n_vectors:
                    raise ValueError(
                        f"dim mismatch: {self.data_dir} holds {stored_dim}-d vectors but {dim}-d were asked for "
                        "(a different embedder?); index into a new data directory"
                    )
                stored_dim = None  # bound, but no vector written yet: the first vector write sets it
            self._dim: int | None = stored_dim
            generation = self.store.meta_int("generation") or 0
            self._dim_generation: int | None = generation  # the generation `_dim` was last read at
            self.vectors.open(generation, n_vectors, stored_dim, self.store.vector_pks)
            self._analyse_stale_rows()
            self.lexical.open(self.store.meta_int(LEXICAL_GENERATION) or 0)
        except BaseException:
            self.lexical.close()
            self.store.close()
            raise

    def _migrate_lexical(self, conn: sqlite3.Connection) -> None:
        if lexical.migrate(conn):
            log.warning(
                "%s: upgrading the lexical index from SQLite FTS5 to tantivy (products are analysed again, once)",
                self.data_dir,
            )

    def _analyse_stale_rows(self, batch: int = 2000) -> None:
        """Store the current analysis's tokens of products that lack them (a store of an older analysis
        or format): the lexical index rebuilds from them, and nothing is lost on the way."""
        from middleware.text import ANALYSIS_VERSION

        with self.store.reader(mapped=False) as conn:
            # the usual case, answered from two counts and one index probe: as many token rows as products
            # (tokens and products are written and deleted in one transaction) and none of another analysis
            (same_count,) = conn.execute(
                "SELECT (SELECT count(*) FROM products) = (SELECT count(*) FROM product_text)"
            ).fetchone()
            other = conn.execute(
                "SELECT 1 FROM product_text WHERE analysis < ? OR analysis > ? LIMIT 1",
                (ANALYSIS_VERSION, ANALYSIS_VERSION),
            ).fetchone()
        if same_count and other is None:
            return
        while True:
            with self.store.reader(mapped=False) as conn:
                # pks first, from covering indexes: the scan reads no product or token row
                stale = [
                    pk
                    for (pk,) in conn.execute(
                        "SELECT pk FROM products WHERE pk NOT IN"
                        " (SELECT pk FROM product_text WHERE analysis = ?) LIMIT ?",
                        (ANALYSIS_VERSION, batch),
                    )
                ]
                if not stale:
                    return
                marks = ",".join("?" * len(stale))
                rows = conn.execute(f"SELECT pk, doc FROM products WHERE pk IN ({marks}) ORDER BY pk", stale).fetchall()
            analysed = self._analysis.tokens([Product.model_validate_json(doc) for _, doc in rows])
            tokens = [(pk, fields) for (pk, _), fields in zip(rows, analysed, strict=True)]
            with self.store.write_mutex, self.store.transaction() as conn:
                generation = self.store.bump_counter(conn, LEXICAL_GENERATION)
                conn.executemany("DELETE FROM product_text WHERE pk = ?", [(pk,) for pk, _ in tokens])
                self.lexical.add(conn, tokens, generation)

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"the embedded backend at {self.data_dir} is closed")

    # ------------------------------------------------------------------ embedder binding

    def embedder_binding(self) -> EmbedderBinding | None:
        self._check_open()
        with self.store.reader() as conn:
            return self._binding(conn)

    def _binding(self, conn: sqlite3.Connection) -> EmbedderBinding | None:
        values = self.store.meta_values(conn, ["embedder", "dim"])
        if "embedder" not in values:
            return None
        model = values["embedder"]
        return EmbedderBinding(model, None if model == NO_EMBEDDER else int(values["dim"]))

    def bind_embedder(self, binding: EmbedderBinding) -> None:
        """Record the embedder in the meta table. An empty store may be re-bound (its vector dimension
        changes with it); a store with products keeps its embedder. A store indexed before bindings
        were recorded adopts the binding when its vectors have the binding's dimension."""
        self._check_open()
        if not isinstance(binding, EmbedderBinding):
            raise TypeError(f"binding must be an EmbedderBinding, got {type(binding).__name__}")
        where = str(self.data_dir)
        with self.store.write_mutex, self.vectors.lock.write():
            with self.store.transaction() as conn:
                recorded = self._binding(conn)
                if recorded == binding:
                    return
                products, vectors = self.store.counts(conn)
                if products and recorded is not None:
                    raise EmbedderMismatch(where, recorded, binding, _NEW_DATA_DIR)
                stored_dim = self.store.meta_int("dim", conn)
                if vectors and binding.dim != stored_dim:
                    raise EmbedderMismatch(where, f"{stored_dim}-d vectors", binding, _NEW_DATA_DIR)
                self.store.set_meta(conn, "embedder", binding.model)
                if binding.dim is not None:
                    self.store.set_meta(conn, "dim", str(binding.dim))
                elif not vectors:
                    self.store.set_meta(conn, "dim", None)
            if not vectors and self._dim != binding.dim:
                # no vector is left to keep: the next vector write builds an index of the new dimension
                self._dim = binding.dim
                self.vectors.reset()

    def _stored_dim(self) -> int | None:
        """The store's vector dimension; read again while unknown here (another process sharing the
        store may have written the first vectors since this one opened it)."""
        if self._dim is None:
            with self.store.reader() as conn:
                generation = self.store.meta_int("generation", conn)
                if generation != self._dim_generation:  # every vector write bumps it
                    self._dim_generation = generation
                    if conn.execute("SELECT 1 FROM products WHERE vector IS NOT NULL LIMIT 1").fetchone():
                        self._dim = self.store.meta_int("dim", conn)
        return self._dim

    # ------------------------------------------------------------------ writes

    def _check_vectors(self, vectors: np.ndarray | None, n: int) -> np.ndarray | None:
        if vectors is None:
            return None
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise ValueError(f"vectors must have shape ({n}, dim) for {n} products, got {arr.shape}")
        dim = self._stored_dim()
        dim = dim if dim is not None else self._expected_dim
        if dim is not None and arr.shape[1] != dim:
            raise ValueError(f"vector dimension mismatch: the store holds {dim}-d vectors, got {arr.shape[1]}-d")
        if arr.shape[1] == 0:
            raise ValueError("vectors must have at least one dimension")
        if not np.isfinite(arr).all():
            raise ValueError("vectors contain NaN or infinite values")
        return np.ascontiguousarray(arr)

    def upsert(self, products: Sequence[Product], vectors: np.ndarray | None) -> None:
        """Insert or replace by id (text, vector and signals), atomically for the batch.

        Within one batch the last occurrence of an id wins. `vectors=None` stores no vectors (a
        replaced product loses its old one: it was computed from the old text).
        """
        self._check_open()
        products = list(products)
        for i, product in enumerate(products):
            if not isinstance(product, Product):
                raise TypeError(f"products[{i}] must be a Product, got {type(product).__name__}")
        vecs = self._check_vectors(vectors, len(products))
        if not products:
            return
        last = {p.id: i for i, p in enumerate(products)}
        order = sorted(last.values())
        # analyse before taking any lock: jieba is the slow part of a write
        tokens = self._tokens([products[i] for i in order])
        rows = [
            (products[i], None if vecs is None else vecs[i].astype("<f4").tobytes(), tokens[k])
            for k, i in enumerate(order)
        ]
        with self.store.write_mutex, self.vectors.lock.write():
            removed: list[int] = []
            added_pks: list[int] = []
            with self.store.transaction() as conn:
                text_generation = self._bump_lexical(conn)
                if vecs is not None and self._dim is None:
                    bound = self._binding(conn)
                    if bound is not None and bound.dim is None:
                        wanted = f"{vecs.shape[1]}-d vectors"
                        raise EmbedderMismatch(str(self.data_dir), bound, wanted, _NEW_DATA_DIR)
                    self.store.set_meta(conn, "dim", str(vecs.shape[1]))
                stored = self.store.found_by_id(conn, [product.id for product, _, _ in rows])
                if stored:
                    self._delete_pks(conn, [pk for pk, _ in stored.values()], text_generation)
                    removed = [pk for pk, has_vector in stored.values() if has_vector]
                pks = self.store.insert_many(conn, [(product, blob) for product, blob, _ in rows])
                self.lexical.add(
                    conn, [(pk, tokens) for pk, (_, _, tokens) in zip(pks, rows, strict=True)], text_generation
                )
                added_pks = [pk for pk, (_, blob, _) in zip(pks, rows, strict=True) if blob is not None]
                generation = self.store.bump_generation(conn) if (removed or added_pks) else None
            if vecs is not None and self._dim is None:
                self._dim = vecs.shape[1]
            if generation is not None:
                added = None
                if added_pks:
                    added = np.stack([vecs[i] for i in order])  # type: ignore[index]
                self.vectors.apply(removed, added_pks, added, generation)
            self._lexical_catch_up(text_generation)

    def prepare(self, products: Sequence[Product]) -> None:
        """Analyse products ahead of their `upsert` (optional): a loader calls it on another thread
        while it writes the previous batch, so the analysis workers are busy during that write. Nothing
        is stored; the upsert finds the tokens of any product whose text is unchanged."""
        self._check_open()
        wanted: dict[tuple[str, str], Product] = {}
        with self._cache_lock:
            for product in products:
                if not isinstance(product, Product):
                    raise TypeError(f"prepare: products must be Products, got {type(product).__name__}")
                key = (product.title, product.search_text())
                if key not in self._prepared:
                    wanted[key] = product
        if not wanted:
            return
        tokens = self._analysis.tokens(list(wanted.values()))
        with self._cache_lock:
            self._prepared.update(zip(wanted, tokens, strict=True))

    @contextlib.contextmanager
    def bulk_load(self) -> Iterator[None]:
        """Writes within it (a loader's run) reach the lexical index in few, large commits: a store
        loaded in many small ones searches slower. They become searchable up to a minute late."""
        self._check_open()
        with self.lexical.bulk():
            yield

    def force_merge(self) -> tuple[int, int]:
        """The lexical index rewritten as one segment from SQLite; (segments before, after). In a process
        that does not write the store, the process that does is asked to merge, and this waits for it."""
        self._check_open()
        try:
            return self.lexical.merge_segments(take_s=self._merge_take_s)
        except lexical.LexicalWriterBusy as exc:
            raise WriterBusy(f"force merge: {exc}") from exc
        except RuntimeError as exc:  # the owner's merge failed: its error, by name
            raise BackendError(f"force merge: {exc}") from exc

    def _tokens(self, products: Sequence[Product]) -> list[str]:
        """tokens_json of each product: prepared ones from `prepare`, the others analysed now."""
        keys = [(p.title, p.search_text()) for p in products]
        with self._cache_lock:  # taken, not kept: a catalog's long descriptions make large token lists
            found: list[str | None] = [self._prepared.pop(key, None) for key in keys]
        missing = [i for i, tokens in enumerate(found) if tokens is None]
        if missing:
            for i, tokens in zip(missing, self._analysis.tokens([products[i] for i in missing]), strict=True):
                found[i] = tokens
        return found  # type: ignore[return-value]

    def _delete_pks(self, conn: sqlite3.Connection, pks: Sequence[int], text_generation: int) -> None:
        self.lexical.remove(conn, pks, text_generation)
        self.store.delete_many(conn, pks)

    def _bump_lexical(self, conn: sqlite3.Connection) -> int:
        """The lexical generation of this write transaction; now and then, forget changes the index has."""
        self._writes += 1
        if self._writes % _PRUNE_EVERY == 0:
            stamp = self.lexical.stamped_generation()
            if stamp is not None:
                self.lexical.prune_log(conn, stamp)
        return self.store.bump_counter(conn, LEXICAL_GENERATION)

    def _lexical_catch_up(self, text_generation: int) -> None:
        """Apply the committed write to the lexical index when this process owns its writer (else the
        owner applies it within its poll interval; this process sees it once the owner commits)."""
        self.lexical.refresh(text_generation)

    def delete(self, ids: Sequence[str]) -> int:
        self._check_open()
        wanted = list(dict.fromkeys(str(i) for i in ids))
        if not wanted:
            return 0
        with self.store.write_mutex, self.vectors.lock.write():
            with self.store.transaction() as conn:
                found = list(self.store.found_by_id(conn, wanted).values())
                text_generation = self._bump_lexical(conn) if found else None
                if found:
                    self._delete_pks(conn, [pk for pk, _ in found], text_generation)  # type: ignore[arg-type]
                removed = [pk for pk, has_vector in found if has_vector]
                generation = self.store.bump_generation(conn) if removed else None
            if generation is not None:
                self.vectors.apply(removed, [], None, generation)
            if text_generation is not None:
                self._lexical_catch_up(text_generation)
        return len(found)

    def update_signals(self, updates: Sequence[SignalUpdate]) -> list[str]:
        """Change price/sales/stock in the row and its JSON; text, tokens and vectors stay as they are."""
        self._check_open()
        updates = list(updates)
        for i, u in enumerate(updates):
            if not isinstance(u, SignalUpdate):
                raise TypeError(f"updates[{i}] must be a SignalUpdate, got {type(u).__name__}")
        missing: list[str] = []
        with self.store.write_mutex:
            with self.store.transaction() as conn:
                text_generation = self._bump_lexical(conn)  # price and stock are filters inside BM25
                for u in updates:
                    row = self.store.product_doc(conn, u.id)
                    if row is None:
                        missing.append(u.id)
                        continue
                    changes = {
                        k: v for k, v in (("price", u.price), ("sales", u.sales), ("stock", u.stock)) if v is not None
                    }
                    self.store.update_signals(conn, row[0], row[1].model_copy(update=changes))
                    self.lexical.changed(conn, row[0], text_generation)
            self._lexical_catch_up(text_generation)
        return missing

    # ------------------------------------------------------------------ reads

    def get(self, ids: Sequence[str]) -> list[Product]:
        wanted = [str(i) for i in ids]
        if not wanted:
            return []
        self._check_open()
        return self.store.get(wanted)

    def bm25(self, text: str, filters: Filters | None, n: int) -> list[Candidate]:
        """BM25 over the lexical fields (boosted per field), filters inside the query."""
        self._check_open()
        if n <= 0 or not isinstance(text, str):
            return []
        hits = self.lexical.top(text, filters, n)
        if not hits:
            return []
        with self.store.reader() as conn:
            products = self.store.products_by_pk(conn, [pk for pk, _ in hits])
        out: list[Candidate] = []
        for pk, score in hits:
            product = products.get(pk)
            if product is not None:  # deleted since the index was searched
                out.append(Candidate(id=product.id, product=product, bm25=score, ranks={"bm25": len(out) + 1}))
        return out

    def _allowed(self, conn: sqlite3.Connection, filters: Filters) -> AllowedIds:
        """The pks `filters` allow, from a per-process cache: gathering them (tens of thousands for a broad
        filter) and building their faiss selector was most of a filtered kNN call, and storefront filters
        repeat. Keyed by the lexical generation, which every write bumps (price and stock changes too),
        so a cached set is exactly what the store holds at that generation."""
        key = filters.model_dump_json()
        generation = self.store.meta_int(LEXICAL_GENERATION, conn) or 0
        with self._cache_lock:
            allowed = self._filter_cache.get((key, generation))
        if allowed is not None:
            return allowed
        conn.execute("BEGIN")  # the generation and the pks from one snapshot
        try:
            generation = self.store.meta_int(LEXICAL_GENERATION, conn) or 0
            allowed = AllowedIds(self.store.filtered_pks(conn, filters))
        finally:
            conn.rollback()
        if allowed.size < self._filter_cache_pks:
            with self._cache_lock:
                if any(k[1] != generation for k in self._filter_cache):
                    self._filter_cache.clear()  # sets of another generation are never right again
                self._filter_cache[(key, generation)] = allowed
        return allowed

    def knn(self, vector: np.ndarray, filters: Filters | None, n: int) -> list[Candidate]:
        """Exact (flat) or HNSW inner-product top-n among the products matching `filters`."""
        self._check_open()
        if n <= 0 or self._stored_dim() is None:
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self._dim:
            raise ValueError(f"query vector has {query.shape[1]} dimensions, the store holds {self._dim}-d vectors")
        if not np.isfinite(query).all():
            raise ValueError("query vector contains NaN or infinite values")
        if filters is not None and filters.is_empty():
            filters = None
        while True:
            with self.vectors.lock.read():
                if self.vectors.generation == self.store.generation():
                    hits: list[tuple[int, float]] = []
                    with self.store.reader() as conn:
                        if self.vectors.ntotal:
                            allowed = None if filters is None else self._allowed(conn, filters)
                            hits = self.vectors.search(query, allowed, n)
                        products = self.store.products_by_pk(conn, [pk for pk, _ in hits])
                    break
            with self.vectors.lock.write():  # another process wrote, or a failed update: catch up
                self.vectors.catch_up(self.store.generation())
        out = []
        for pk, score in hits:
            if pk in products:
                product = products[pk]
                out.append(Candidate(id=product.id, product=product, knn=score, ranks={"knn": len(out) + 1}))
        return out

    # ------------------------------------------------------------------ storefront primitives

    def _match_pks(self, match: MatchSet) -> tuple[str, list[object], dict[int, float]]:
        """The match set as SQL over `products p` (a WHERE clause and its parameters), and the BM25
        score of each text match. Text and ids are matched in the lexical index, filters included."""
        if match.text is None:  # every product under the filters (ids add nothing)
            where, params = filter_sql(match.filters)
            return where, params, {}
        query = self.lexical.match_query(match.text, match.filters, match.ids)
        scores = dict(self.lexical.all_matches(query)) if query is not None else {}
        return "p.pk IN (SELECT CAST(key AS INTEGER) FROM json_each(?))", [json.dumps(scores)], scores

    def count_matches(self, match: MatchSet) -> int:
        self._check_open()
        if match.text is None:
            where, params = filter_sql(match.filters)
            with self.store.reader() as conn:
                return int(conn.execute(f"SELECT count(*) FROM products p WHERE {where}", params).fetchone()[0])
        query = self.lexical.match_query(match.text, match.filters, match.ids)
        return 0 if query is None else self.lexical.count(query)

    def listing(self, match: MatchSet, sort: Sequence[SortKey], offset: int, n: int) -> list[Candidate]:
        self._check_open()
        for name, value in (("offset", offset), ("n", n)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if n == 0:
            return []
        where, params, scores = self._match_pks(match)
        order: list[str] = []
        score_params: list[object] = []
        for key in sort:
            if key.field == "_score":
                if scores:  # no text: every product scores the same
                    order.append(
                        f"coalesce(json_extract(?, '$.\"' || p.pk || '\"'), 0) {'DESC' if key.descending else 'ASC'}"
                    )
                    score_params.append(params[0])
                continue
            # missing values last in both directions, as OpenSearch's `missing: _last`
            order.append(f"p.{key.field} IS NULL, p.{key.field} {'DESC' if key.descending else 'ASC'}")
        order.append("p.id")
        sql = f"SELECT p.pk, p.doc FROM products p WHERE {where} ORDER BY {', '.join(order)} LIMIT ? OFFSET ?"
        with self.store.reader() as conn:
            rows = conn.execute(sql, [*params, *score_params, n, offset]).fetchall()
        out = []
        for pk, doc in rows:
            product = Product.from_stored_json(doc)
            out.append(Candidate(id=product.id, product=product, bm25=scores.get(pk) or None))
        return out

    def facets(self, match: MatchSet, specs: Sequence[FacetSpec]) -> list[Facet]:
        """Counted by tantivy's aggregations over the fast fields, in one pass over the match set's
        documents (the query `count_matches` counts: text or ids, under the filters). Term facets ask
        every segment for all its values, so counts are exact across segments; ranges, which tantivy
        wants disjoint, are counted over the partition their bounds cut the axis into, then summed."""
        self._check_open()
        specs = list(specs)
        if not specs:
            return []
        query = self.lexical.match_query(match.text, match.filters, match.ids)
        aggregations: dict[str, dict[str, object]] = {}
        partitions: dict[int, list[float]] = {}
        for i, spec in enumerate(specs):
            if spec.ranges is not None:
                cuts = sorted({b for r in _integral_ranges(spec) if r is not None for b in r if b is not None})
                partitions[i] = cuts
                if cuts:
                    pieces = [{"to": cuts[0]}, *({"from": a, "to": b} for a, b in itertools.pairwise(cuts))]
                    pieces.append({"from": cuts[-1]})
                    aggregations[f"f{i}"] = {"range": {"field": spec.field, "ranges": pieces}}
                else:  # only open or empty ranges: everything with a value
                    aggregations[f"f{i}"] = {"stats": {"field": spec.field}}
            elif spec.stats:
                aggregations[f"f{i}"] = {"stats": {"field": spec.field}}
            else:
                every = {"size": _ALL_TERMS, "segment_size": _ALL_TERMS, "min_doc_count": 1}
                aggregations[f"f{i}"] = {"terms": {"field": spec.field, **every}}
        try:
            found = self.lexical.aggregate(query or tantivy.Query.empty_query(), aggregations)
        except ValueError as exc:  # e.g. more distinct values than tantivy's bucket limit
            raise BackendError(f"facets: the lexical index could not count them: {exc}") from exc
        out: list[Facet] = []
        for i, spec in enumerate(specs):
            answer = found.get(f"f{i}") or {}
            if spec.ranges is not None:
                out.append(Facet(spec=spec, ranges=_range_counts(spec, partitions[i], answer)))
            elif spec.stats:
                count = int(answer.get("count") or 0)
                low, high = answer.get("min"), answer.get("max")
                total = float(answer.get("sum") or 0.0)
                stats = FacetStats(
                    count=count,
                    min=None if not count or low is None else float(low),
                    max=None if not count or high is None else float(high),
                    sum=total,
                    avg=total / count if count else None,
                )
                out.append(Facet(spec=spec, stats=stats))
            else:
                counts = sorted(
                    ((str(b["key"]), int(b["doc_count"])) for b in answer.get("buckets", [])),
                    key=lambda vc: (-vc[1], vc[0]),
                )
                values = [FacetValue(value=v, count=c) for v, c in counts[: spec.size]]
                out.append(Facet(spec=spec, values=values, other=sum(c for _, c in counts[spec.size :])))
        return out

    def highlight(
        self, text: str, ids: Sequence[str], fields: Sequence[str], tags: HighlightTags
    ) -> dict[str, dict[str, list[str]]]:
        from middleware.highlight import highlight_fragments

        self._check_open()
        if not isinstance(text, str):
            raise ValueError(f"highlight: text must be a string, got {type(text).__name__}")
        fields = check_highlight_fields(fields)
        if not isinstance(tags, HighlightTags):
            raise ValueError(f"highlight: tags must be HighlightTags, got {type(tags).__name__}")
        out: dict[str, dict[str, list[str]]] = {}
        if not text.strip() or not fields:
            return out
        for product in self.get(list(dict.fromkeys(str(i) for i in ids))):
            found: dict[str, list[str]] = {}
            for name in fields:
                value = getattr(product, name, None) if name in ("title", "description") else None
                if not value:
                    continue
                fragments = highlight_fragments(
                    value,
                    text,
                    pre=tags.pre,
                    post=tags.post,
                    fragment_chars=tags.fragment_chars,
                    fragments=tags.fragments,
                )
                if fragments:
                    found[name] = fragments
            if found:
                out[product.id] = found
        return out

    def prefix_terms(self, prefix: str, n: int) -> list[TermCount]:
        """Title words from the `suggest` field; brands and categories whose whole value starts with the
        prefix, case-insensitively."""
        self._check_open()
        if not isinstance(prefix, str) or isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            return []
        n = min(n, MAX_TERMS)
        folded = normalize(prefix).strip().casefold()
        if not folded or len(folded) > MAX_TERM_CHARS or KEY_SEPARATOR in folded:
            return []
        found = [TermCount(t, c) for t, c in self.lexical.terms_with_prefix(SUGGEST_FIELD, folded, n)]
        for kind in ("brand", "category"):
            for key, count in self.lexical.terms_with_prefix(f"{kind}_key", folded, n):
                found.append(TermCount(key.split(KEY_SEPARATOR, 1)[-1], count, kind))  # type: ignore[arg-type]
        rank = {"term": 0, "brand": 1, "category": 2}
        found.sort(key=lambda t: (-t.doc_freq, t.term, rank[t.kind]))
        return found[:n]

    def fuzzy_terms(self, word: str, max_edits: int, n: int) -> list[TermCount]:
        """Title words within `max_edits` edits (a swap of two letters is one), the word itself at 0.
        Candidates share the word's first character (as Lucene's fuzzy `prefix_length` 1): first-letter
        typos are rare, and only one letter's part of the term dictionary is walked."""
        from rapidfuzz import process
        from rapidfuzz.distance import OSA

        self._check_open()
        if isinstance(max_edits, bool) or max_edits not in (1, 2):
            raise ValueError(f"max_edits must be 1 or 2, got {max_edits!r}")
        if not isinstance(word, str) or isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            return []
        folded = normalize(word).strip().casefold()
        if not folded or len(folded) > MAX_TERM_CHARS:
            return []
        # the letter's terms (kept until the next commit), their distances in one rapidfuzz call, then the
        # few near ones counted exactly
        terms = self.lexical.terms_starting(SUGGEST_FIELD, folded[0])
        found = process.extract(folded, terms, scorer=OSA.distance, score_cutoff=max_edits, limit=None)
        near = [(int(distance), term) for term, distance, _ in found]
        scored = sorted(
            (distance, -count, term)
            for distance, term in near
            if (count := self.lexical.live_doc_freq(SUGGEST_FIELD, term)) > 0
        )
        return [TermCount(term, -negative) for _, negative, term in scored[: min(n, MAX_TERMS)]]

    def iter_ids(self) -> Iterator[str]:
        self._check_open()
        return self.store.iter_ids()

    def content_hashes(self, ids: Sequence[str]) -> dict[str, str]:
        wanted = [str(i) for i in ids]
        if not wanted:
            return {}
        self._check_open()
        return self.store.content_hashes(wanted)

    def count(self) -> int:
        self._check_open()
        return self.store.count()

    def stats(self) -> StoreStats:
        self._check_open()
        with self.store.reader() as conn:
            products, vectors = self.store.counts(conn)
            generation = self.store.meta_int("generation", conn)
            binding = self._binding(conn)
        with self.vectors.lock.read():
            index_vectors, dead, kind = self.vectors.ntotal, self.vectors.dead, self.vectors.kind
        size = sum(f.stat().st_size for f in self.data_dir.iterdir() if f.is_file())
        return StoreStats(
            backend="embedded",
            products=products,
            vectors=vectors,
            dim=self._dim,
            size_bytes=size,
            embedder=binding,
            generation=generation,
            details={
                "data_dir": str(self.data_dir),
                "index_type": kind,
                "index_vectors": index_vectors,
                "index_dead": dead,
                "lexical": self.lexical.details(),
            },
        )

    # ------------------------------------------------------------------ lifecycle

    def flush(self) -> None:
        """Save the vector index now if it has unsaved changes."""
        self._check_open()
        with self.vectors.lock.write():
            if self.vectors.unsaved and self.vectors.generation == self.store.generation():
                self.vectors.save()

    def close(self) -> None:
        if self._closed:
            return
        with self.store.write_mutex:
            try:
                self.flush()
            finally:
                self._closed = True
                self._analysis.close()
                self.lexical.close()
                self.store.close()

    def __enter__(self) -> EmbeddedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ALL_TERMS = 2**31 - 1  # a terms aggregation's size and segment_size: every value, so no count is an estimate


def _integral_ranges(spec: FacetSpec) -> list[tuple[float | None, float | None] | None]:
    """The spec's ranges with bounds on the field's own scale, None for a range nothing can fall in. On
    the integer fields (sales, stock: 0 and up) x >= a exactly when x >= ceil(a), and x < b when
    x < ceil(b): fractional bounds are made whole (tantivy would round them to the field's type), and a
    lower bound of 0 or less is no bound."""
    assert spec.ranges is not None
    out: list[tuple[float | None, float | None] | None] = []
    for a, b in spec.ranges:
        low = None if a is None else float(a)
        high = None if b is None else float(b)
        if spec.field != "price":
            low = None if low is None or math.ceil(low) <= 0 else float(math.ceil(low))
            high = None if high is None else float(max(0, math.ceil(high)))
            if high == 0.0:
                out.append(None)
                continue
        out.append(None if low is not None and high is not None and low >= high else (low, high))
    return out


def _range_counts(spec: FacetSpec, cuts: list[float], answer: dict[str, Any]) -> list[FacetRange]:
    """Each asked range's count: the sum of the partition pieces it covers."""
    assert spec.ranges is not None
    asked = _integral_ranges(spec)
    if not cuts:  # every asked range is empty, or open on both sides
        count = int(answer.get("count") or 0)
        return [FacetRange(a, b, 0 if r is None else count) for (a, b), r in zip(spec.ranges, asked, strict=True)]
    found = {(piece.get("from"), piece.get("to")): int(piece["doc_count"]) for piece in answer.get("buckets", [])}
    bounds: list[float | None] = [None, *cuts, None]
    try:  # piece k covers [bounds[k], bounds[k + 1])
        pieces = [found[(bounds[k], bounds[k + 1])] for k in range(len(cuts) + 1)]
    except KeyError as exc:
        raise BackendError(f"facets: no range bucket {exc} on {spec.field!r} in {sorted(found, key=str)}") from None
    out = []
    for (start, end), r in zip(spec.ranges, asked, strict=True):
        if r is None:
            out.append(FacetRange(start=start, end=end, count=0))
            continue
        first = 0 if r[0] is None else cuts.index(r[0]) + 1
        last = len(cuts) if r[1] is None else cuts.index(r[1])  # the last piece covered
        out.append(FacetRange(start=start, end=end, count=sum(pieces[first : last + 1])))
    return out
