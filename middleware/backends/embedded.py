"""The embedded backend: one directory with a SQLite database and a faiss index.

Layout of `data_dir`:
- `catalog.sqlite3` — the source of truth (WAL): products (the Product as JSON plus indexed filter
  columns), categories (side table), vectors (float32 blobs), the pre-computed tokens of both text
  analyses, and two FTS5 indexes over those tokens (jieba words; CJK unigrams + bigrams).
- `vectors.faiss` — derived: the vectors keyed by SQLite rowid (`pk`), stamped with the SQLite
  `generation` it reflects. Missing, unreadable or stale (a crash between the SQLite commit and the
  deferred save) → rebuilt from SQLite on open.

Why these choices:
- FTS5 tables are *external-content* over `product_text`, which stores each analysis's tokens
  space-joined. FTS5 needs the exact indexed tokens to delete a row; keeping them (rather than
  re-running jieba at delete time, as a contentless table would need on SQLite < 3.43) means an
  upgraded jieba dictionary can never leave orphaned index entries, and `'rebuild'` can regenerate
  both indexes from the stored tokens. Triggers on `product_text` keep the indexes in step.
- Every upsert gives the product a new rowid (AUTOINCREMENT: never reused). HNSW cannot remove
  vectors, so a replaced or deleted vector stays in the graph as a dead id that searches exclude
  with an id selector until the next compaction; a new rowid makes "dead" unambiguous.
- `synchronous=FULL` by default (`durable=False` → NORMAL): in WAL mode NORMAL survives application
  crashes but a power loss can roll back the last commits, and the loaders' checkpoints must never
  claim rows that the store then lost. Writes come in batches, so one fsync per commit is cheap.
- Thread safety: readers take a pooled connection each (WAL: readers never block the writer);
  SQL writes are serialised by one mutex; the faiss index sits behind a readers-writer lock, and a
  vector-changing write holds it from before its SQLite commit until faiss reflects it, so a knn
  never sees SQLite and faiss disagree within this process.

Known limit: FTS5 scores every product matching any query token (no WAND-style pruning), so BM25
latency grows with the number of matches: fine for catalogs up to a few hundred thousand products,
slow when a query's tokens occur in most of a million-product catalog (use OpenSearch there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from middleware.backends.base import NO_EMBEDDER, BackendError, EmbedderBinding, EmbedderMismatch, StoreStats
from middleware.products import Candidate, Filters, Product, SignalUpdate
from middleware.text import FTS5_TOKENIZE, cjk_tokens, jieba_tokens

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "catalog.sqlite3"
FAISS_NAME = "vectors.faiss"
_FAISS_MAGIC = b"SHOPSEARCH-FAISS"  # 16 bytes, then <QQ generation, vector count, then faiss bytes
_FAISS_HEADER = struct.Struct("<16sQQ")
# Hostile or pasted-document queries: bound the OR-query size (the server truncates long text anyway).
MAX_QUERY_TOKENS = 512

# How the two analyses' BM25 scores combine: score = words_weight·bm25_words + cjk_weight·bm25_cjk
# ("sum"), or each scaled by the query's best match first ("max"). Measured on QBQTC titles
# (benchmarks/analysis_qbqtc.py, all 17,089 queries with a relevant judgement, nDCG@10): words alone
# 0.7927, CJK uni+bigrams alone 0.8158, sum 1:1 0.8185 (R@100 0.8858, the highest), sum 1:2 0.8185,
# max 1:3 0.8186. Every combination from sum 1:1 to 1:3 and max 1:2–1:3 lies within 0.0001 (noise);
# sum 1:1 is the simplest and cheapest of that plateau (no window function over the matches).
DEFAULT_WORDS_WEIGHT = 1.0
DEFAULT_CJK_WEIGHT = 1.0
DEFAULT_COMBINE: Literal["sum", "max"] = "sum"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS products (
    pk INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL,
    brand TEXT,
    price REAL,
    stock INTEGER,
    sales INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    vector BLOB
);
-- covering the filter columns: filter scans never touch rows (whose vector blobs can be 4 KB each)
CREATE INDEX IF NOT EXISTS products_brand_filter ON products (brand, price, stock);
CREATE INDEX IF NOT EXISTS products_price_filter ON products (price, brand, stock);
CREATE TABLE IF NOT EXISTS product_categories (
    category TEXT NOT NULL,
    pk INTEGER NOT NULL,
    PRIMARY KEY (category, pk)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS product_categories_pk ON product_categories (pk);
CREATE TABLE IF NOT EXISTS product_text (
    pk INTEGER PRIMARY KEY,
    words_title TEXT NOT NULL,
    words_body TEXT NOT NULL,
    cjk_title TEXT NOT NULL,
    cjk_body TEXT NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS fts_words USING fts5 (
    words_title, words_body, content='product_text', content_rowid='pk', tokenize="{FTS5_TOKENIZE}"
);
CREATE VIRTUAL TABLE IF NOT EXISTS fts_cjk USING fts5 (
    cjk_title, cjk_body, content='product_text', content_rowid='pk', tokenize="{FTS5_TOKENIZE}"
);
CREATE TRIGGER IF NOT EXISTS product_text_ai AFTER INSERT ON product_text BEGIN
    INSERT INTO fts_words (rowid, words_title, words_body) VALUES (new.pk, new.words_title, new.words_body);
    INSERT INTO fts_cjk (rowid, cjk_title, cjk_body) VALUES (new.pk, new.cjk_title, new.cjk_body);
END;
CREATE TRIGGER IF NOT EXISTS product_text_ad AFTER DELETE ON product_text BEGIN
    INSERT INTO fts_words (fts_words, rowid, words_title, words_body)
        VALUES ('delete', old.pk, old.words_title, old.words_body);
    INSERT INTO fts_cjk (fts_cjk, rowid, cjk_title, cjk_body)
        VALUES ('delete', old.pk, old.cjk_title, old.cjk_body);
END;
CREATE TRIGGER IF NOT EXISTS product_text_au AFTER UPDATE ON product_text BEGIN
    INSERT INTO fts_words (fts_words, rowid, words_title, words_body)
        VALUES ('delete', old.pk, old.words_title, old.words_body);
    INSERT INTO fts_cjk (fts_cjk, rowid, cjk_title, cjk_body)
        VALUES ('delete', old.pk, old.cjk_title, old.cjk_body);
    INSERT INTO fts_words (rowid, words_title, words_body) VALUES (new.pk, new.words_title, new.words_body);
    INSERT INTO fts_cjk (rowid, cjk_title, cjk_body) VALUES (new.pk, new.cjk_title, new.cjk_body);
END;
"""


class _ReadWriteLock:
    """Many knn searches at once, or one writer changing the faiss index."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _fts_query(tokens: Sequence[str]) -> str:
    # every token a quoted string: user text can never become FTS5 syntax (AND, NEAR(, *, -, :)
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in tokens)


def _unique(tokens: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(tokens))[:MAX_QUERY_TOKENS]


def _filter_sql(filters: Filters | None, alias: str = "p") -> tuple[str, list[Any]]:
    """SQL conditions equivalent to `Filters.matches` (lists bound as one JSON parameter)."""
    if filters is None or filters.is_empty():
        return "1", []
    clauses: list[str] = []
    params: list[Any] = []
    if filters.category is not None:
        clauses.append(
            f"EXISTS (SELECT 1 FROM product_categories c WHERE c.pk = {alias}.pk"
            " AND c.category IN (SELECT value FROM json_each(?)))"
        )
        params.append(json.dumps(filters.category, ensure_ascii=False))
    if filters.brand is not None:
        clauses.append(f"{alias}.brand IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(filters.brand, ensure_ascii=False))
    if filters.price_min is not None:
        clauses.append(f"{alias}.price >= ?")
        params.append(filters.price_min)
    if filters.price_max is not None:
        clauses.append(f"{alias}.price <= ?")
        params.append(filters.price_max)
    if filters.in_stock:
        clauses.append(f"({alias}.stock IS NULL OR {alias}.stock > 0)")
    if filters.ids is not None:
        clauses.append(f"{alias}.id IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(filters.ids, ensure_ascii=False))
    return " AND ".join(clauses) or "1", params  # in_stock=False alone restricts nothing


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
        if words_weight < 0 or cjk_weight < 0 or words_weight + cjk_weight == 0:
            raise ValueError("words_weight and cjk_weight must be >= 0 and not both 0")
        if combine not in ("sum", "max"):
            raise ValueError(f"combine must be 'sum' or 'max', got {combine!r}")
        self.data_dir = Path(data_dir)
        self.words_weight = float(words_weight)
        self.cjk_weight = float(cjk_weight)
        self.combine = combine
        self.title_weight = float(title_weight)
        self.body_weight = float(body_weight)
        self.hnsw_threshold = hnsw_threshold
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construction = hnsw_ef_construction
        self.hnsw_ef_search = hnsw_ef_search
        self.exact_max = exact_max
        self.save_interval_s = save_interval_s
        self.save_every = save_every
        self._expected_dim = dim
        self._closed = False

        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create data directory {self.data_dir}: {exc}") from exc
        self._db_path = self.data_dir / DB_NAME
        self._faiss_path = self.data_dir / FAISS_NAME
        self._synchronous = "FULL" if durable else "NORMAL"

        self._write_mutex = threading.RLock()
        self._faiss_lock = _ReadWriteLock()
        self._idle_readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()

        # faiss state, guarded by _faiss_lock
        self._index: faiss.Index | None = None
        self._index_kind: str | None = None
        self._index_generation = -1
        self._dead: set[int] = set()
        self._dead_selector: tuple[faiss.IDSelectorBatch, faiss.IDSelectorNot] | None = None
        self._positions: tuple[np.ndarray, np.ndarray] | None = None  # HNSW exact path, see _exact_over
        self._unsaved = 0
        self._last_save = time.monotonic()
        self._dim: int | None = None

        try:
            self._writer = self._connect(readonly=False)
            try:
                self._writer.executescript(_SCHEMA)
                self._init_meta()
            except sqlite3.DatabaseError as exc:
                raise BackendError(f"{self._db_path} is not a usable shopsearch database: {exc}") from exc
            stored_dim = self._meta_int("dim")
            if dim is not None and stored_dim is not None and dim != stored_dim:
                raise ValueError(
                    f"dim mismatch: {self.data_dir} holds {stored_dim}-d vectors but {dim}-d were asked for "
                    "(a different embedder?); index into a new data directory"
                )
            self._dim = stored_dim
            self._load_or_rebuild_index()
        except BaseException:
            self._close_connections()
            raise

    # ------------------------------------------------------------------ connections and meta

    def _connect(self, *, readonly: bool) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self._db_path, check_same_thread=False, isolation_level=None, timeout=30)
        except sqlite3.Error as exc:
            raise BackendError(f"cannot open {self._db_path}: {exc}") from exc
        try:
            conn.execute("PRAGMA busy_timeout = 30000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise BackendError(f"{self._db_path}: SQLite refused WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            if readonly:
                conn.execute("PRAGMA query_only = 1")
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise BackendError(f"cannot open {self._db_path}: {exc}") from exc
            raise
        with self._connections_lock:
            self._all_connections.append(conn)
        return conn

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        self._check_open()
        try:
            conn = self._idle_readers.get_nowait()
        except queue.Empty:
            conn = self._connect(readonly=True)
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.rollback()
            self._idle_readers.put(conn)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One serialised write transaction on the writer connection."""
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    def _init_meta(self) -> None:
        with self._write_mutex, self._transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', '0')")
        version = self._meta_int("schema_version")
        if version != SCHEMA_VERSION:
            raise BackendError(
                f"{self._db_path} has schema version {version}, this shopsearch expects {SCHEMA_VERSION}"
            )

    def _meta_int(self, key: str, conn: sqlite3.Connection | None = None) -> int | None:
        row = (conn or self._writer).execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"the embedded backend at {self.data_dir} is closed")

    # ------------------------------------------------------------------ faiss index (derived data)

    def _new_index(self, n_vectors: int) -> tuple[faiss.Index, str]:
        assert self._dim is not None
        if n_vectors >= self.hnsw_threshold:
            hnsw = faiss.IndexHNSWFlat(self._dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = self.hnsw_ef_construction
            hnsw.hnsw.efSearch = self.hnsw_ef_search
            return faiss.IndexIDMap2(hnsw), "hnsw"
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self._dim)), "flat"

    def _rebuild_index(self) -> None:
        """Build the faiss index from SQLite's vectors (caller holds the faiss write lock)."""
        with self._reader() as conn:
            conn.execute("BEGIN")  # one snapshot: the generation and the vectors it describes
            generation = self._meta_int("generation", conn) or 0
            n_vectors = conn.execute("SELECT count(*) FROM products WHERE vector IS NOT NULL").fetchone()[0]
            if n_vectors == 0 or self._dim is None:
                self._index, self._index_kind = None, None
            else:
                index, kind = self._new_index(n_vectors)
                cursor = conn.execute("SELECT pk, vector FROM products WHERE vector IS NOT NULL ORDER BY pk")
                while rows := cursor.fetchmany(4096):
                    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                    vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1)
                    index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), ids)
                self._index, self._index_kind = index, kind
            conn.rollback()
        self._dead, self._dead_selector, self._positions = set(), None, None
        self._index_generation = generation
        self._unsaved = 1  # differs from the file (or there is no file yet)

    def _load_or_rebuild_index(self) -> None:
        with self._faiss_lock.write():
            generation = self._meta_int("generation") or 0
            n_vectors = self._writer.execute("SELECT count(*) FROM products WHERE vector IS NOT NULL").fetchone()[0]
            if n_vectors == 0:
                self._index, self._index_kind, self._index_generation = None, None, generation
                self._faiss_path.unlink(missing_ok=True)
                return
            if self._try_load(generation):
                return
            log.info("rebuilding the vector index of %s from SQLite (%d vectors)", self.data_dir, n_vectors)
            self._rebuild_index()
            self._save_index()

    def _try_load(self, generation: int) -> bool:
        """Load vectors.faiss if it reflects exactly SQLite's current vectors."""
        try:
            with open(self._faiss_path, "rb") as f:
                magic, file_generation, _count = _FAISS_HEADER.unpack(f.read(_FAISS_HEADER.size))
                if magic != _FAISS_MAGIC or file_generation != generation:
                    log.info(
                        "stale vector index in %s: generation %d, SQLite at %d",
                        self.data_dir,
                        file_generation,
                        generation,
                    )
                    return False
                index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        except FileNotFoundError:
            return False
        except (OSError, RuntimeError, struct.error) as exc:
            log.warning("vector index of %s is unreadable (%s); rebuilding", self.data_dir, exc)
            return False
        if not isinstance(index, faiss.IndexIDMap2) or index.d != self._dim:
            return False
        faiss_ids = set(faiss.vector_to_array(index.id_map).tolist())
        sql_ids = {r[0] for r in self._writer.execute("SELECT pk FROM products WHERE vector IS NOT NULL")}
        kind = "hnsw" if isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW) else "flat"
        # a flat index holds exactly SQLite's vectors; an HNSW one may also hold dead (replaced) ids
        if not sql_ids <= faiss_ids or (kind == "flat" and faiss_ids != sql_ids):
            log.warning("vector index of %s disagrees with SQLite; rebuilding", self.data_dir)
            return False
        if kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = self.hnsw_ef_search
        self._index, self._index_kind, self._index_generation = index, kind, generation
        self._dead, self._dead_selector, self._positions = faiss_ids - sql_ids, None, None
        self._unsaved = 0
        return True

    def _save_index(self) -> None:
        """Write the index atomically (tmp + fsync + rename), stamped with its generation."""
        if self._index is None:
            self._faiss_path.unlink(missing_ok=True)
            self._unsaved = 0
            return
        tmp = self._faiss_path.with_name(self._faiss_path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_FAISS_HEADER.pack(_FAISS_MAGIC, self._index_generation, self._index.ntotal))
            faiss.write_index(self._index, faiss.PyCallbackIOWriter(f.write))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._faiss_path)
        self._unsaved = 0
        self._last_save = time.monotonic()

    def _maybe_save(self) -> None:
        due = time.monotonic() - self._last_save >= self.save_interval_s
        if self._unsaved and (self._unsaved >= self.save_every or due):
            self._save_index()

    def _apply_vector_changes(
        self, removed: list[int], added_ids: list[int], added: np.ndarray | None, generation: int
    ) -> None:
        """Mirror a committed SQLite write in faiss (caller holds the faiss write lock)."""
        try:
            live = (self._index.ntotal - len(self._dead)) if self._index is not None else 0
            live_after = live - len(removed) + len(added_ids)
            needs_rebuild = (
                self._index is None
                or self._index_generation != generation - 1  # another process wrote in between
                or (self._index_kind == "flat" and live_after >= self.hnsw_threshold)
                or (self._index_kind == "hnsw" and live_after < self.hnsw_threshold // 2)
                or (self._index_kind == "hnsw" and len(self._dead) + len(removed) > 0.25 * max(live_after, 1))
            )
            if needs_rebuild:
                self._rebuild_index()
            else:
                assert self._index is not None
                if removed:
                    if self._index_kind == "flat":
                        self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(removed, dtype=np.int64)))
                    else:
                        self._dead.update(removed)
                        self._dead_selector = None
                if added_ids:
                    assert added is not None
                    self._index.add_with_ids(added, np.asarray(added_ids, dtype=np.int64))
                    self._positions = None
                self._index_generation = generation
                self._unsaved += len(removed) + len(added_ids)
        except Exception:
            # SQLite has committed; a half-applied faiss change must not be served: rebuild on next use
            log.exception("updating the vector index failed; it will be rebuilt from SQLite")
            self._index, self._index_generation = None, -1
            return
        try:
            self._maybe_save()
        except OSError as exc:  # the in-memory index is right; a stale file is rebuilt on the next open
            log.warning("could not save the vector index of %s: %s", self.data_dir, exc)

    def _current_index(self) -> None:
        """Make sure the in-memory index reflects SQLite (caller holds the faiss write lock)."""
        if self._index_generation != (self._meta_int_read("generation") or 0):
            self._rebuild_index()

    # ------------------------------------------------------------------ writes

    def _check_vectors(self, vectors: np.ndarray | None, n: int) -> np.ndarray | None:
        if vectors is None:
            return None
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise ValueError(f"vectors must have shape ({n}, dim) for {n} products, got {arr.shape}")
        dim = self._dim if self._dim is not None else self._expected_dim
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
        rows = []
        for i in order:
            p = products[i]
            body = p.search_text()
            rows.append(
                (
                    p,
                    None if vecs is None else vecs[i].astype("<f4").tobytes(),
                    " ".join(jieba_tokens(p.title)),
                    " ".join(jieba_tokens(body)),
                    " ".join(cjk_tokens(p.title)),
                    " ".join(cjk_tokens(body)),
                )
            )
        with self._write_mutex, self._faiss_lock.write():
            removed: list[int] = []
            added_ids: list[int] = []
            with self._transaction() as conn:
                if vecs is not None and self._dim is None:
                    bound = self._binding(conn)
                    if bound is not None and bound.dim is None:
                        wanted = f"{vecs.shape[1]}-d vectors"
                        raise EmbedderMismatch(str(self.data_dir), bound, wanted, "index into a new data directory")
                    conn.execute("INSERT INTO meta (key, value) VALUES ('dim', ?)", (str(vecs.shape[1]),))
                for p, blob, words_title, words_body, cjk_title, cjk_body in rows:
                    old = conn.execute("SELECT pk, vector IS NOT NULL FROM products WHERE id = ?", (p.id,)).fetchone()
                    if old is not None:
                        self._delete_pk(conn, old[0])
                        if old[1]:
                            removed.append(old[0])
                    cur = conn.execute(
                        "INSERT INTO products (id, doc, brand, price, stock, sales, content_hash, vector)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            p.id,
                            p.model_dump_json(),
                            p.brand,
                            p.price,
                            p.stock,
                            p.sales,
                            p.content_hash(),
                            blob,
                        ),
                    )
                    pk = cur.lastrowid
                    conn.execute(
                        "INSERT INTO product_text (pk, words_title, words_body, cjk_title, cjk_body)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (pk, words_title, words_body, cjk_title, cjk_body),
                    )
                    conn.executemany(
                        "INSERT OR IGNORE INTO product_categories (category, pk) VALUES (?, ?)",
                        [(c, pk) for c in p.category],
                    )
                    if blob is not None:
                        added_ids.append(pk)
                generation = self._bump_generation(conn) if (removed or added_ids) else None
            if vecs is not None and self._dim is None:
                self._dim = vecs.shape[1]
            if generation is not None:
                added = None
                if added_ids:
                    added = np.stack([vecs[i] for i in order])  # type: ignore[index]
                self._apply_vector_changes(removed, added_ids, added, generation)

    @staticmethod
    def _delete_pk(conn: sqlite3.Connection, pk: int) -> None:
        conn.execute("DELETE FROM product_text WHERE pk = ?", (pk,))  # triggers remove the FTS rows
        conn.execute("DELETE FROM product_categories WHERE pk = ?", (pk,))
        conn.execute("DELETE FROM products WHERE pk = ?", (pk,))

    @staticmethod
    def _bump_generation(conn: sqlite3.Connection) -> int:
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        return int(conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def delete(self, ids: Sequence[str]) -> int:
        self._check_open()
        wanted = list(dict.fromkeys(str(i) for i in ids))
        if not wanted:
            return 0
        with self._write_mutex, self._faiss_lock.write():
            with self._transaction() as conn:
                found = conn.execute(
                    "SELECT pk, vector IS NOT NULL FROM products WHERE id IN (SELECT value FROM json_each(?))",
                    (json.dumps(wanted, ensure_ascii=False),),
                ).fetchall()
                for pk, _ in found:
                    self._delete_pk(conn, pk)
                removed = [pk for pk, has_vector in found if has_vector]
                generation = self._bump_generation(conn) if removed else None
            if generation is not None:
                self._apply_vector_changes(removed, [], None, generation)
        return len(found)

    def update_signals(self, updates: Sequence[SignalUpdate]) -> list[str]:
        """Change price/sales/stock in the row and its JSON; text, tokens and vectors stay as they are."""
        self._check_open()
        updates = list(updates)
        for i, u in enumerate(updates):
            if not isinstance(u, SignalUpdate):
                raise TypeError(f"updates[{i}] must be a SignalUpdate, got {type(u).__name__}")
        missing: list[str] = []
        with self._write_mutex, self._transaction() as conn:
            for u in updates:
                row = conn.execute("SELECT pk, doc FROM products WHERE id = ?", (u.id,)).fetchone()
                if row is None:
                    missing.append(u.id)
                    continue
                changes = {
                    k: v for k, v in (("price", u.price), ("sales", u.sales), ("stock", u.stock)) if v is not None
                }
                product = Product.model_validate_json(row[1]).model_copy(update=changes)
                conn.execute(
                    "UPDATE products SET doc = ?, price = ?, sales = ?, stock = ? WHERE pk = ?",
                    (product.model_dump_json(), product.price, product.sales, product.stock, row[0]),
                )
        return missing

    # ------------------------------------------------------------------ reads

    def get(self, ids: Sequence[str]) -> list[Product]:
        wanted = [str(i) for i in ids]
        if not wanted:
            return []
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT id, doc FROM products WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(wanted, ensure_ascii=False),),
            ).fetchall()
        docs = {pid: doc for pid, doc in rows}
        return [Product.model_validate_json(docs[i]) for i in wanted if i in docs]

    def _products_by_pk(self, conn: sqlite3.Connection, pks: Sequence[int]) -> dict[int, Product]:
        rows = conn.execute(
            "SELECT pk, doc FROM products WHERE pk IN (SELECT value FROM json_each(?))",
            (json.dumps(list(pks)),),
        ).fetchall()
        return {pk: Product.model_validate_json(doc) for pk, doc in rows}

    def _analysis_queries(self, text: str) -> list[tuple[str, str, float]]:
        """(fts table, MATCH expression, weight) for each analysis that takes part."""
        parts = []
        if self.words_weight > 0 and (words := _unique(jieba_tokens(text))):
            parts.append(("fts_words", _fts_query(words), self.words_weight))
        if self.cjk_weight > 0 and (chars := _unique(cjk_tokens(text))):
            parts.append(("fts_cjk", _fts_query(chars), self.cjk_weight))
        return parts

    def bm25(self, text: str, filters: Filters | None, n: int) -> list[Candidate]:
        """BM25 over both analyses (title weighted over the rest), combined, filters in the WHERE."""
        self._check_open()
        if n <= 0 or not isinstance(text, str):
            return []
        parts = self._analysis_queries(text)
        if not parts:
            return []
        # FTS5's bm25() is lower-is-better (negative): negate so higher is better. Each analysis is a
        # MATERIALIZED CTE: a lone subquery would be flattened into the GROUP BY below, where SQLite
        # refuses bm25() ("unable to use function bm25 in the requested context").
        ctes, per_analysis = [], []
        cte_params: list[Any] = []
        weight_params: list[Any] = []
        columns = [self.title_weight, self.body_weight]
        for i, (table, match, weight) in enumerate(parts):
            cte_params += [*columns, match]
            ctes.append(
                f"a{i} AS MATERIALIZED ("
                f"SELECT rowid AS pk, -bm25({table}, ?, ?) AS s FROM {table} WHERE {table} MATCH ?)"
            )
            weight_params.append(weight)
            # "max": each analysis scaled to (0, 1] by its best match
            score = "coalesce(s / nullif(max(s) OVER (), 0), 0)" if self.combine == "max" else "s"
            per_analysis.append(f"SELECT pk, ? * {score} AS score FROM a{i}")
        params = [*cte_params, *weight_params]
        where, filter_params = _filter_sql(filters, alias="f")
        # rank on the filter columns alone; only the top n rows' JSON is read
        sql = (
            f"WITH {', '.join(ctes)} "
            "SELECT p.pk, p.doc, top.score FROM ("
            "SELECT s.pk, s.score FROM ("
            f"SELECT pk, sum(score) AS score FROM ({' UNION ALL '.join(per_analysis)}) GROUP BY pk"
            f") s JOIN products f ON f.pk = s.pk WHERE {where} ORDER BY s.score DESC, s.pk LIMIT ?"
            ") top JOIN products p ON p.pk = top.pk ORDER BY top.score DESC, top.pk"
        )
        with self._reader() as conn:
            rows = conn.execute(sql, [*params, *filter_params, n]).fetchall()
        return [
            Candidate(
                id=(product := Product.model_validate_json(doc)).id,
                product=product,
                bm25=float(score),
                ranks={"bm25": rank},
            )
            for rank, (_pk, doc, score) in enumerate(rows, start=1)
        ]

    def bm25_analysis_scores(self, text: str) -> dict[str, dict[str, float]]:
        """Diagnostics and evaluation: every match's raw BM25 per analysis, {"words"|"cjk": {id: score}}."""
        out: dict[str, dict[str, float]] = {"words": {}, "cjk": {}}
        tokens = {"words": _unique(jieba_tokens(text)), "cjk": _unique(cjk_tokens(text))}
        with self._reader() as conn:
            for name, table in (("words", "fts_words"), ("cjk", "fts_cjk")):
                if not tokens[name]:
                    continue
                rows = conn.execute(
                    f"SELECT p.id, -bm25({table}, ?, ?) FROM {table} JOIN products p ON p.pk = {table}.rowid"
                    f" WHERE {table} MATCH ?",
                    (self.title_weight, self.body_weight, _fts_query(tokens[name])),
                ).fetchall()
                out[name] = dict(rows)
        return out

    def knn(self, vector: np.ndarray, filters: Filters | None, n: int) -> list[Candidate]:
        """Exact (flat) or HNSW inner-product top-n among the products matching `filters`."""
        self._check_open()
        if n <= 0 or self._dim is None:
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self._dim:
            raise ValueError(f"query vector has {query.shape[1]} dimensions, the store holds {self._dim}-d vectors")
        if not np.isfinite(query).all():
            raise ValueError("query vector contains NaN or infinite values")
        if filters is not None and filters.is_empty():
            filters = None
        while True:
            with self._faiss_lock.read():
                if self._index_generation == (self._meta_int_read("generation") or 0):
                    with self._reader() as conn:
                        hits = self._knn_search(conn, query, filters, n)
                        products = self._products_by_pk(conn, [pk for pk, _ in hits])
                    break
            with self._faiss_lock.write():  # another process wrote, or a failed update: catch up
                self._current_index()
        out = []
        for pk, score in hits:
            if pk in products:
                product = products[pk]
                out.append(Candidate(id=product.id, product=product, knn=score, ranks={"knn": len(out) + 1}))
        return out

    def _meta_int_read(self, key: str) -> int | None:
        with self._reader() as conn:
            return self._meta_int(key, conn)

    def _knn_search(
        self, conn: sqlite3.Connection, query: np.ndarray, filters: Filters | None, n: int
    ) -> list[tuple[int, float]]:
        index = self._index
        if index is None or index.ntotal == 0:
            return []
        live = index.ntotal - len(self._dead)
        params: faiss.SearchParameters | None = None
        if filters is not None:
            where, filter_params = _filter_sql(filters)
            # no `vector IS NOT NULL` here: that reads every row, and faiss skips ids it lacks anyway
            sql = f"SELECT p.pk FROM products p WHERE {where}"
            allowed = np.fromiter((r[0] for r in conn.execute(sql, filter_params)), dtype=np.int64)
            if allowed.size == 0:
                return []
            k = min(n, int(allowed.size))
            # a selective filter starves an HNSW walk of allowed neighbours: search the subset exactly
            if self._index_kind == "hnsw" and (allowed.size <= self.exact_max or allowed.size < 0.05 * live):
                return self._exact_over(query, allowed, k)
            selector = faiss.IDSelectorBatch(allowed)
            if self._index_kind == "hnsw":
                ef = max(self.hnsw_ef_search, k)
                ef = min(math.ceil(ef * live / allowed.size), 10 * ef)  # selective filter: look wider
                params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
            else:
                params = faiss.SearchParameters(sel=selector)
        else:
            k = min(n, live)
            if self._index_kind == "hnsw":
                params = faiss.SearchParametersHNSW(efSearch=max(self.hnsw_ef_search, k))
                if self._dead:
                    params.sel = self._exclude_dead()
        if k <= 0:
            return []
        scores, ids = index.search(query, k, params=params)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        hits.sort(key=lambda h: (-h[1], h[0]))
        return hits

    def _exclude_dead(self) -> faiss.IDSelectorNot:
        """A selector of every id but the dead ones, cached until the dead set changes."""
        cached = self._dead_selector
        if cached is None:
            # keep the inner selector referenced: IDSelectorNot does not own it
            inner = faiss.IDSelectorBatch(np.fromiter(self._dead, dtype=np.int64, count=len(self._dead)))
            cached = self._dead_selector = (inner, faiss.IDSelectorNot(inner))
        return cached[1]

    def _exact_over(self, query: np.ndarray, allowed: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Exact top-k over a filtered subset: brute force over the HNSW graph's own flat storage
        (no second copy of the vectors), restricted to the subset's positions."""
        assert self._index is not None
        if self._positions is None:  # rowid of each position, and positions ordered by rowid
            id_map = faiss.vector_to_array(self._index.id_map)
            self._positions = (id_map, np.argsort(id_map, kind="stable"))
        id_map, by_id = self._positions
        where = by_id[np.searchsorted(id_map, allowed, sorter=by_id).clip(0, len(by_id) - 1)]
        positions = where[id_map[where] == allowed]
        storage = faiss.downcast_index(faiss.downcast_index(self._index.index).storage)
        selector = faiss.IDSelectorBatch(positions.astype(np.int64))
        scores, found = storage.search(query, k, params=faiss.SearchParameters(sel=selector))
        hits = [(int(id_map[p]), float(s)) for p, s in zip(found[0], scores[0], strict=True) if p >= 0]
        hits.sort(key=lambda h: (-h[1], h[0]))
        return hits

    def iter_ids(self) -> Iterator[str]:
        last = -1
        while True:
            with self._reader() as conn:
                rows = conn.execute(
                    "SELECT pk, id FROM products WHERE pk > ? ORDER BY pk LIMIT 1000", (last,)
                ).fetchall()
            if not rows:
                return
            for _, pid in rows:
                yield pid
            last = rows[-1][0]

    def content_hashes(self, ids: Sequence[str]) -> dict[str, str]:
        wanted = [str(i) for i in ids]
        if not wanted:
            return {}
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT id, content_hash FROM products WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(wanted, ensure_ascii=False),),
            ).fetchall()
        return dict(rows)

    def count(self) -> int:
        with self._reader() as conn:
            return int(conn.execute("SELECT count(*) FROM products").fetchone()[0])

    def embedder_binding(self) -> EmbedderBinding | None:
        with self._reader() as conn:
            return self._binding(conn)

    def _binding(self, conn: sqlite3.Connection) -> EmbedderBinding | None:
        rows = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('embedder', 'dim')").fetchall())
        if "embedder" not in rows:
            return None
        model = rows["embedder"]
        return EmbedderBinding(model, None if model == NO_EMBEDDER else int(rows["dim"]))

    def bind_embedder(self, binding: EmbedderBinding) -> None:
        """Record the embedder in the meta table. An empty store may be re-bound (its vector dimension
        changes with it); a store with products keeps its embedder. A store indexed before bindings
        were recorded adopts the binding when its vectors have the binding's dimension."""
        self._check_open()
        if not isinstance(binding, EmbedderBinding):
            raise TypeError(f"binding must be an EmbedderBinding, got {type(binding).__name__}")
        remedy = "index into a new data directory (--data-dir)"
        with self._write_mutex, self._faiss_lock.write():
            with self._transaction() as conn:
                recorded = self._binding(conn)
                if recorded == binding:
                    return
                products, vectors = conn.execute("SELECT count(*), count(vector) FROM products").fetchone()
                if products and recorded is not None:
                    raise EmbedderMismatch(str(self.data_dir), recorded, binding, remedy)
                stored_dim = self._meta_int("dim", conn)
                if vectors and binding.dim != stored_dim:
                    raise EmbedderMismatch(str(self.data_dir), f"{stored_dim}-d vectors", binding, remedy)
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('embedder', ?)", (binding.model,))
                if binding.dim is not None:
                    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('dim', ?)", (str(binding.dim),))
                elif not vectors:
                    conn.execute("DELETE FROM meta WHERE key = 'dim'")
            if not vectors and self._dim != binding.dim:
                # no vector is left to keep: the next vector write builds an index of the new dimension
                self._dim = binding.dim
                self._index, self._index_kind = None, None
                self._dead, self._dead_selector, self._positions = set(), None, None

    def stats(self) -> StoreStats:
        with self._reader() as conn:
            products, vectors = conn.execute("SELECT count(*), count(vector) FROM products").fetchone()
            generation = self._meta_int("generation", conn)
            binding = self._binding(conn)
        with self._faiss_lock.read():
            index_vectors = 0 if self._index is None else self._index.ntotal
            dead = len(self._dead)
            kind = self._index_kind
        size = sum(f.stat().st_size for f in self.data_dir.iterdir() if f.is_file())
        return StoreStats(
            backend="embedded",
            products=int(products),
            vectors=int(vectors),
            dim=self._dim,
            size_bytes=size,
            embedder=binding,
            generation=generation,
            details={
                "data_dir": str(self.data_dir),
                "index_type": kind,
                "index_vectors": int(index_vectors),
                "index_dead": dead,
                "analysis": {
                    "words_weight": self.words_weight,
                    "cjk_weight": self.cjk_weight,
                    "combine": self.combine,
                },
            },
        )

    # ------------------------------------------------------------------ lifecycle

    def flush(self) -> None:
        """Save the vector index now if it has unsaved changes."""
        self._check_open()
        with self._faiss_lock.write():
            if self._unsaved and self._index_generation == (self._meta_int_read("generation") or 0):
                self._save_index()

    def close(self) -> None:
        if self._closed:
            return
        with self._write_mutex:
            try:
                self.flush()
            finally:
                self._closed = True
                self._close_connections()

    def _close_connections(self) -> None:
        with self._connections_lock:
            for conn in self._all_connections:
                conn.close()
            self._all_connections.clear()

    def __enter__(self) -> EmbeddedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
