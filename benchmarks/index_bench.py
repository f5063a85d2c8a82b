"""Indexing throughput: `shopsearch index`'s pipeline (read → validate → classify → embed → write).

Two runs into a fresh embedded store, through `loaders.indexer.Indexer.index` from a JSONL file:
- pipeline overhead: 100k synthetic products with the factory's tiny BERT (the model costs almost
  nothing, so docs/s measures parsing, validation, hashing, the cache, jieba + CJK analysis, SQLite
  and faiss); then the same file again, every row unchanged (the daily re-index case);
- model-bound: 2k products with the exact bge-large-zh-v1.5 architecture (random weights, ONNX FP32,
  the configured default precision).
Each reports docs/s and the share of wall time spent outside the model (timed around every
`encode_documents` call). Product texts are QBQTC titles (real Chinese product-search titles)
with a synthetic description, ids and signals; synthetic words when the data folder is missing.

    python -m benchmarks --only index [--quick]       (quick: 3k tiny-model products; the full-size
                                                       model only if already built, on 32 products)
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import RANDOM_WEIGHTS_NOTE
from benchmarks.common import BENCH_MODELS, corpus_texts, machine_info, write_json

TINY_PRODUCTS = 100_000
FULL_PRODUCTS = 2_000
QUICK_TINY_PRODUCTS = 3_000
QUICK_FULL_PRODUCTS = 32
BATCH_SIZE = 512


class TimedEmbedder:
    """The real Embedder, with the wall time spent inside it recorded."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.texts = 0

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self.inner.encode_documents(texts)
        finally:
            self.seconds += time.perf_counter() - start
            self.texts += len(texts)


def synthetic_catalog(n: int, path: Path, seed: int = 0) -> dict[str, float]:
    """n products as JSONL; returns text length statistics (characters of the embedded text)."""
    rng = random.Random(seed)
    try:
        titles = corpus_texts("qbqtc")[0]
    except OSError:
        titles = []
    words = ["手表", "礼盒", "女士", "男士", "机械", "防水", "轻奢", "小众", "耳机", "降噪", "手机", "运动", "新款"]
    brands = ["欧米茄", "卡西欧", "天梭", "华为", "小米", "苹果", "索尼", "耐克"]
    lengths = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            title = titles[i % len(titles)] if titles else " ".join(rng.choices(words, k=rng.randint(3, 9)))
            description = " ".join(rng.choices(words, k=rng.randint(2, 12)))
            row = {
                "id": f"sku-{i}",
                "title": f"{title} {i}",
                "description": description,
                "brand": rng.choice(brands),
                "category": rng.choice(words),
                "price": round(rng.uniform(5, 5000), 2),
                "sales": rng.randint(0, 100_000),
                "stock": rng.randint(0, 50),
            }
            lengths.append(len(row["title"]) + 1 + len(description))
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    a = np.asarray(lengths)
    return {"mean_chars": round(float(a.mean()), 1), "p50_chars": float(np.median(a)), "max_chars": int(a.max())}


def _index_once(source: Path, store: Path, embedder: TimedEmbedder) -> dict[str, Any]:
    from loaders.embed_cache import EmbeddingCache
    from loaders.indexer import Indexer
    from loaders.sources import read_rows
    from loaders.validate import DeadLetters
    from middleware.backends.embedded import EmbeddedBackend

    model_before = embedder.seconds
    start = time.perf_counter()
    backend = EmbeddedBackend(store, dim=embedder.dim)
    cache = EmbeddingCache(store / "cache" / "embeddings.sqlite", embedder.model_id, embedder.dim)
    try:
        summary = Indexer(embedder, cache=cache, batch_size=BATCH_SIZE).index(
            read_rows(str(source), "jsonl"), backend, dead_letters=DeadLetters(store / "dead.jsonl")
        )
    finally:
        cache.close()
        backend.close()  # includes saving the faiss index: part of the cost
    wall = time.perf_counter() - start
    model = embedder.seconds - model_before
    return {
        "products": summary.read,
        "indexed": summary.indexed,
        "unchanged": summary.unchanged,
        "embedded": summary.embedded,
        "wall_s": round(wall, 2),
        "docs_per_s": round(summary.read / wall, 1),
        "model_s": round(model, 2),
        "write_s": round(summary.seconds_writing, 2),
        "outside_model_share": round(1 - model / wall, 3) if wall > 0 else None,
        "store_bytes": sum(p.stat().st_size for p in store.rglob("*") if p.is_file()),
    }


def _tiny_model_dir() -> Path:
    from tests.support import tiny_models as testing

    path = BENCH_MODELS / "tiny-bert"
    if not (path / "config.json").exists():
        testing.make_tiny_bert(path, pooling="cls")
    return path


def _full_model_dir(build: bool) -> Path | None:
    """bge-large-zh-v1.5's architecture with a tokenizer trained on the benchmark corpus (shared with
    the embed benchmark: same directory and marker as benchmarks.common.prepare_models)."""
    from benchmarks.common import _training_texts, train_bert_tokenizer
    from tests.support import tiny_models as testing

    path = BENCH_MODELS / "bge-large-zh-v1.5-random"
    marker = path / "bench-tokenizer.json"
    if marker.exists():
        return path
    if not build:
        return None
    testing.make_full_bge_embedder(path)
    testing.save_bert_tokenizer(train_bert_tokenizer(_training_texts(None), testing.BGE_LARGE_ZH_VOCAB), path)
    marker.write_text(json.dumps({"tokenizer": "trained on qbqtc + homedepot titles and queries"}))
    return path


def _embedder(path: Path) -> TimedEmbedder:
    from middleware.config import Settings
    from middleware.models import Embedder

    settings = Settings()
    return TimedEmbedder(
        Embedder(
            str(path),
            runtime=settings.embedder_runtime,
            precision=settings.embedder_precision,
            device="cpu",
            cache_dir=BENCH_MODELS / "onnx-cache",
        )
    )


def _warm_up(embedder: TimedEmbedder) -> None:
    """ONNX export (first use) and session start-up are loading, not indexing: keep them out."""
    embedder.encode_documents(["预热 warm-up"])
    embedder.seconds, embedder.texts = 0.0, 0


def run(quick: bool, output_dir: Path) -> dict[str, Any]:
    output_dir = Path(output_dir)
    results: dict[str, Any] = {"machine": machine_info(), "quick": quick, "batch_size": BATCH_SIZE}
    with tempfile.TemporaryDirectory(prefix="shopsearch-index-bench-") as tmp:
        tmpdir = Path(tmp)

        n = QUICK_TINY_PRODUCTS if quick else TINY_PRODUCTS
        source = tmpdir / "tiny.jsonl"
        results["tiny_text"] = synthetic_catalog(n, source)
        tiny = _embedder(_tiny_model_dir())
        _warm_up(tiny)
        first = _index_once(source, tmpdir / "tiny-store", tiny)
        again = _index_once(source, tmpdir / "tiny-store", tiny)
        results["tiny_model"] = {"first_index": first, "reindex_unchanged": again}
        _print("tiny model, fresh store", first)
        _print("tiny model, re-index unchanged", again)

        full_dir = _full_model_dir(build=not quick)
        if full_dir is None:
            results["full_model"] = {"skipped": "quick mode and the full-size model is not built yet"}
            print("full-size model: skipped (quick mode, model not built yet)")
        else:
            n = QUICK_FULL_PRODUCTS if quick else FULL_PRODUCTS
            source = tmpdir / "full.jsonl"
            results["full_text"] = synthetic_catalog(n, source, seed=1)
            full = _embedder(full_dir)
            _warm_up(full)
            run_full = _index_once(source, tmpdir / "full-store", full)
            results["full_model"] = {"first_index": run_full, "model": "bge-large-zh-v1.5 architecture, random"}
            _print("bge-large-zh architecture (random weights), fresh store", run_full)
    results["load_average_at_end"] = list(os.getloadavg())  # shared machine: read figures with this
    results["note"] = RANDOM_WEIGHTS_NOTE
    path = write_json(output_dir, "index", results)
    print(f"wrote {path}")
    return results


def _print(label: str, r: dict[str, Any]) -> None:
    print(
        f"{label}: {r['products']} products in {r['wall_s']} s = {r['docs_per_s']:.1f} docs/s; "
        f"model {r['model_s']} s, writes {r['write_s']} s, outside the model {100 * r['outside_model_share']:.0f}% "
        f"(embedded {r['embedded']}, unchanged {r['unchanged']})"
    )


if __name__ == "__main__":
    import sys

    run("--quick" in sys.argv, Path(__file__).resolve().parent / "results")
