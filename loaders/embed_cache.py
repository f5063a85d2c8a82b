"""Embedding cache: (model id, sha256 of the exact embedded text) → float32 vector, in one SQLite file.

It lives in the data directory (`<data_dir>/cache/embeddings.sqlite`), not the model cache: its size
grows with the catalog, not with the model, and deleting a store should delete its cache too. Losing it
is harmless (vectors are recomputed), so it is written with synchronous=NORMAL.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = 500  # below SQLite's bound-parameter limit


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    """Owned by one thread: the loader's embedding stage opens, uses and closes it."""

    def __init__(self, path: Path, model_id: str, dim: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.model_id = model_id
        self.dim = dim
        # built by the caller, then used by the embedding thread alone
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS vectors (model TEXT NOT NULL, key BLOB NOT NULL, vector BLOB NOT NULL,"
            " PRIMARY KEY (model, key)) WITHOUT ROWID"
        )

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), _CHUNK):
            chunk = unique[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT key, vector FROM vectors WHERE model = ? AND key IN ({marks})", [self.model_id, *chunk]
            )
            for key, blob in rows:
                vector = np.frombuffer(blob, dtype=np.float32)
                if vector.shape[0] == self.dim:  # a stale entry of another shape is simply a miss
                    found[key] = vector
        return found

    def put_many(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        rows = [
            (self.model_id, key, np.ascontiguousarray(vec, dtype=np.float32).tobytes())
            for key, vec in zip(keys, vectors, strict=True)
        ]
        with self._db:  # sqlite3 in autocommit mode: `with` still wraps one transaction
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO vectors (model, key, vector) VALUES (?, ?, ?)", rows)

    def encode(self, embedder: Any, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """Vectors for `texts` (input order): cached ones read, the rest embedded and stored.

        Returns (vectors, cache hits). Texts repeated inside one call are embedded once.
        """
        keys = [text_key(t) for t in texts]
        found = self.get_many(keys)
        hits = sum(1 for k in keys if k in found)
        missing: dict[bytes, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in found and key not in missing:
                missing[key] = text
        if missing:
            fresh = np.asarray(embedder.encode_documents(list(missing.values())), dtype=np.float32)
            self.put_many(list(missing), fresh)
            found.update(zip(missing, fresh, strict=True))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, key in enumerate(keys):
            out[i] = found[key]
        return out, hits

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM vectors WHERE model = ?", [self.model_id]).fetchone()[0])

    def close(self) -> None:
        self._db.close()
