"""Rerank stage: score the head of the fused list with the cross-encoder, within the budget."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol, runtime_checkable

import numpy as np

from middleware.budget import Deadline
from middleware.products import Candidate

log = logging.getLogger(__name__)


class PairScorer(Protocol):
    def score(self, query: str, docs: list[str]) -> np.ndarray: ...


@runtime_checkable
class QueuedPairScorer(Protocol):
    """A scorer that queues its own work (shared batches): the caller awaits a future instead of
    holding a thread while the batch forms."""

    def score(self, query: str, docs: list[str]) -> np.ndarray: ...

    def submit_scores(self, query: str, docs: list[str]) -> Future[np.ndarray]: ...


def rerank_text(cand: Candidate) -> str:
    """What the cross-encoder reads for a product."""
    if cand.product is None:
        return cand.id
    return cand.product.embedding_text()


def rerank_head(
    candidates: list[Candidate],
    *,
    score: Callable[[str, list[str]], Future[np.ndarray]],
    query: str,
    k: int,
    deadline: Deadline,
    reserve_s: float = 0.0,
) -> list[Candidate]:
    """Reranked top-k first (by score, ties in fused order), then the rest in fused order.

    `score(query, docs)`: a future of one score per document.

    Raises on failure or when the budget runs out; the caller keeps the fused order then.
    """
    head, tail = candidates[:k], candidates[k:]
    if not head:
        return candidates
    docs = [rerank_text(c) for c in head]
    scores = deadline.wait(score(query, docs), reserve_s=reserve_s)
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape != (len(head),):
        raise ValueError(f"reranker returned {scores.shape} scores for {len(head)} documents")
    for cand, score in zip(head, scores, strict=True):
        cand.rerank = float(score)
    order = sorted(range(len(head)), key=lambda i: (-float(scores[i]), i))
    return [head[i] for i in order] + tail
