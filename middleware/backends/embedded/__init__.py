"""The embedded backend: one directory with a SQLite database, a tantivy index and a faiss index, no server.

Layout of `data_dir`:
- `catalog.sqlite3`: the source of truth (WAL): products (the Product as JSON plus indexed filter
  columns), categories (side table), vectors (float32 blobs), the meta table (schema version,
  generation, vector dimension, embedder binding), each product's analysed tokens and the lexical
  change log.
- `lexical/`: derived: the tantivy index, stamped with the lexical generation it reflects; caught
  up from the change log, or rebuilt from SQLite when missing, unreadable or of another analysis.
- `vectors.faiss`: derived: the vectors keyed by SQLite rowid (`pk`), stamped with the `generation`
  it reflects; rebuilt from SQLite when missing, unreadable or stale.

Modules, one concern each:
- `store`: the SQLite store: connections, transactions, the meta table and generation, product rows.
- `lexical`: the lexical index (tantivy over pre-computed tokens): its one-writer rule, stamps and queries.
- `vectors`: the vector index lifecycle (readers-writer lock, generation stamps, dead ids, exact
  search over a filtered subset); fed `(pks, vectors, generation)`, it knows no SQL.
- `backend`: `EmbeddedBackend`, the Backend Protocol over the three.
"""

from middleware.backends.embedded.backend import DB_NAME, FAISS_NAME, EmbeddedBackend
from middleware.backends.embedded.store import SCHEMA_VERSION

__all__ = [
    "DB_NAME",
    "FAISS_NAME",
    "SCHEMA_VERSION",
    "EmbeddedBackend",
]
