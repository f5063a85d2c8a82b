"""The "before" engine of the lexical benchmark: the embedded store's SQLite FTS5 lexical index, frozen.

A verbatim copy of `middleware/backends/embedded/lexical.py` as it was before the tantivy engine
replaced it (its `filter_sql` and `FTS5_TOKENIZE` copied in too, so later changes to the store cannot
change this engine), followed by `LegacyFts5Store`: a small harness that creates the engine's tables
in a scratch SQLite database beside a minimal `products` table (the filter columns and the product
JSON), loads products, and answers `bm25(text, filters, n)` the way `EmbeddedBackend.bm25` did: the
query's tokens, the ranking SQL with the filters joined in, then the top rows' JSON parsed back into
`Product`s, in one read snapshot.

The copied module's own docstring follows.

The embedded store's lexical index: BM25 over two analyses of each product, in SQLite FTS5.

The seam (what the backend calls; another engine, e.g. a tantivy index, implements the same):

- `analyze(product) -> LexicalDoc`: the product's tokens. The slow part of a write (jieba), so the
  backend calls it before taking any lock.
- `add(conn, pk, doc)` / `remove(conn, pk)`: called inside the store's write transaction, keyed by
  the store's pk (a replaced product gets a new pk, so a pk is never re-used for other text). This
  engine writes its rows in that same transaction. A derived engine outside SQLite would record the
  change there and apply it once the transaction commits, stamping itself with the store's
  generation as the vector index does, and rebuild from `analyze` of the stored products when its
  stamp is stale.
- `query(text) -> LexicalQuery`: the query's tokens per analysis (empty: nothing to search).
- `search(conn, query, filters, n) -> [(pk, score)]`: top-n, higher is better, ties by pk, the
  filters applied inside the search (here: joined with the store's filter columns).
- `analysis_scores(conn, text)`: every match's raw score per analysis, by product id (diagnostics).
- `count(conn)`: documents indexed (equals the store's products when the index is in step).

How this engine stores it: `product_text` keeps each analysis's tokens space-joined, and two FTS5
tables are *external-content* over it (jieba words; CJK unigrams + bigrams). FTS5 needs the exact
indexed tokens to delete a row; keeping them (rather than re-running jieba at delete time, as a
contentless table would need on SQLite < 3.43) means an upgraded jieba dictionary can never leave
orphaned index entries, and `'rebuild'` can regenerate both indexes from the stored tokens.
Triggers on `product_text` keep the FTS tables in step.

Known limit: FTS5 scores every product matching any query token (no WAND-style pruning), so BM25
latency grows with the number of matches: fine for catalogs up to a few hundred thousand products,
slow when a query's tokens occur in most of a million-product catalog (use OpenSearch there).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from middleware.products import Filters, Product
from middleware.text import cjk_tokens, jieba_tokens

# copied from middleware/text.py: the FTS5 tokenizer that reads the space-joined tokens back
FTS5_TOKENIZE = "unicode61 remove_diacritics 0 categories 'L* N* Co M*' tokenchars '._'''"


def _json(values: Sequence[Any]) -> str:
    return json.dumps(list(values), ensure_ascii=False)


# copied from middleware/backends/embedded/store.py
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
    return " AND ".join(clauses) or "1", params  # in_stock=False alone restricts nothing


# Hostile or pasted-document queries: bound the OR-query size (the server truncates long text anyway).
MAX_QUERY_TOKENS = 512

# How the two analyses' BM25 scores combine: score = words_weight·bm25_words + cjk_weight·bm25_cjk
# ("sum"), or each scaled by the query's best match first ("max"). Measured on QBQTC titles
# (benchmarks/analysis_qbqtc.py, nDCG@10 over every query with a relevant judgement): every
# combination from sum 1:1 to 1:3 and max 1:2–1:3 lies on one plateau, within noise of each other,
# and above either analysis alone; sum 1:1 is the simplest and cheapest of that plateau (no window
# function over the matches).
DEFAULT_WORDS_WEIGHT = 1.0
DEFAULT_CJK_WEIGHT = 1.0
DEFAULT_COMBINE: Literal["sum", "max"] = "sum"

ANALYSES = ("words", "cjk")
_TABLES = {"words": "fts_words", "cjk": "fts_cjk"}

SCHEMA = f"""
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


@dataclass(frozen=True)
class LexicalDoc:
    """A product's tokens: (title, body) per analysis."""

    words_title: list[str]
    words_body: list[str]
    cjk_title: list[str]
    cjk_body: list[str]


@dataclass(frozen=True)
class LexicalQuery:
    """A query's distinct tokens per analysis taking part (at most MAX_QUERY_TOKENS each)."""

    tokens: dict[str, list[str]]

    def __bool__(self) -> bool:
        return any(self.tokens.values())


def _fts_query(tokens: Sequence[str]) -> str:
    # every token a quoted string: user text can never become FTS5 syntax (AND, NEAR(, *, -, :)
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in tokens)


def _unique(tokens: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(tokens))[:MAX_QUERY_TOKENS]


class Fts5LexicalIndex:
    """BM25 over jieba words and CJK uni/bigrams, title weighted over the rest, two analyses combined."""

    schema = SCHEMA

    def __init__(
        self,
        *,
        words_weight: float = DEFAULT_WORDS_WEIGHT,
        cjk_weight: float = DEFAULT_CJK_WEIGHT,
        combine: Literal["sum", "max"] = DEFAULT_COMBINE,
        title_weight: float = 2.0,
        body_weight: float = 1.0,
    ) -> None:
        if words_weight < 0 or cjk_weight < 0 or words_weight + cjk_weight == 0:
            raise ValueError("words_weight and cjk_weight must be >= 0 and not both 0")
        if combine not in ("sum", "max"):
            raise ValueError(f"combine must be 'sum' or 'max', got {combine!r}")
        self.words_weight = float(words_weight)
        self.cjk_weight = float(cjk_weight)
        self.combine = combine
        self.title_weight = float(title_weight)
        self.body_weight = float(body_weight)

    def settings(self) -> dict[str, Any]:
        return {"words_weight": self.words_weight, "cjk_weight": self.cjk_weight, "combine": self.combine}

    # ------------------------------------------------------------------ writes

    @staticmethod
    def analyze(product: Product) -> LexicalDoc:
        body = product.search_text()
        return LexicalDoc(
            words_title=jieba_tokens(product.title),
            words_body=jieba_tokens(body),
            cjk_title=cjk_tokens(product.title),
            cjk_body=cjk_tokens(body),
        )

    @staticmethod
    def add(conn: sqlite3.Connection, pk: int, doc: LexicalDoc) -> None:
        conn.execute(
            "INSERT INTO product_text (pk, words_title, words_body, cjk_title, cjk_body) VALUES (?, ?, ?, ?, ?)",
            (pk, " ".join(doc.words_title), " ".join(doc.words_body), " ".join(doc.cjk_title), " ".join(doc.cjk_body)),
        )

    @staticmethod
    def remove(conn: sqlite3.Connection, pk: int) -> None:
        conn.execute("DELETE FROM product_text WHERE pk = ?", (pk,))  # triggers remove the FTS rows

    # ------------------------------------------------------------------ reads

    def query(self, text: str) -> LexicalQuery:
        """The tokens of each analysis with a positive weight."""
        tokens: dict[str, list[str]] = {}
        if self.words_weight > 0 and (words := _unique(jieba_tokens(text))):
            tokens["words"] = words
        if self.cjk_weight > 0 and (chars := _unique(cjk_tokens(text))):
            tokens["cjk"] = chars
        return LexicalQuery(tokens)

    def search(
        self, conn: sqlite3.Connection, query: LexicalQuery, filters: Filters | None, n: int
    ) -> list[tuple[int, float]]:
        """(pk, combined score) of the top n matches, filters in the WHERE."""
        weights = {"words": self.words_weight, "cjk": self.cjk_weight}
        parts = [(_TABLES[name], _fts_query(tokens), weights[name]) for name, tokens in query.tokens.items() if tokens]
        if not parts or n <= 0:
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
        where, filter_params = filter_sql(filters, alias="f")
        # rank on the filter columns alone (the rows' JSON is read by the caller, for the top n only)
        sql = (
            f"WITH {', '.join(ctes)} "
            "SELECT s.pk, s.score FROM ("
            f"SELECT pk, sum(score) AS score FROM ({' UNION ALL '.join(per_analysis)}) GROUP BY pk"
            f") s JOIN products f ON f.pk = s.pk WHERE {where} ORDER BY s.score DESC, s.pk LIMIT ?"
        )
        rows = conn.execute(sql, [*cte_params, *weight_params, *filter_params, n]).fetchall()
        return [(int(pk), float(score)) for pk, score in rows]

    def analysis_scores(self, conn: sqlite3.Connection, text: str) -> dict[str, dict[str, float]]:
        """Every match's raw BM25 per analysis, {"words"|"cjk": {product id: score}} (weights ignored)."""
        out: dict[str, dict[str, float]] = {name: {} for name in ANALYSES}
        tokens = {"words": _unique(jieba_tokens(text)), "cjk": _unique(cjk_tokens(text))}
        for name in ANALYSES:
            if not tokens[name]:
                continue
            table = _TABLES[name]
            rows = conn.execute(
                f"SELECT p.id, -bm25({table}, ?, ?) FROM {table} JOIN products p ON p.pk = {table}.rowid"
                f" WHERE {table} MATCH ?",
                (self.title_weight, self.body_weight, _fts_query(tokens[name])),
            ).fetchall()
            out[name] = dict(rows)
        return out

    @staticmethod
    def count(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT count(*) FROM product_text").fetchone()[0])


# ---------------------------------------------------------------------------------------- harness

# the store's product table and filter indexes, as middleware/backends/embedded/store.py had them
# (less the vector blob, content hash and sales: the lexical path never reads them)
_STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    pk INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL,
    brand TEXT,
    price REAL,
    stock INTEGER
);
CREATE INDEX IF NOT EXISTS products_brand_filter ON products (brand, price, stock);
CREATE INDEX IF NOT EXISTS products_price_filter ON products (price, brand, stock);
CREATE TABLE IF NOT EXISTS product_categories (
    category TEXT NOT NULL,
    pk INTEGER NOT NULL,
    PRIMARY KEY (category, pk)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS product_categories_pk ON product_categories (pk);
"""


class LegacyFts5Store:
    """The FTS5 engine over a scratch SQLite database (WAL), loaded once, queried from one thread."""

    def __init__(self, db_path: str | Path, index: Fts5LexicalIndex | None = None) -> None:
        self.db_path = Path(db_path)
        self.index = index or Fts5LexicalIndex()
        self.conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_STORE_SCHEMA + self.index.schema)

    def load(self, products: Sequence[Product], docs: Sequence[LexicalDoc] | None = None, batch: int = 1000) -> None:
        """Insert products (with their analysed tokens when given, else analysed here), `batch` per transaction."""
        if docs is not None and len(docs) != len(products):
            raise ValueError(f"docs must match products: {len(docs)} docs for {len(products)} products")
        for start in range(0, len(products), batch):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for i in range(start, min(start + batch, len(products))):
                    p = products[i]
                    doc = docs[i] if docs is not None else self.index.analyze(p)
                    cur = self.conn.execute(
                        "INSERT INTO products (id, doc, brand, price, stock) VALUES (?, ?, ?, ?, ?)",
                        (p.id, p.model_dump_json(), p.brand, p.price, p.stock),
                    )
                    pk = int(cur.lastrowid or 0)
                    self.conn.executemany(
                        "INSERT OR IGNORE INTO product_categories (category, pk) VALUES (?, ?)",
                        [(c, pk) for c in p.category],
                    )
                    self.index.add(self.conn, pk, doc)
            except BaseException:
                self.conn.rollback()
                raise
            self.conn.commit()

    def count(self) -> int:
        return self.index.count(self.conn)

    def bm25(self, text: str, filters: Filters | None, n: int) -> list[tuple[str, float, Product]]:
        """(id, score, product) of the top n, as `EmbeddedBackend.bm25` computed them."""
        if n <= 0:
            return []
        query = self.index.query(text)
        if not query:
            return []
        self.conn.execute("BEGIN")  # the ranking and the rows from one snapshot
        try:
            hits = self.index.search(self.conn, query, filters, n)
            rows = self.conn.execute(
                "SELECT pk, doc FROM products WHERE pk IN (SELECT value FROM json_each(?))",
                (json.dumps([pk for pk, _ in hits]),),
            ).fetchall()
        finally:
            self.conn.rollback()
        products = {pk: Product.model_validate_json(doc) for pk, doc in rows}
        return [(products[pk].id, score, products[pk]) for pk, score in hits]

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.db_path.parent.glob(self.db_path.name + "*") if p.is_file())

    def close(self) -> None:
        self.conn.close()
