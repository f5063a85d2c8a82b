"""The embedded store's source of truth: one SQLite database (WAL) holding products and their vectors.

Tables: `products` (the Product as JSON, the filter columns, the content hash, the vector blob),
`product_categories` (a side table for the category filter) and `meta` (schema version, the
`generation`, the vector dimension, the embedder binding). The lexical index adds its own tables
(see `lexical.py`); nothing here knows about them.

`generation` counts the commits that changed a vector: the vector index stamps itself with it, so a
stale or missing vector index is recognised and rebuilt from these rows.

Thread safety: readers take a pooled connection each (WAL: readers never block the writer); writes
run on one writer connection, serialised by `write_mutex`. `synchronous=FULL` by default
(`durable=False` → NORMAL): in WAL mode NORMAL survives application crashes, but a power loss can
roll back the last commits, and the loaders' checkpoints must never claim rows the store then lost.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from middleware.backends.base import BackendError
from middleware.products import Filters, Product

SCHEMA_VERSION = 1

_SCHEMA = """
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
"""


READER_MMAP_BYTES = 1 << 31  # address space, not memory: the OS pages in what reads touch
IN_PARAMS = 500  # a lookup this long binds one parameter per value; longer, one JSON array


def _rows_in(conn: sqlite3.Connection, sql: str, values: list[Any]) -> list[tuple[Any, ...]]:
    """`sql`'s rows with its `IN ({})` over `values`: bound parameters for a short list (twice as
    fast as json_each for a page of results), one JSON array for a long one (SQLite caps parameters)."""
    if not values:
        return []
    if len(values) <= IN_PARAMS:
        return conn.execute(sql.format(",".join("?" * len(values))), values).fetchall()
    return conn.execute(sql.format("SELECT value FROM json_each(?)"), (_json(values),)).fetchall()


def _json(values: Sequence[Any]) -> str:
    return json.dumps(list(values), ensure_ascii=False)


def filter_sql(filters: Filters | None, alias: str = "p") -> tuple[str, list[Any]]:
    """SQL conditions on `products AS <alias>` equivalent to `Filters.matches` (lists bound as JSON)."""
    if filters is None or filters.is_empty():
        return "1", []
    clauses: list[str] = []
    params: list[Any] = []
    if filters.category is not None:
        clauses.append(
            f"EXISTS (SELECT 1 FROM product_categories c WHERE c.pk = {alias}.pk"
            " AND c.category IN (SELECT value FROM json_each(?)))"
        )
        params.append(_json(filters.category))
    if filters.brand is not None:
        clauses.append(f"{alias}.brand IN (SELECT value FROM json_each(?))")
        params.append(_json(filters.brand))
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
        params.append(_json(filters.ids))
    for clause in filters.exclude or ():  # a product matching any exclude clause is left out
        where, more = filter_sql(clause, alias)
        # a NULL price compares as unknown: such a product matches no price bound, so is not excluded by one
        clauses.append(f"NOT coalesce(({where}), 0)")
        params.extend(more)
    return " AND ".join(clauses) or "1", params  # in_stock=False alone restricts nothing


class SqliteStore:
    """Connections, transactions, the meta table and the product rows of one SQLite database."""

    def __init__(
        self,
        db_path: Path,
        *,
        durable: bool = True,
        extra_schema: str = "",
        migrate: Callable[[sqlite3.Connection], object] | None = None,
    ) -> None:
        """Open (creating) the database; `extra_schema`: DDL of the tables other modules keep in it;
        `migrate`: run on the writer connection before that DDL (upgrades of older stores)."""
        self.db_path = db_path
        self._synchronous = "FULL" if durable else "NORMAL"
        self.write_mutex = threading.RLock()
        self._idle_readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        try:
            self._writer = self._connect(readonly=False)
            try:
                self._writer.executescript(_SCHEMA)
                if migrate is not None:
                    migrate(self._writer)
                self._writer.executescript(extra_schema)
                self._init_meta()
            except sqlite3.DatabaseError as exc:
                raise BackendError(f"{db_path} is not a usable shopsearch database: {exc}") from exc
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ connections

    def _connect(self, *, readonly: bool) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None, timeout=30)
        except sqlite3.Error as exc:
            raise BackendError(f"cannot open {self.db_path}: {exc}") from exc
        try:
            conn.execute("PRAGMA busy_timeout = 30000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise BackendError(f"{self.db_path}: SQLite refused WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            if readonly:
                conn.execute("PRAGMA query_only = 1")
                # a search reads a hundred rows scattered over the file: mapped pages skip a read call
                # and a copy each. SQLite caps the size at its compile-time maximum.
                conn.execute(f"PRAGMA mmap_size = {READER_MMAP_BYTES}")
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise BackendError(f"cannot open {self.db_path}: {exc}") from exc
            raise
        with self._connections_lock:
            self._all_connections.append(conn)
        return conn

    @contextlib.contextmanager
    def reader(self, *, snapshot: bool = False, mapped: bool = True) -> Iterator[sqlite3.Connection]:
        """A pooled read-only connection; `snapshot`: its statements share one read transaction;
        `mapped=False`: reads go through SQLite's own page cache, for scans of whole indexes, whose
        pages (and the kernel's fault-around neighbours) would otherwise stay mapped into this process."""
        try:
            conn = self._idle_readers.get_nowait()
        except queue.Empty:
            conn = self._connect(readonly=True)
        try:
            if not mapped:
                conn.execute("PRAGMA mmap_size = 0")
            if snapshot:
                conn.execute("BEGIN")
            yield conn
        finally:
            if conn.in_transaction:
                conn.rollback()
            if not mapped:
                conn.execute(f"PRAGMA mmap_size = {READER_MMAP_BYTES}")
            self._idle_readers.put(conn)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the writer connection (the caller holds `write_mutex`)."""
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._all_connections:
                conn.close()
            self._all_connections.clear()

    # ------------------------------------------------------------------ meta

    def _init_meta(self) -> None:
        with self.write_mutex, self.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', '0')")
        version = self.meta_int("schema_version")
        if version != SCHEMA_VERSION:
            raise BackendError(f"{self.db_path} has schema version {version}, this shopsearch expects {SCHEMA_VERSION}")

    def meta_int(self, key: str, conn: sqlite3.Connection | None = None) -> int | None:
        """An integer meta value (on the writer connection unless `conn` is given)."""
        row = (conn or self._writer).execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def meta_values(self, conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, str]:
        rows = conn.execute("SELECT key, value FROM meta WHERE key IN (SELECT value FROM json_each(?))", (_json(keys),))
        return dict(rows.fetchall())

    @staticmethod
    def set_meta(conn: sqlite3.Connection, key: str, value: str | None) -> None:
        """Set a meta value (None removes it), inside the caller's transaction."""
        if value is None:
            conn.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def generation(self) -> int:
        """The committed generation, as a reader sees it now (other processes' commits included)."""
        with self.reader() as conn:
            return self.meta_int("generation", conn) or 0

    @staticmethod
    def bump_counter(conn: sqlite3.Connection, key: str) -> int:
        """Increment an integer meta value (0 when absent) in the caller's transaction; returns the new value."""
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, '1')"
            " ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
            (key,),
        )
        return int(conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    @staticmethod
    def bump_generation(conn: sqlite3.Connection) -> int:
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        return int(conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    # ------------------------------------------------------------------ product rows (writes)

    @staticmethod
    def found_by_id(conn: sqlite3.Connection, ids: Sequence[str]) -> dict[str, tuple[int, bool]]:
        """{id: (pk, has a vector)} of the stored products among `ids`."""
        rows = _rows_in(conn, "SELECT id, pk, vector IS NOT NULL FROM products WHERE id IN ({})", list(ids))
        return {pid: (int(pk), bool(has_vector)) for pid, pk, has_vector in rows}

    @staticmethod
    def insert_many(conn: sqlite3.Connection, rows: Sequence[tuple[Product, bytes | None]]) -> list[int]:
        """New rows with their categories, in the caller's write transaction; returns their pks, in order.

        The pks follow the highest ever given (sqlite_sequence), as AUTOINCREMENT would give them one
        by one, so a pk is never reused; one statement per table per batch instead of per product."""
        if not rows:
            return []
        highest = conn.execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'products'), 0),"
            " coalesce((SELECT max(pk) FROM products), 0))"
        ).fetchone()[0]
        first = int(highest) + 1
        pks = list(range(first, first + len(rows)))
        conn.executemany(
            "INSERT INTO products (pk, id, doc, brand, price, stock, sales, content_hash, vector)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    pk,
                    product.id,
                    product.model_dump_json(),
                    product.brand,
                    product.price,
                    product.stock,
                    product.sales,
                    product.content_hash(),
                    blob,
                )
                for pk, (product, blob) in zip(pks, rows, strict=True)
            ],
        )
        conn.executemany(
            "INSERT OR IGNORE INTO product_categories (category, pk) VALUES (?, ?)",
            [(c, pk) for pk, (product, _) in zip(pks, rows, strict=True) for c in product.category],
        )
        return pks

    @staticmethod
    def delete_many(conn: sqlite3.Connection, pks: Sequence[int]) -> None:
        params = [(pk,) for pk in pks]
        conn.executemany("DELETE FROM product_categories WHERE pk = ?", params)
        conn.executemany("DELETE FROM products WHERE pk = ?", params)

    @staticmethod
    def product_doc(conn: sqlite3.Connection, product_id: str) -> tuple[int, Product] | None:
        row = conn.execute("SELECT pk, doc FROM products WHERE id = ?", (product_id,)).fetchone()
        return None if row is None else (int(row[0]), Product.from_stored_json(row[1]))

    @staticmethod
    def update_signals(conn: sqlite3.Connection, pk: int, product: Product) -> None:
        """Rewrite the JSON and the signal columns; text and vector stay as they are."""
        conn.execute(
            "UPDATE products SET doc = ?, price = ?, sales = ?, stock = ? WHERE pk = ?",
            (product.model_dump_json(), product.price, product.sales, product.stock, pk),
        )

    # ------------------------------------------------------------------ product rows (reads)

    def get(self, ids: Sequence[str]) -> list[Product]:
        with self.reader() as conn:
            docs = dict(_rows_in(conn, "SELECT id, doc FROM products WHERE id IN ({})", list(dict.fromkeys(ids))))
        return [Product.from_stored_json(docs[i]) for i in ids if i in docs]

    @staticmethod
    def products_by_pk(conn: sqlite3.Connection, pks: Sequence[int]) -> dict[int, Product]:
        return {
            pk: Product.from_stored_json(doc)
            for pk, doc in _rows_in(conn, "SELECT pk, doc FROM products WHERE pk IN ({})", list(pks))
        }

    @staticmethod
    def filtered_pks(conn: sqlite3.Connection, filters: Filters) -> np.ndarray:
        """The pks of the products matching `filters` (int64)."""
        where, params = filter_sql(filters)
        # no `vector IS NOT NULL` here: that reads every row, and the vector index skips pks it lacks anyway;
        # one comma-joined string parsed by numpy, not a Python tuple per row
        joined = conn.execute(f"SELECT group_concat(p.pk) FROM products p WHERE {where}", params).fetchone()[0]
        return np.fromstring(joined or "", dtype=np.int64, sep=",")

    def iter_ids(self, page: int = 1000) -> Iterator[str]:
        last = -1
        while True:
            with self.reader() as conn:
                rows = conn.execute(
                    "SELECT pk, id FROM products WHERE pk > ? ORDER BY pk LIMIT ?", (last, page)
                ).fetchall()
            if not rows:
                return
            for _, pid in rows:
                yield pid
            last = rows[-1][0]

    def content_hashes(self, ids: Sequence[str]) -> dict[str, str]:
        with self.reader() as conn:
            rows = conn.execute(
                "SELECT id, content_hash FROM products WHERE id IN (SELECT value FROM json_each(?))", (_json(ids),)
            ).fetchall()
        return dict(rows)

    @staticmethod
    def counts(conn: sqlite3.Connection) -> tuple[int, int]:
        """(products, products with a vector)."""
        products, vectors = conn.execute("SELECT count(*), count(vector) FROM products").fetchone()
        return int(products), int(vectors)

    def count(self) -> int:
        with self.reader() as conn:
            return int(conn.execute("SELECT count(*) FROM products").fetchone()[0])

    # ------------------------------------------------------------------ vectors, for the vector index

    def vector_pks(self) -> set[int]:
        """The pks of every stored vector."""
        return {r[0] for r in self._writer.execute("SELECT pk FROM products WHERE vector IS NOT NULL")}

    def vector_count(self) -> int:
        return int(self._writer.execute("SELECT count(*) FROM products WHERE vector IS NOT NULL").fetchone()[0])

    @contextlib.contextmanager
    def vector_snapshot(self) -> Iterator[tuple[int, int, Iterable[tuple[np.ndarray, np.ndarray]]]]:
        """(generation, vector count, (pks, vectors) batches in pk order), all from one read snapshot."""
        with self.reader(snapshot=True) as conn:
            generation = self.meta_int("generation", conn) or 0
            n_vectors = conn.execute("SELECT count(*) FROM products WHERE vector IS NOT NULL").fetchone()[0]

            def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
                cursor = conn.execute("SELECT pk, vector FROM products WHERE vector IS NOT NULL ORDER BY pk")
                while rows := cursor.fetchmany(4096):
                    pks = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                    vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1)
                    yield pks, np.ascontiguousarray(vecs, dtype=np.float32)

            yield generation, int(n_vectors), batches()
