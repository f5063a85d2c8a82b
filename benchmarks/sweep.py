"""Thread counts × batch sizes for the product's Reranker (INT8, FP32) and Embedder (INT8), to justify
the defaults (`threads=None` → usable cores, `batch_size=32`). One session per thread count; the
batch size is the object's own `batch_size` attribute, which `score_logits`/`_encode` read per call."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from benchmarks import common

log = logging.getLogger(__name__)


def _thread_counts(cores: int) -> list[int]:
    return sorted({1, cores})


def run(
    models: common.BenchModels, *, quick: bool, threads: int, default_batch_size: int, cache_dir: Path | None
) -> dict[str, Any]:
    from middleware.models import Embedder, Reranker

    top_k = 10 if quick else 100
    sets = common.rerank_sets("qbqtc", 1, top_k, seed=7)
    sets += common.rerank_sets("homedepot", 1, top_k, seed=7)
    docs = common.embed_docs("qbqtc", 16 if quick else 96, seed=3)
    plans: list[tuple[str, str, list[int], list[int]]] = [
        ("reranker", "int8", _thread_counts(threads), [8, 32] if quick else [8, 16, 32, 64]),
        ("reranker", "fp32", [threads], [32] if quick else [16, 32, 64]),
        ("embedder", "int8", [threads], [32] if quick else [16, 32, 64]),
    ]
    rows: list[dict[str, Any]] = []
    for kind, precision, thread_counts, batch_sizes in plans:
        for n_threads in thread_counts:
            if kind == "reranker":
                model: Any = Reranker(
                    models.reranker, precision=precision, device="cpu", threads=n_threads, cache_dir=cache_dir
                )

                def call(m: Any = model) -> int:
                    for s in sets:
                        m.score(s.query, s.docs)
                    return sum(len(s.docs) for s in sets)
            else:
                model = Embedder(
                    models.embedder, precision=precision, device="cpu", threads=n_threads, cache_dir=cache_dir
                )

                def call(m: Any = model) -> int:
                    m.encode_documents(docs)
                    return len(docs)

            call()  # warm-up
            for batch_size in batch_sizes:
                model.batch_size = batch_size
                timing = common.Timing()
                for _ in range(1):
                    seconds, items = common.timed(call)
                    timing.add(seconds, items)
                rate = timing.summary()["items_per_s"]
                rows.append(
                    {
                        "model": kind,
                        "precision": precision,
                        "threads": n_threads,
                        "batch_size": batch_size,
                        "items_per_s": rate,
                    }
                )
                log.info("sweep %s %s threads=%d batch=%d: %.2f items/s", kind, precision, n_threads, batch_size, rate)
            del model, call
            gc.collect()
    best: dict[str, Any] = {}
    for kind, precision, _, _ in plans:
        group = [r for r in rows if r["model"] == kind and r["precision"] == precision]
        top = max(group, key=lambda r: r["items_per_s"])
        default = next((r for r in group if r["threads"] == threads and r["batch_size"] == default_batch_size), None)
        best[f"{kind} {precision}"] = {
            "best": top,
            "default": default,
            "default_vs_best": default["items_per_s"] / top["items_per_s"] if default else None,
        }
    return {
        "top_k": top_k,
        "rerank_sets": len(sets),
        "embed_docs": len(docs),
        "rows": rows,
        "best": best,
        "batch_overhead": overhead_sweep(models, quick=quick, threads=threads, cache_dir=cache_dir),
    }


def overhead_sweep(models: common.BenchModels, *, quick: bool, threads: int, cache_dir: Path | None) -> dict[str, Any]:
    """Batch cuts: fixed chunks (None) vs `plan_batches` with several per-batch overheads, at top-100
    and top-20, INT8 and FP32, in interleaved rounds (drift hits every setting alike)."""
    from middleware.models import Reranker
    from middleware.models.tokenization import BATCH_OVERHEAD_TOKENS

    ks = (10,) if quick else (100, 20)
    sets = {k: common.rerank_sets("qbqtc", 2, k, seed=13) + common.rerank_sets("homedepot", 1, k, seed=13) for k in ks}
    settings: list[int | None] = [None, 16, 32, 64]
    rounds = 1
    rows: list[dict[str, Any]] = []
    for precision in ("int8",) if quick else ("int8", "fp32"):
        reranker = Reranker(models.reranker, precision=precision, device="cpu", threads=threads, cache_dir=cache_dir)
        reranker.score(sets[ks[0]][0].query, sets[ks[0]][0].docs)  # warm-up
        seconds: dict[tuple[int, int | None], float] = {}
        for _ in range(rounds):
            for k in ks:
                # FP32 is 4× slower: only fixed chunks vs the default there
                for overhead in settings if precision == "int8" else [None, BATCH_OVERHEAD_TOKENS]:
                    # the tokenizer's planning knob (instance attribute over the class default)
                    reranker._tokenizer.batch_overhead_tokens = overhead
                    for s in sets[k]:
                        t, _ = common.timed(lambda s=s, r=reranker: r.score(s.query, s.docs))
                        seconds[(k, overhead)] = seconds.get((k, overhead), 0.0) + t
        for (k, overhead), total in seconds.items():
            pairs = sum(len(s.docs) for s in sets[k]) * rounds
            rows.append({"precision": precision, "top_k": k, "overhead_tokens": overhead, "pairs_per_s": pairs / total})
        del reranker
        gc.collect()
    return {"default_overhead_tokens": BATCH_OVERHEAD_TOKENS, "settings": settings, "rows": rows}
