"""Rerank stage: score the head of the fused list with the cross-encoder, within the budget."""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from typing import Protocol

import numpy as np

from middleware.budget import Deadline
from middleware.products import Candidate

log = logging.getLogger(__name__)


class PairScorer(Protocol):
    def score(self, query: str, docs: list[str]) -> np.ndarray: ...


def rerank_text(cand: Candidate) -> str:
    """What the cross-encoder reads for a product."""
    if cand.product is None:
        return cand.id
    return cand.product.embedding_text()


def rerank_head(
    candidates: list[Candidate],
    *,
    scorer: PairScorer,
    query: str,
    k: int,
    deadline: Deadline,
    executor: Executor,
    reserve_s: float = 0.0,
) -> list[Candidate]:
    """Reranked top-k first (by score, ties in fused order), then the rest in fused order.

    Raises on failure or when the budget runs out; the caller keeps the fused order then.
    """
    head, tail = candidates[:k], candidates[k:]
    if not head:
        return candidates
    docs = [rerank_text(c) for c in head]
    scores = deadline.wait(executor.submit(scorer.score, query, docs), reserve_s=reserve_s)
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape != (len(head),):
        raise ValueError(f"reranker returned {scores.shape} scores for {len(head)} documents")
    for cand, score in zip(head, scores, strict=True):
        cand.rerank = float(score)
    order = sorted(range(len(head)), key=lambda i: (-float(scores[i]), i))
    return [head[i] for i in order] + tail
