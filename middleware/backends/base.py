"""The seam between the pipeline and storage: one Protocol every backend implements."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from middleware.products import Candidate, Filters, Product, SignalUpdate


class BackendError(RuntimeError):
    """The backend could not answer (unreachable, timed out, refused). Expected, not a bug."""


NO_EMBEDDER = "none"


@dataclass(frozen=True)
class EmbedderBinding:
    """The embedder whose vectors a store holds ("none": a lexical-only store)."""

    model: str
    dim: int | None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"embedder binding: model must be a non-empty string, got {self.model!r}")
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim <= 0):
            raise ValueError(f"embedder binding: dim must be a positive integer or None, got {self.dim!r}")
        if (self.model == NO_EMBEDDER) != (self.dim is None):
            raise ValueError(f"embedder binding: dim is None exactly for model {NO_EMBEDDER!r}, got {self!r}")

    def describe(self) -> str:
        return "no embedder (lexical only)" if self.dim is None else f"embedder {self.model!r} ({self.dim}-d)"


class EmbedderMismatch(BackendError):
    """The store holds vectors of another embedder; mixing two models' vectors would corrupt kNN."""

    def __init__(self, where: str, held: EmbedderBinding | str, wanted: EmbedderBinding | str, remedy: str) -> None:
        """`held`/`wanted`: a binding, or a description where there is none ("384-d vectors")."""
        held = held.describe() if isinstance(held, EmbedderBinding) else held
        wanted = wanted.describe() if isinstance(wanted, EmbedderBinding) else wanted
        super().__init__(
            f"{where} holds {held}, not {wanted}: vectors of different models cannot be mixed; "
            f"use the same SHOPSEARCH_EMBEDDER, or {remedy}"
        )


@dataclass(frozen=True)
class StoreStats:
    """What a store holds, the same fields for every backend."""

    backend: str  # "embedded" | "opensearch"
    products: int
    vectors: int
    dim: int | None
    size_bytes: int  # on disk (embedded) / store size in the cluster (opensearch)
    embedder: EmbedderBinding | None
    generation: int | None  # embedded store generation; None for opensearch
    details: dict[str, Any]  # engine-specific extras, for display only


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

    def embedder_binding(self) -> EmbedderBinding | None:
        """The recorded binding, or None for a store never bound."""
        ...

    def bind_embedder(self, binding: EmbedderBinding) -> None:
        """Record it on an unbound store; EmbedderMismatch when another is recorded and the store has products."""
        ...

    def stats(self) -> StoreStats:
        """Products, vectors, vector dimension, size on disk / in the cluster, the embedder binding."""
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
