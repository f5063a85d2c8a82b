"""Rerank stage: score the head of the fused list with the cross-encoder, within the budget."""

from __future__ import annotations

import logging
import threading
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


class NamedRerankers:
    """The other rerankers a search may name (`settings.rerankers`), each loaded the first time a search
    names it and kept for the process; a load that fails is remembered and raised again, not retried."""

    def __init__(self, specs: dict[str, str], load: Callable[[str], PairScorer | None]) -> None:
        self.specs = dict(specs)
        self._load = load
        self._loaded: dict[str, PairScorer | BaseException] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> PairScorer:
        """The named reranker. KeyError for a name not configured; the load's error when it cannot load."""
        if name not in self.specs:
            raise KeyError(name)
        with self._lock:  # one load per name, even when many searches ask at once
            if name not in self._loaded:
                try:
                    scorer = self._load(self.specs[name])
                    if scorer is None:
                        raise ValueError(f"reranker {name!r} is configured as none")
                    self._loaded[name] = scorer
                except Exception as err:
                    log.warning("reranker %r cannot be loaded: %s", name, err)
                    self._loaded[name] = err
            found = self._loaded[name]
        if isinstance(found, BaseException):
            raise RuntimeError(f"reranker {name!r} could not be loaded: {found}")
        return found

    def close(self) -> None:
        for scorer in self._loaded.values():
            close = getattr(scorer, "close", None)
            if callable(close):
                close()
