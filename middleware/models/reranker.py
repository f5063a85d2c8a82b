"""Cross-encoder reranking (bge-reranker-v2-m3 style): one logit per (query, document) pair."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Encoding

from middleware.models.loading import Runtime, effective_max_length, load_runner, read_config
from middleware.models.resolve import resolve_model
from middleware.models.tokenization import TextTokenizer, check_texts


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Sigmoid in FP32; the tanh form cannot overflow for large negative logits."""
    x = np.asarray(logits, dtype=np.float32)
    return (np.float32(0.5) * (np.float32(1.0) + np.tanh(np.float32(0.5) * x))).astype(np.float32)


class Reranker:
    """`Reranker(name_or_path, **options).score(query, docs)` → sigmoid scores in input order."""

    def __init__(
        self,
        name_or_path: str | os.PathLike[str],
        *,
        precision: str = "auto",
        device: str = "auto",
        max_length: int = 512,
        batch_size: int = 32,
        cache_dir: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        runtime: Runtime = "onnx",
        io_binding: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        resolved = resolve_model(name_or_path, kind="reranker")
        config = read_config(resolved, "reranker")
        self.model_id: str = resolved.model_id
        self.batch_size = batch_size
        self.max_length = effective_max_length(config, max_length)
        # FlagEmbedding: the query alone may take at most 3/4 of the pair's tokens
        self.query_max_length = self.max_length * 3 // 4
        self._tokenizer = TextTokenizer(
            resolved.path, max_length=self.max_length, model_name=self.model_id, kind="reranker"
        )
        loaded = load_runner(
            resolved,
            kind="reranker",
            task="text-classification",
            runtime=runtime,
            precision=precision,
            device=device,
            cache_dir=Path(cache_dir) if cache_dir is not None else None,
            threads=threads,
            io_binding=io_binding,
        )
        self._runner = loaded.runner
        self.runtime: Runtime = loaded.runtime
        self.precision: str = loaded.precision
        self.device: str = loaded.device

    def __repr__(self) -> str:
        return (
            f"Reranker({self.model_id!r}, runtime={self.runtime}, precision={self.precision}, "
            f"device={self.device}, max_length={self.max_length})"
        )

    def score_logits(self, query: str, docs: Sequence[str]) -> np.ndarray:
        """Raw logits (float32), in the order of `docs`."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        docs = check_texts(docs, "docs")
        return self.score_pairs_logits([(query, doc) for doc in docs])

    def score_pairs_logits(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Raw logits for (query, doc) pairs of possibly different queries, in input order, through
        one length-sorted pass."""
        encodings = self.tokenize_pairs(pairs)
        out = np.zeros(len(pairs), dtype=np.float32)
        for batch in self._tokenizer.batches(encodings, self.batch_size):
            logits = self._runner.run(batch.feeds(self._runner.input_names))
            out[batch.indices] = np.asarray(logits, dtype=np.float32).reshape(len(batch.indices), -1)[:, 0]
        return out

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Encoding]:
        """(query, doc) pairs as `score_encoded` takes them (truncated as FlagEmbedding does), in input
        order, for a caller that plans its own batches."""
        encodings: list[Encoding] = [None] * len(pairs)  # type: ignore[list-item]
        by_query: dict[str, list[int]] = {}
        for i, (query, _doc) in enumerate(pairs):
            if not isinstance(query, str):
                raise TypeError(f"query must be a string, got {type(query).__name__}")
            by_query.setdefault(query, []).append(i)
        for query, indices in by_query.items():
            docs = check_texts([pairs[i][1] for i in indices], "docs")
            encoded = self._tokenizer.encode_pairs(query, docs, query_max_length=self.query_max_length)
            for i, encoding in zip(indices, encoded, strict=True):
                encodings[i] = encoding
        return encodings

    def logits_encoded(self, encodings: Sequence[Encoding]) -> np.ndarray:
        """Raw logits for already tokenised pairs, in one model call over exactly this batch."""
        if not encodings:
            return np.zeros(0, dtype=np.float32)
        batch = self._tokenizer.pad(encodings)
        logits = self._runner.run(batch.feeds(self._runner.input_names))
        return np.asarray(logits, dtype=np.float32).reshape(len(encodings), -1)[:, 0]

    def score_encoded(self, encodings: Sequence[Encoding]) -> np.ndarray:
        """sigmoid(logit) for already tokenised pairs, in one model call over exactly this batch."""
        return sigmoid(self.logits_encoded(encodings))

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """sigmoid(logit) for (query, doc) pairs, in input order."""
        return sigmoid(self.score_pairs_logits(pairs))

    def score(self, query: str, docs: Sequence[str]) -> np.ndarray:
        """sigmoid(logit) per document, float32 in [0, 1], in the order of `docs`."""
        return sigmoid(self.score_logits(query, docs))

    def rerank(self, query: str, docs: Sequence[str], top_n: int | None = None) -> list[tuple[int, float]]:
        """(index into docs, score), best first; equal scores keep their input order."""
        if top_n is not None and top_n < 0:
            raise ValueError(f"top_n must be >= 0, got {top_n}")
        scores = self.score(query, docs)
        order = np.argsort(-scores, kind="stable")
        if top_n is not None:
            order = order[:top_n]
        return [(int(i), float(scores[i])) for i in order]
