"""Candidate pools: which documents retrieval may return.

- global: the whole corpus, as a user would search it.
- test: only the documents judged for the evaluated queries (the union over those queries), as in the
  seeds' "test pool" tables. Every unjudged distractor is gone, so the figures are an upper bound.

Each pool gets its own index holding exactly its documents (see runner.py). Restricting retrieval with an
ids filter on one global index would also be exact, but it keeps the global BM25 statistics (IDF, average
length) and sends a filter of tens of thousands of ids with every query, which would distort the latency
we report. A pool-sized index is what "searching the test pool" means, and its vectors are reused from the
global embedding cache, so the second index costs no model time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

POOL_NAMES: tuple[str, ...] = ("global", "test")


@dataclass(frozen=True)
class Pool:
    name: str
    doc_ids: tuple[str, ...]  # in corpus order

    @property
    def fingerprint(self) -> str:
        """Stable id of the document set (part of the index cache key)."""
        digest = hashlib.sha1()
        for doc_id in sorted(self.doc_ids):
            digest.update(doc_id.encode("utf-8"))
            digest.update(b"\0")
        return digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.doc_ids)


def judged_doc_ids(qrels: Mapping[str, Mapping[str, float]], query_ids: Iterable[str]) -> set[str]:
    """Every document judged (any score, including 'not relevant') for the given queries."""
    pool: set[str] = set()
    for qid in query_ids:
        pool.update(qrels.get(qid, {}))
    return pool


def build_pool(
    name: str,
    corpus_ids: Iterable[str],
    qrels: Mapping[str, Mapping[str, float]],
    query_ids: Iterable[str],
) -> Pool:
    ordered = list(corpus_ids)
    if name == "global":
        return Pool("global", tuple(ordered))
    if name == "test":
        judged = judged_doc_ids(qrels, query_ids)
        return Pool("test", tuple(d for d in ordered if d in judged))
    raise ValueError(f"unknown pool {name!r}; choose from {', '.join(POOL_NAMES)}")
