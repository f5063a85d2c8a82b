"""The seam between the pipeline and storage: one Protocol every backend implements."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from middleware.products import Candidate, Filters, Product, SignalUpdate


class BackendError(RuntimeError):
    """The backend could not answer (unreachable, timed out, refused). Expected, not a bug."""


@runtime_checkable
class Backend(Protocol):
    """Storage + retrieval. Scores are higher-is-better; candidates carry their Product."""

    def bm25(self, text: str, filters: Filters | None, n: int) -> list[Candidate]:
        """Lexical top-n, filters applied inside the query. Candidate.bm25 set, ranks["bm25"] set."""
        ...

    def knn(self, vector: np.ndarray, filters: Filters | None, n: int) -> list[Candidate]:
        """Vector top-n (inner product on normalised vectors), filters applied inside the search."""
        ...

    def get(self, ids: Sequence[str]) -> list[Product]:
        """Products by id, in the order asked, missing ids skipped."""
        ...

    def upsert(self, products: Sequence[Product], vectors: np.ndarray | None) -> None:
        """Insert or replace by id, atomically for the batch. vectors: float32 [len(products), dim]."""
        ...

    def delete(self, ids: Sequence[str]) -> int:
        """Remove by id; returns how many existed."""
        ...

    def update_signals(self, updates: Sequence[SignalUpdate]) -> list[str]:
        """Apply price/sales/stock changes without touching text or vectors; returns ids not found."""
        ...

    def iter_ids(self) -> Iterator[str]:
        """Every product id (for pruning a snapshot)."""
        ...

    def content_hashes(self, ids: Sequence[str]) -> dict[str, str]:
        """Product.content_hash() of stored products (to skip unchanged rows on re-index)."""
        ...

    def count(self) -> int: ...

    def stats(self) -> dict[str, Any]:
        """Products, vectors, size on disk / in the cluster, vector dimension."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class HybridBackend(Protocol):
    """A backend that can also fuse BM25 and kNN itself (OpenSearch's hybrid query + search pipeline)."""

    @property
    def fuses_server_side(self) -> bool:
        """True when configured to fuse on the server; the pipeline then calls hybrid()."""
        ...

    def hybrid(self, text: str, vector: np.ndarray, filters: Filters | None, n: int) -> list[Candidate]:
        """Fused top-n: Candidate.fused set (bm25/knn may be None)."""
        ...
