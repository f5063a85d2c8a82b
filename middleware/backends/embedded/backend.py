"""EmbeddedBackend: the Backend Protocol over the SQLite store, its lexical index and its vector index.

This module holds the write and read paths that touch more than one of them; each of the three
keeps its own rules (see `store.py`, `lexical.py`, `vectors.py`). Lock order, always: the store's
`write_mutex`, then the vector index's write lock, then the SQLite transaction.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from middleware.backends.base import NO_EMBEDDER, BackendError, EmbedderBinding, EmbedderMismatch, StoreStats
from middleware.backends.embedded.lexical import (
    DEFAULT_CJK_WEIGHT,
    DEFAULT_COMBINE,
    DEFAULT_WORDS_WEIGHT,
    Fts5LexicalIndex,
)
from middleware.backends.embedded.store import SqliteStore
from middleware.backends.embedded.vectors import VectorIndex
from middleware.products import Candidate, Filters, Product, SignalUpdate

DB_NAME = "catalog.sqlite3"
FAISS_NAME = "vectors.faiss"
_NEW_DATA_DIR = "index into a new data directory (--data-dir)"


class EmbeddedBackend:
    """SQLite FTS5 (jieba words + CJK uni/bigrams) for BM25 and faiss for kNN, in one directory."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        dim: int | None = None,
        *,
        words_weight: float = DEFAULT_WORDS_WEIGHT,
        cjk_weight: float = DEFAULT_CJK_WEIGHT,
        combine: Literal["sum", "max"] = DEFAULT_COMBINE,
        title_weight: float = 2.0,
        body_weight: float = 1.0,
        hnsw_threshold: int = 50_000,
        hnsw_m: int = 32,
        hnsw_ef_construction: int = 128,
        hnsw_ef_search: int = 128,
        exact_max: int = 20_000,  # HNSW: filtered subsets this small (or < 5%) are searched exactly
        durable: bool = True,
        save_interval_s: float = 30.0,
        save_every: int = 10_000,
    ) -> None:
        if dim is not None and (not isinstance(dim, int) or dim <= 0):
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.lexical = Fts5LexicalIndex(
            words_weight=words_weight,
            cjk_weight=cjk_weight,
            combine=combine,
            title_weight=title_weight,
            body_weight=body_weight,
        )
        self.data_dir = Path(data_dir)
        self._expected_dim = dim
        self._closed = False
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create data directory {self.data_dir}: {exc}") from exc

        self.store = SqliteStore(self.data_dir / DB_NAME, durable=durable, extra_schema=self.lexical.schema)
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
        except BaseException:
            self.store.close()
            raise

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
        # tokenise before taking any lock: jieba is the slow part of a write
        rows = [
            (
                products[i],
                None if vecs is None else vecs[i].astype("<f4").tobytes(),
                self.lexical.analyze(products[i]),
            )
            for i in order
        ]
        with self.store.write_mutex, self.vectors.lock.write():
            removed: list[int] = []
            added_pks: list[int] = []
            with self.store.transaction() as conn:
                if vecs is not None and self._dim is None:
                    bound = self._binding(conn)
                    if bound is not None and bound.dim is None:
                        wanted = f"{vecs.shape[1]}-d vectors"
                        raise EmbedderMismatch(str(self.data_dir), bound, wanted, _NEW_DATA_DIR)
                    self.store.set_meta(conn, "dim", str(vecs.shape[1]))
                for product, blob, doc in rows:
                    old = self.store.find(conn, product.id)
                    if old is not None:
                        self._delete_pk(conn, old[0])
                        if old[1]:
                            removed.append(old[0])
                    pk = self.store.insert(conn, product, blob)
                    self.lexical.add(conn, pk, doc)
                    if blob is not None:
                        added_pks.append(pk)
                generation = self.store.bump_generation(conn) if (removed or added_pks) else None
            if vecs is not None and self._dim is None:
                self._dim = vecs.shape[1]
            if generation is not None:
                added = None
                if added_pks:
                    added = np.stack([vecs[i] for i in order])  # type: ignore[index]
                self.vectors.apply(removed, added_pks, added, generation)

    def _delete_pk(self, conn: sqlite3.Connection, pk: int) -> None:
        self.lexical.remove(conn, pk)
        self.store.delete(conn, pk)

    def delete(self, ids: Sequence[str]) -> int:
        self._check_open()
        wanted = list(dict.fromkeys(str(i) for i in ids))
        if not wanted:
            return 0
        with self.store.write_mutex, self.vectors.lock.write():
            with self.store.transaction() as conn:
                found = self.store.find_many(conn, wanted)
                for pk, _ in found:
                    self._delete_pk(conn, pk)
                removed = [pk for pk, has_vector in found if has_vector]
                generation = self.store.bump_generation(conn) if removed else None
            if generation is not None:
                self.vectors.apply(removed, [], None, generation)
        return len(found)

    def update_signals(self, updates: Sequence[SignalUpdate]) -> list[str]:
        """Change price/sales/stock in the row and its JSON; text, tokens and vectors stay as they are."""
        self._check_open()
        updates = list(updates)
        for i, u in enumerate(updates):
            if not isinstance(u, SignalUpdate):
                raise TypeError(f"updates[{i}] must be a SignalUpdate, got {type(u).__name__}")
        missing: list[str] = []
        with self.store.write_mutex, self.store.transaction() as conn:
            for u in updates:
                row = self.store.product_doc(conn, u.id)
                if row is None:
                    missing.append(u.id)
                    continue
                changes = {
                    k: v for k, v in (("price", u.price), ("sales", u.sales), ("stock", u.stock)) if v is not None
                }
                self.store.update_signals(conn, row[0], row[1].model_copy(update=changes))
        return missing

    # ------------------------------------------------------------------ reads

    def get(self, ids: Sequence[str]) -> list[Product]:
        wanted = [str(i) for i in ids]
        if not wanted:
            return []
        self._check_open()
        return self.store.get(wanted)

    def bm25(self, text: str, filters: Filters | None, n: int) -> list[Candidate]:
        """BM25 over both analyses (title weighted over the rest), combined, filters inside the search."""
        self._check_open()
        if n <= 0 or not isinstance(text, str):
            return []
        query = self.lexical.query(text)
        if not query:
            return []
        with self.store.reader(snapshot=True) as conn:  # the ranking and the rows from one snapshot
            hits = self.lexical.search(conn, query, filters, n)
            products = self.store.products_by_pk(conn, [pk for pk, _ in hits])
        return [
            Candidate(id=products[pk].id, product=products[pk], bm25=score, ranks={"bm25": rank})
            for rank, (pk, score) in enumerate(hits, start=1)
        ]

    def bm25_analysis_scores(self, text: str) -> dict[str, dict[str, float]]:
        """Diagnostics and evaluation: every match's raw BM25 per analysis, {"words"|"cjk": {id: score}}."""
        self._check_open()
        with self.store.reader() as conn:
            return self.lexical.analysis_scores(conn, text)

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
                            allowed = None if filters is None else self.store.filtered_pks(conn, filters)
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
                "analysis": self.lexical.settings(),
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
                self.store.close()

    def __enter__(self) -> EmbeddedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
