"""Embedding speed for indexing (bge-large-zh-v1.5 architecture): the product's `Embedder`
(`encode_documents`, ONNX FP32 and INT8) against sentence-transformers `SentenceTransformer.encode`
(PyTorch FP32, its own length sorting), same weights, same titles. Agreement: min cosine between
our vectors and sentence-transformers' (both L2-normalised, CLS pooling)."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common, gemm

log = logging.getLogger(__name__)

EncodeFn = Callable[[list[str]], np.ndarray]


def ours(model_dir: Path, precision: str, *, threads: int, batch_size: int, cache_dir: Path | None) -> EncodeFn:
    from middleware.models import Embedder

    embedder = Embedder(
        model_dir, precision=precision, device="cpu", threads=threads, batch_size=batch_size, cache_dir=cache_dir
    )
    return embedder.encode_documents


def sentence_transformers(model_dir: Path, *, threads: int, batch_size: int) -> EncodeFn:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(model_dir), device="cpu")

    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(
            model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False),
            dtype=np.float32,
        )

    return encode


def run(
    models: common.BenchModels, *, quick: bool, threads: int, batch_size: int, cache_dir: Path | None
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    model_dir = models.embedder
    n_docs, rounds = (16, 1) if quick else (128, 3)
    docs = common.embed_docs("qbqtc", n_docs, seed=1) + common.embed_docs("homedepot", n_docs // 2, seed=1)
    warmup = common.embed_docs("qbqtc", 8, seed=2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(ids) for ids in tokenizer(docs, truncation=True, max_length=512)["input_ids"]]

    candidates: list[tuple[str, str, Callable[[], EncodeFn]]] = [
        (
            "sentence-transformers encode FP32",
            "fp32",
            lambda: sentence_transformers(model_dir, threads=threads, batch_size=batch_size),
        ),
        (
            "ours ONNX FP32",
            "fp32",
            lambda: ours(model_dir, "fp32", threads=threads, batch_size=batch_size, cache_dir=cache_dir),
        ),
        (
            "ours ONNX INT8",
            "int8",
            lambda: ours(model_dir, "int8", threads=threads, batch_size=batch_size, cache_dir=cache_dir),
        ),
    ]
    results: dict[str, Any] = {}
    reference: np.ndarray | None = None
    for name, precision, load in candidates:
        entry: dict[str, Any] = {"precision": precision, "machine_probe_gflops_before": gemm.probe(threads)}
        entry["load_average_before"] = list(os.getloadavg())
        log.info("embed: loading %s", name)
        load_s, encode = common.timed(load)
        entry["load_s"] = round(load_s, 2)
        encode(warmup)
        timing = common.Timing()
        vectors = None
        for _ in range(rounds):
            seconds, vectors = common.timed(lambda e=encode: e(docs))
            timing.add(seconds, len(docs))
        summary = timing.summary()
        entry["docs_per_s"] = summary["items_per_s"]
        entry["seconds_per_round_median"] = summary["latency_median_s"]
        if reference is None:
            reference = vectors
        else:
            cosines = np.sum(vectors * reference, axis=1)
            entry["min_cosine_vs_sentence_transformers"] = float(cosines.min())
        results[name] = entry
        del encode
        gc.collect()
    base = results["sentence-transformers encode FP32"]["docs_per_s"]
    for entry in results.values():
        entry["ratio_to_sentence_transformers"] = entry["docs_per_s"] / base
    return {
        "model_dir": str(model_dir),
        "full_size": models.full_size,
        "threads": threads,
        "batch_size": batch_size,
        "docs": len(docs),
        "rounds": rounds,
        "token_lengths": common.length_stats(lengths),
        "runners": results,
    }
