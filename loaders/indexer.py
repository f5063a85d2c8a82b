"""The one write path into a store, used by `shopsearch index`, `shopsearch opensearch reindex` and
`POST /v1/products`.

Every product is written under the same rules whichever door it came in by:
- validation: the `Product` model (text bounds, id rule), rejected rows to the dead-letter file;
- the embedder binding: the store records which embedder made its vectors (`Backend.bind_embedder`,
  which raises `EmbedderMismatch` rather than mix two models' vectors);
- embedding: only new or changed text, read from the embedding cache when it was embedded before;
- batching: one embedder call and one backend write per batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from loaders.checkpoint import Checkpoint
from loaders.embed_cache import EmbeddingCache
from loaders.pipeline import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_PRUNE_SHARE,
    LEXICAL_BATCH_SIZE,
    Batch,
    classify,
    commit_batch,
    embed_batch,
    index_rows,
)
from loaders.report import Progress, Summary
from loaders.sources import SourceRow
from loaders.validate import DeadLetters
from middleware.backends.base import NO_EMBEDDER, Backend, EmbedderBinding
from middleware.products import Product


class Indexer:
    """Writes products with one embedder (None: a lexical-only store) and an optional embedding cache.

    The cache, when given, is used from one thread at a time (the loader's embedding stage).
    """

    def __init__(
        self,
        embedder: Any | None,
        *,
        cache: EmbeddingCache | None = None,
        batch_size: int | None = None,  # None: DEFAULT_BATCH_SIZE, or LEXICAL_BATCH_SIZE with no embedder
        max_inflight: int = 4,
    ) -> None:
        if batch_size is None:
            batch_size = DEFAULT_BATCH_SIZE if embedder is not None else LEXICAL_BATCH_SIZE
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if cache is not None and (embedder is None or cache.model_id != embedder.model_id):
            raise ValueError("the embedding cache must belong to the indexer's embedder")
        self.embedder = embedder
        self.cache = cache
        self.batch_size = batch_size
        self.max_inflight = max_inflight

    @property
    def binding(self) -> EmbedderBinding:
        if self.embedder is None:
            return EmbedderBinding(NO_EMBEDDER, None)
        return EmbedderBinding(self.embedder.model_id, int(self.embedder.dim))

    def bind(self, backend: Backend) -> None:
        """Record this indexer's embedder on `backend`; EmbedderMismatch when it holds another's vectors."""
        backend.bind_embedder(self.binding)

    def embed(self, products: Sequence[Product]) -> tuple[np.ndarray | None, int]:
        """Vectors of `products` in order (None without an embedder) and how many came from the cache."""
        if self.embedder is None or not products:
            return None, 0
        texts = [p.embedding_text() for p in products]
        if self.cache is not None:
            return self.cache.encode(self.embedder, texts)
        return np.asarray(self.embedder.encode_documents(texts), dtype=np.float32), 0

    # ------------------------------------------------------------------ the three doors

    def index(
        self,
        rows: Iterable[SourceRow],
        backend: Backend,
        *,
        dead_letters: DeadLetters,
        checkpoint: Checkpoint | None = None,
        resume_state: dict[str, Any] | None = None,
        prune: bool = False,
        force_prune: bool = False,
        max_prune_share: float = DEFAULT_MAX_PRUNE_SHARE,
        progress: Progress | None = None,
        summary: Summary | None = None,
    ) -> Summary:
        """Incremental load of catalog rows (`shopsearch index`): unchanged products are skipped, price /
        sales / stock changes applied in place; see `loaders.pipeline.index_rows` for resume and prune."""
        self.bind(backend)
        return index_rows(
            rows,
            backend,
            self.embed,
            dead_letters=dead_letters,
            checkpoint=checkpoint,
            resume_state=resume_state,
            prune=prune,
            force_prune=force_prune,
            max_prune_share=max_prune_share,
            batch_size=self.batch_size,
            max_inflight=self.max_inflight,
            progress=progress,
            summary=summary,
        )

    def upsert(self, products: Sequence[Product], backend: Backend) -> Summary:
        """Already-validated products (an API request body), under the same rules as catalog rows."""
        self.bind(backend)
        summary = Summary(command="upsert", source="request")
        for start in range(0, len(products), self.batch_size):
            batch = Batch(seq=start // self.batch_size)
            for product in products[start : start + self.batch_size]:
                batch.rows += 1
                batch.add(product)
            classify(batch, backend, Counter())
            embed_batch(batch, self.embed)
            commit_batch(batch, backend, summary, None, None)
        return summary

    def fill(self, rows: Iterable[SourceRow], target: Any, *, dead_letters: DeadLetters, summary: Summary) -> None:
        """Load catalog rows into a new, empty index (`shopsearch opensearch reindex`'s load step).

        `target` needs only `upsert(products, vectors)`: nothing is read back, since every product is
        new there. Rejected rows go to `dead_letters`; all is counted in `summary` (the last row of an id
        in a batch wins, as in `index`).
        """
        batch = Batch(seq=0)
        for row in rows:
            batch.add_row(row)
            if batch.rows >= self.batch_size:
                self._fill_batch(batch, target, dead_letters, summary)
                batch = Batch(seq=batch.seq + 1)
        if batch.rows:
            self._fill_batch(batch, target, dead_letters, summary)

    def _fill_batch(self, batch: Batch, target: Any, dead_letters: DeadLetters, summary: Summary) -> None:
        batch.to_write = list(batch.products.values())
        batch.indexed = len(batch.to_write)
        embed_batch(batch, self.embed)
        commit_batch(batch, target, summary, dead_letters, None)
