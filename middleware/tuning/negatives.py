"""Hard-negative mining: search with the current embedder, sample negatives from a rank range.

Three searchers: `CorpusSearcher` (a BEIR corpus.jsonl embedded into an in-memory faiss flat index),
`IndexSearcher` (the live store through the configured backend's knn) and `HybridSearcher` (the
live store through the product's own hybrid retrieval and fusion, i.e. what the reranker is handed at
query time). A searcher that has `search_texts` is asked with the query texts. For every record, the
candidates at 1-based ranks A..B (rank 1 = top hit; FlagEmbedding's `2-200` slices 0-based [2:200],
i.e. ranks 3..200) are filtered — positives, judged documents, near-duplicates of a positive
(normalised text equal, or cosine ≥ `dup_threshold`), candidates scoring within `margin` of the
lowest positive — and `negatives` of them are drawn with a per-record seeded RNG.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from middleware.tuning.data import BeirCorpus, TuningDataError, normalise_text

log = logging.getLogger(__name__)


class Encoder(Protocol):
    def encode_queries(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass
class Hit:
    id: str | None
    text: str


class Searcher(Protocol):
    def search(self, query_vectors: np.ndarray, depth: int) -> list[list[Hit]]: ...

    def vectors(self, hits: Sequence[Hit]) -> np.ndarray:
        """L2-normalised document vectors of these hits (for cosine near-duplicate/margin checks)."""
        ...


def _normalise_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def _cache_key(corpus: BeirCorpus, encoder: Encoder) -> dict[str, Any]:
    digest = hashlib.sha1()
    for doc_id, text in zip(corpus.ids, corpus.texts, strict=True):
        digest.update(f"{doc_id}\t{text}\n".encode())
    return {"model_id": str(getattr(encoder, "model_id", type(encoder).__name__)), "corpus": digest.hexdigest()}


def _cached_matrix(corpus: BeirCorpus, encoder: Encoder, path: Path) -> np.ndarray | None:
    """Corpus vectors saved by an earlier run with the same embedder and corpus text, else None."""
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return None
    if json.loads(meta.read_text()) != _cache_key(corpus, encoder):
        log.info("corpus vector cache %s is for another model or corpus: re-encoding", path)
        return None
    matrix = np.load(path)
    return matrix if matrix.shape[0] == len(corpus) else None


def _save_matrix(path: Path, corpus: BeirCorpus, encoder: Encoder, matrix: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, matrix)
    path.with_suffix(".json").write_text(json.dumps(_cache_key(corpus, encoder)))


class CorpusSearcher:
    """A corpus embedded once with the embedder's document side, searched by inner product (cosine)."""

    def __init__(self, corpus: BeirCorpus, encoder: Encoder, *, cache: str | Path | None = None) -> None:
        import faiss

        self.corpus = corpus
        self.matrix = _cached_matrix(corpus, encoder, Path(cache)) if cache else None
        if self.matrix is None:
            self.matrix = _normalise_rows(encoder.encode_documents(corpus.texts))
            if cache:
                _save_matrix(Path(cache), corpus, encoder, self.matrix)
        self.index = faiss.IndexFlatIP(self.matrix.shape[1])
        self.index.add(self.matrix)
        self.row_of = {doc_id: i for i, doc_id in enumerate(corpus.ids)}

    def search(self, query_vectors: np.ndarray, depth: int) -> list[list[Hit]]:
        depth = min(depth, len(self.corpus))
        _, rows = self.index.search(_normalise_rows(query_vectors), depth)
        return [[Hit(self.corpus.ids[r], self.corpus.texts[r]) for r in row if r >= 0] for row in rows]

    def vectors(self, hits: Sequence[Hit]) -> np.ndarray:
        return self.matrix[[self.row_of[h.id] for h in hits if h.id is not None]]


class IndexSearcher:
    """The live store: the backend's knn; document vectors are re-encoded (cached) when needed."""

    def __init__(self, backend: Any, encoder: Encoder) -> None:
        self.backend = backend
        self.encoder = encoder
        self._cache: dict[str, np.ndarray] = {}

    def search(self, query_vectors: np.ndarray, depth: int) -> list[list[Hit]]:
        results: list[list[Hit]] = []
        for vector in np.asarray(query_vectors, dtype=np.float32):
            candidates = self.backend.knn(vector, None, depth)
            results.append([Hit(c.id, c.product.embedding_text()) for c in candidates])
        return results

    def vectors(self, hits: Sequence[Hit]) -> np.ndarray:
        todo = [h.text for h in hits if h.text not in self._cache]
        if todo:
            for text, vec in zip(todo, _normalise_rows(self.encoder.encode_documents(todo)), strict=True):
                self._cache[text] = vec
        return np.stack([self._cache[h.text] for h in hits])


class HybridSearcher:
    """The live store through the product's own pipeline: hybrid retrieval and the configured fusion,
    no rerank, no business score, so negatives come from the very lists the reranker will reorder."""

    def __init__(self, pipeline: Any, encoder: Encoder) -> None:
        self.pipeline = pipeline
        self.encoder = encoder
        self._cache: dict[str, np.ndarray] = {}

    def search_texts(self, queries: Sequence[str], depth: int) -> list[list[Hit]]:
        from middleware.schema import SearchRequest

        settings = self.pipeline.settings
        results: list[list[Hit]] = []
        for text in queries:
            request = SearchRequest(
                query=text,
                size=depth,
                retrieve_n=min(max(depth, settings.retrieve_n), settings.max_retrieve_n),
                retrieval="hybrid",
                rerank=False,
                business_enabled=False,
            )
            response = self.pipeline.search(request)
            results.append([Hit(h.id, _product_text(h.product)) for h in response.hits])
        return results

    def search(self, query_vectors: np.ndarray, depth: int) -> list[list[Hit]]:
        raise TypeError("HybridSearcher searches by query text: call search_texts")

    def vectors(self, hits: Sequence[Hit]) -> np.ndarray:
        return IndexSearcher.vectors(self, hits)  # type: ignore[arg-type]


def _product_text(product: dict[str, Any]) -> str:
    """The embedder's text of a hit's product (Product.embedding_text of its serialised form)."""
    title = str(product.get("title") or "")
    description = product.get("description")
    return f"{title}\n{description}" if description else title


@dataclass
class MiningConfig:
    rank_range: tuple[int, int] = (2, 200)
    negatives: int = 10
    seed: int = 42
    dup_threshold: float | None = 0.98  # cosine to a positive at/above which a candidate is a duplicate
    margin: float | None = None  # skip candidates with cos > (lowest positive cos − margin)
    batch_size: int = 64

    def __post_init__(self) -> None:
        start, end = self.rank_range
        if start < 1 or end < start:
            raise TuningDataError(f"--range must be A-B with 1 ≤ A ≤ B, got {start}-{end}")
        if self.negatives < 1:
            raise TuningDataError(f"--negatives must be ≥ 1, got {self.negatives}")
        if self.dup_threshold is not None and not -1.0 <= self.dup_threshold <= 1.0:
            raise TuningDataError(f"--dup-threshold must be a cosine in [-1, 1], got {self.dup_threshold}")
        if self.margin is not None and self.margin < 0:
            raise TuningDataError(f"--margin must be ≥ 0, got {self.margin}")


def parse_range(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split("-", 1))
    except ValueError:
        raise TuningDataError(f"--range must look like 2-200, got {text!r}") from None
    return start, end


@dataclass
class MiningStats:
    records: int = 0
    negatives: int = 0
    short: int = 0  # records that got fewer than the requested negatives
    excluded: dict[str, int] = field(
        default_factory=lambda: {"positive": 0, "judged": 0, "duplicate_text": 0, "cosine": 0, "margin": 0}
    )


def _record_rng(seed: int, index: int, query: str) -> random.Random:
    # per-record stream: a record's negatives do not depend on how the file was batched
    return random.Random(f"{seed}:{index}:{query}")


def mine_negatives(
    records: Sequence[dict[str, Any]], encoder: Encoder, searcher: Searcher, config: MiningConfig
) -> tuple[list[dict[str, Any]], MiningStats]:
    """Records with `neg` (and `neg_ids` when the searcher knows ids) set; other fields kept."""
    start, end = config.rank_range
    stats = MiningStats()
    out: list[dict[str, Any]] = []
    need_vectors = config.dup_threshold is not None or config.margin is not None
    for offset in range(0, len(records), config.batch_size):
        batch = records[offset : offset + config.batch_size]
        query_vecs = _normalise_rows(encoder.encode_queries([r["query"] for r in batch]))
        search_texts = getattr(searcher, "search_texts", None)
        if search_texts is not None:
            hit_lists = search_texts([r["query"] for r in batch], end)
        else:
            hit_lists = searcher.search(query_vecs, end)
        all_pos = _positive_vectors(batch, encoder, searcher) if need_vectors else None
        pos_start = 0
        for i, (record, hits) in enumerate(zip(batch, hit_lists, strict=True)):
            index = offset + i
            pos_vecs = None
            if all_pos is not None:
                pos_vecs = all_pos[pos_start : pos_start + len(record["pos"])]
                pos_start += len(record["pos"])
            negs = _select(record, query_vecs[i], pos_vecs, hits[start - 1 : end], searcher, config, index, stats)
            new = dict(record)
            new["neg"] = [h.text for h in negs]
            if negs and all(h.id is not None for h in negs):
                new["neg_ids"] = [h.id for h in negs]
            for stale in ("neg_scores", "neg_probs"):  # teacher scores of old negatives no longer apply
                new.pop(stale, None)
            out.append(new)
            stats.records += 1
            stats.negatives += len(negs)
            stats.short += len(negs) < config.negatives
    return out, stats


def _positive_vectors(batch: Sequence[dict[str, Any]], encoder: Encoder, searcher: Searcher) -> np.ndarray:
    """The batch's positives, stacked: taken from the corpus matrix when their ids are known there,
    else encoded in one call (per-record calls cost far more on small inputs)."""
    known = getattr(searcher, "row_of", None)
    texts = [t for r in batch for t in r["pos"]]
    ids = [d for r in batch for d in (r.get("pos_ids") or [None] * len(r["pos"]))]
    if known is not None and len(ids) == len(texts) and all(d in known for d in ids):
        return searcher.matrix[[known[d] for d in ids]]  # type: ignore[attr-defined]
    return _normalise_rows(encoder.encode_documents(texts))


def _select(
    record: dict[str, Any],
    query_vec: np.ndarray,
    pos_vecs: np.ndarray | None,
    window: list[Hit],
    searcher: Searcher,
    config: MiningConfig,
    index: int,
    stats: MiningStats,
) -> list[Hit]:
    pos_ids = set(record.get("pos_ids") or [])
    judged_ids = set(record.get("judged_ids") or [])
    pos_texts = {normalise_text(t) for t in record["pos"]}
    judged_texts = {normalise_text(t) for t in record.get("judged") or []}
    floor = None
    if config.margin is not None and pos_vecs is not None:
        floor = float((pos_vecs @ query_vec).min()) - config.margin

    # drop what is never a negative by id/text first, then draw in a seeded order, checking the
    # vector rules lazily (the live-index searcher has to encode each candidate it checks)
    pool: list[Hit] = []
    seen: set[str] = set()
    for hit in window:
        key = normalise_text(hit.text)
        if hit.id in pos_ids or key in pos_texts:
            exact = hit.id in pos_ids or hit.text in record["pos"]
            stats.excluded["positive" if exact else "duplicate_text"] += 1
            continue
        if hit.id in judged_ids or key in judged_texts:
            stats.excluded["judged"] += 1
            continue
        if key in seen:  # the same text twice would be the same negative twice
            continue
        seen.add(key)
        pool.append(hit)
    _record_rng(config.seed, index, record["query"]).shuffle(pool)

    chosen: list[Hit] = []
    for chunk_start in range(0, len(pool), max(config.negatives, 8)):
        chunk = pool[chunk_start : chunk_start + max(config.negatives, 8)]
        keep = [True] * len(chunk)
        if pos_vecs is not None:
            vecs = searcher.vectors(chunk)
            if config.dup_threshold is not None:
                dup = (vecs @ pos_vecs.T).max(axis=1) >= config.dup_threshold
                for j in np.flatnonzero(dup):
                    keep[j] = False
                    stats.excluded["cosine"] += 1
            if floor is not None:
                too_close = vecs @ query_vec > floor
                for j in np.flatnonzero(too_close):
                    if keep[j]:
                        keep[j] = False
                        stats.excluded["margin"] += 1
        for hit, ok in zip(chunk, keep, strict=True):
            if ok:
                chosen.append(hit)
                if len(chosen) == config.negatives:
                    return chosen
    return chosen
