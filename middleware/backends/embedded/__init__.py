"""The embedded backend: one directory with a SQLite database and a faiss index, no server.

Layout of `data_dir`:
- `catalog.sqlite3`: the source of truth (WAL): products (the Product as JSON plus indexed filter
  columns), categories (side table), vectors (float32 blobs), the meta table (schema version,
  generation, vector dimension, embedder binding), and the lexical index's tables.
- `vectors.faiss`: derived: the vectors keyed by SQLite rowid (`pk`), stamped with the `generation`
  it reflects; rebuilt from SQLite when missing, unreadable or stale.

Modules, one concern each:
- `store`: the SQLite store: connections, transactions, the meta table and generation, product rows.
- `lexical`: the lexical index (FTS5 over pre-computed tokens) behind a small seam, documented there.
- `vectors`: the vector index lifecycle (readers-writer lock, generation stamps, dead ids, exact
  search over a filtered subset); fed `(pks, vectors, generation)`, it knows no SQL.
- `backend`: `EmbeddedBackend`, the Backend Protocol over the three.
"""

from middleware.backends.embedded.backend import DB_NAME, FAISS_NAME, EmbeddedBackend
from middleware.backends.embedded.lexical import DEFAULT_CJK_WEIGHT, DEFAULT_COMBINE, DEFAULT_WORDS_WEIGHT
from middleware.backends.embedded.store import SCHEMA_VERSION

__all__ = [
    "DB_NAME",
    "DEFAULT_CJK_WEIGHT",
    "DEFAULT_COMBINE",
    "DEFAULT_WORDS_WEIGHT",
    "FAISS_NAME",
    "SCHEMA_VERSION",
    "EmbeddedBackend",
]
