"""Retrieval stage: embed the query, run BM25 and kNN in parallel, degrade instead of failing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from middleware.backends.base import Backend, BackendError, HybridBackend
from middleware.budget import Deadline, Stopwatch
from middleware.products import Candidate, Filters
from middleware.redaction import redact

log = logging.getLogger(__name__)

FALLBACK_SHARE = 0.25  # of the budget kept for BM25 alone when server-side fusion cannot run


class QueryEncoder(Protocol):
    def encode_queries(self, texts: list[str]) -> np.ndarray: ...


@runtime_checkable
class QueuedQueryEncoder(Protocol):
    """An encoder that queues its own work (shared batches): the caller awaits a future instead of
    holding a thread while the batch forms."""

    def encode_queries(self, texts: list[str]) -> np.ndarray: ...

    def submit_queries(self, texts: list[str]) -> Future[np.ndarray]: ...


@dataclass
class Retrieved:
    lists: dict[str, list[Candidate]] = field(default_factory=dict)  # "bm25" / "knn"
    fused: list[Candidate] | None = None  # set when the backend fused server-side
    vector: np.ndarray | None = None  # the query's embedding, when it was made
    degraded: list[str] = field(default_factory=list)
    lexical_text: str = ""  # the text the lexical query ran with (the query expanded)


class RetrievalFailed(BackendError):
    """No retrieval answered: nothing to rank."""


def retrieve(
    *,
    backend: Backend,
    embed_query: Callable[[str], Future[np.ndarray]] | None,
    text: str,
    filters: Filters | None,
    n: int,
    use_bm25: bool,
    use_knn: bool,
    deadline: Deadline,
    executor: Executor,
    watch: Stopwatch,
    expand: Callable[[str], str] | None = None,
    server_fusion: bool = True,
) -> Retrieved:
    """`embed_query(text)`: a future of the query's vectors (one row); None without an embedder.
    `expand(text)`: the lexical query's text (synonyms, typo corrections); the vector query keeps `text`.
    `server_fusion`: False when the request fuses otherwise than the backend's configured pipeline does
    (its own method, weights or k): the two lists then come back separately, for the pipeline to fuse."""
    out = Retrieved()
    started = time.perf_counter()
    lexical_text = text
    if use_bm25 and expand is not None:
        try:
            lexical_text = expand(text)
        except Exception as err:  # expansion is a refinement: the query as typed still answers
            log.warning("query expansion failed: %s", redact(str(err)))
            out.degraded.append("expand")
    out.lexical_text = lexical_text
    if use_knn and embed_query is None:
        raise ValueError("vector retrieval needs an embedder (SHOPSEARCH_EMBEDDER is 'none')")
    server_fuses = (
        server_fusion and use_bm25 and use_knn and isinstance(backend, HybridBackend) and backend.fuses_server_side
    )
    # with server-side fusion the hybrid query carries BM25: a separate one is sent only if it fails
    bm25_future = executor.submit(backend.bm25, lexical_text, filters, n) if use_bm25 and not server_fuses else None

    vector = None
    if use_knn:
        assert embed_query is not None
        t = time.perf_counter()
        # without a BM25 query in flight, a late embedding must leave the fallback BM25 query some time
        reserve_s = FALLBACK_SHARE * deadline.budget_s if server_fuses else 0.0
        try:
            vector = deadline.wait(embed_query(text), reserve_s=reserve_s)[0]
        except Exception as err:  # model failure or budget spent: BM25 alone still answers
            log.warning("query embedding failed: %s", redact(str(err)))
            out.degraded.append("embed")
        watch.record("embed", t)

    out.vector = vector
    if vector is not None and server_fuses:
        assert isinstance(backend, HybridBackend)
        hybrid = executor.submit(backend.hybrid, lexical_text, vector, filters, n)
        _collect(out, "hybrid", hybrid, deadline, reserve_s=FALLBACK_SHARE * deadline.budget_s)
        if "hybrid" not in out.degraded:
            watch.record("retrieve", started)
            return out
        # server-side fusion failed: "hybrid" stays degraded, the two plain queries below answer
    if server_fuses:
        bm25_future = executor.submit(backend.bm25, lexical_text, filters, n)

    knn_future = executor.submit(backend.knn, vector, filters, n) if vector is not None else None
    if bm25_future is not None:
        _collect(out, "bm25", bm25_future, deadline)
    if knn_future is not None:
        _collect(out, "knn", knn_future, deadline)
    elif use_knn and "embed" in out.degraded:
        out.degraded.append("knn")
    watch.record("retrieve", started)

    if not out.lists and out.fused is None:
        raise RetrievalFailed("no retrieval answered: " + ", ".join(out.degraded))
    return out


def _collect(out: Retrieved, name: str, future: Future, deadline: Deadline, reserve_s: float = 0.0) -> None:
    try:
        result = deadline.wait(future, reserve_s=reserve_s)
    except Exception as err:
        log.warning("%s retrieval failed: %s", name, redact(str(err)))
        out.degraded.append(name)
        return
    if name == "hybrid":
        out.fused = result
    else:
        out.lists[name] = result
