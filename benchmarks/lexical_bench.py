"""Lexical engine speed: the embedded store's BM25 against its FTS5 predecessor, bm25s and tantivy.

One run measures, on real product titles (Home Depot + QBQTC; the third, Chinese e-commerce set of
the original measurement is not in the data folder) and real queries (a seeded sample from each
`queries.jsonl`, interleaved), BM25 top-100, single-threaded calls, in-process:

- engines at the catalog size (100k: every real title, then synthetic titles up to the size):
  "shopsearch embedded" (`EmbeddedBackend.bm25`, query analysis included), the legacy FTS5 engine
  (`benchmarks.legacy_fts5`, same products, same analysis), bm25s and tantivy on the same tokens
  (every lexical field's tokens concatenated per product; the query's tokens precomputed, so their
  rows exclude query analysis, which is timed on its own row);
- filters: price range + in stock, and one brand, for the two engines that filter;
- hybrid: `middleware.retrieve.retrieve` (BM25 || kNN on the pipeline's stage threads) + the
  configured fusion, with random unit vectors (dim 384) and precomputed query vectors;
- at the large size (1M synthetic-extended products, the store built once and cached under
  ~/.cache/shopsearch/bench-lexical): the embedded engine, unfiltered and filtered;
- indexing throughput of `Indexer` with no embedder (what `shopsearch index --embedder none` runs)
  from a JSONL file into a fresh store, its disk size, and the RSS the opened store adds after a
  warm-up (psutil).

Synthetic titles are drawn word by word from the real titles' vocabulary (whitespace words for the
English set, jieba words for the Chinese one, each at its corpus frequency, title lengths as in the
corpus), seeded. Brand, price, stock and category are synthetic, seeded. Each (engine, case) is
measured until its queries are done or its time cap is spent; `n` says how many were timed.

    python -m benchmarks --only lexical [--quick]
    (SHOPSEARCH_BENCH_LEXICAL_LARGE=N: another large size; SHOPSEARCH_BENCH_LEXICAL_CACHE: the cache folder)
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DATA_DIR, machine_info, markdown_table, write_json

TOP_K = 100
DIM = 384
SEED = 0
DATASETS = ("homedepot", "qbqtc")
CHUNK = 10_000  # synthetic rows are generated per chunk, so a smaller catalog is a prefix of a larger one
SYNTH_VERSION = 1  # bump when the synthetic catalog changes: invalidates the cached stores
CACHE = Path(os.environ.get("SHOPSEARCH_BENCH_LEXICAL_CACHE", Path.home() / ".cache" / "shopsearch" / "bench-lexical"))

# the targets of the lexical engine's issue
TARGET_FILTERED_P99_MS = 5.0
TARGET_VS_BM25S = 2.0
TARGET_LARGE_P99_MS = 50.0
TARGET_HYBRID_P99_MS = 15.0
TARGET_INDEX_DOCS_PER_S = 3 * 1475

BRANDS = {
    "homedepot": [
        *("Husky", "DEWALT", "Milwaukee", "BEHR", "Glacier Bay", "Hampton Bay", "RIDGID", "Delta", "Moen"),
        *("Everbilt", "GE", "Home Decorators Collection", "Lithonia Lighting", "Simpson Strong-Tie"),
    ],
    "qbqtc": [
        *("华为", "小米", "苹果", "欧米茄", "卡西欧", "天梭", "耐克", "阿迪达斯", "美的", "格力", "海尔", "联想"),
        *("索尼", "李宁"),
    ],
}
CATEGORIES = ["tools", "lighting", "bath", "kitchen", "garden", "paint", "电子", "服饰", "家居", "食品"]
BRAND_FILTER = "Hampton Bay"  # the sixth brand of the larger set: a few percent of the catalog


@dataclass(frozen=True)
class Sizes:
    catalog: int
    large: int
    queries_per_set: int
    warmup: int
    cap_s: float  # per (engine, case)
    large_cap_s: float


FULL = Sizes(catalog=100_000, large=1_000_000, queries_per_set=300, warmup=30, cap_s=40.0, large_cap_s=40.0)
QUICK = Sizes(catalog=3_000, large=12_000, queries_per_set=25, warmup=5, cap_s=5.0, large_cap_s=5.0)


def filter_cases() -> dict[str, Any]:
    from middleware.products import Filters

    return {
        "none": None,
        "price+in_stock": Filters(price_min=20, price_max=300, in_stock=True),
        "brand": Filters(brand=[BRAND_FILTER]),
    }


# ---------------------------------------------------------------------------------------- data


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def real_titles() -> list[tuple[str, str, str]]:
    """(dataset, id, title) of every titled document of the real corpora, in a seeded order."""
    out = []
    for ds in DATASETS:
        out += [(ds, str(d["_id"]), d["title"]) for d in _read_jsonl(DATA_DIR / ds / "corpus.jsonl") if d.get("title")]
    random.Random(SEED).shuffle(out)  # a smaller catalog (--quick) still mixes both sets
    return out


def sample_queries(per_set: int, seed: int = SEED) -> list[str]:
    """A seeded sample of `per_set` real queries from each dataset, interleaved (seeded shuffle)."""
    rng = random.Random(seed)
    queries: list[str] = []
    for ds in DATASETS:
        texts = sorted({q["text"].strip() for q in _read_jsonl(DATA_DIR / ds / "queries.jsonl") if q.get("text")})
        queries += rng.sample(texts, min(per_set, len(texts)))
    rng.shuffle(queries)
    return queries


class TitleSynth:
    """Titles drawn from the real titles' vocabulary, at corpus word frequencies and title lengths."""

    def __init__(self, titles: Sequence[tuple[str, str, str]]) -> None:
        import jieba

        jieba.setLogLevel(60)
        self.sets: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}
        for ds in DATASETS:
            counts: Counter[str] = Counter()
            lengths = []
            for source, _, title in titles:
                if source != ds:
                    continue
                words = title.split() if ds == "homedepot" else [w for w in jieba.lcut(title) if w.strip()]
                counts.update(words)
                lengths.append(max(1, len(words)))
            vocab = sorted(counts)
            freq = np.array([counts[w] for w in vocab], dtype=np.float64)
            self.sets[ds] = (vocab, freq / freq.sum(), np.array(lengths))
        total = sum(len(v[2]) for v in self.sets.values())
        self.share = {ds: len(v[2]) / total for ds, v in self.sets.items()}

    def chunk(self, c: int) -> list[tuple[str, str]]:
        """The c-th chunk of CHUNK synthetic (dataset, title) pairs."""
        rng = np.random.default_rng([SEED, SYNTH_VERSION, c])
        pick_en = rng.random(CHUNK) < self.share["homedepot"]
        out = []
        drawn = {}
        for ds in DATASETS:
            vocab, probs, lengths = self.sets[ds]
            n = int(pick_en.sum()) if ds == "homedepot" else int((~pick_en).sum())
            lens = rng.choice(lengths, size=n)
            words = rng.choice(len(vocab), size=int(lens.sum()), p=probs)
            sep = " " if ds == "homedepot" else ""
            titles, at = [], 0
            for k in lens:
                titles.append(sep.join(vocab[w] for w in words[at : at + k]))
                at += k
            drawn[ds] = iter(titles)
        for en in pick_en:
            ds = "homedepot" if en else "qbqtc"
            out.append((ds, next(drawn[ds])))
        return out


def catalog_rows(n: int, titles: Sequence[tuple[str, str, str]], synth: TitleSynth) -> Iterator[list[dict[str, Any]]]:
    """n catalog rows, CHUNK at a time: every real title first (up to n), then synthetic ones."""
    for c in range((n + CHUNK - 1) // CHUNK):
        start, stop = c * CHUNK, min(n, (c + 1) * CHUNK)
        rng = np.random.default_rng([SEED, SYNTH_VERSION, 1_000_000 + c])
        m = stop - start
        prices = np.round(np.exp(rng.normal(4.0, 1.2, size=m)), 2)
        stock = np.where(rng.random(m) < 0.2, 0, rng.integers(1, 200, size=m))
        brand_rank = np.minimum(rng.zipf(1.3, size=m) - 1, len(BRANDS["homedepot"]) - 1)
        cats = rng.integers(0, len(CATEGORIES), size=m)
        sales = rng.integers(0, 50_000, size=m)
        synthetic = iter(synth.chunk(c - len(titles) // CHUNK)) if stop > len(titles) else iter(())
        rows = []
        for j, i in enumerate(range(start, stop)):
            if i < len(titles):
                ds, doc_id, title = titles[i]
                pid = f"{ds}-{doc_id}"
            else:
                ds, title = next(synthetic)
                pid = f"synth-{i}"
            rows.append(
                {
                    "id": pid,
                    "title": title,
                    "brand": BRANDS[ds][int(brand_rank[j])],
                    "category": [CATEGORIES[int(cats[j])]],
                    "price": float(prices[j]),
                    "stock": int(stock[j]),
                    "sales": int(sales[j]),
                }
            )
        yield rows


def unit_vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


# ---------------------------------------------------------------------------------------- stores


def engine_fingerprint() -> str:
    """Names what a cached store holds: the lexical engine, its schema, the analysis, the store's schema and the
    synthetic catalog. The backend itself migrates or rebuilds a derived index whose stamp is stale."""
    from middleware import text
    from middleware.backends.embedded import lexical, store

    parts = [
        *(str(getattr(m, name, "-")) for m, name in ((lexical, "SCHEMA_REVISION"), (store, "SCHEMA_VERSION"))),
        str(getattr(text, "ANALYSIS_VERSION", "-")),
        *sorted(c for c in dir(lexical) if c.endswith("LexicalIndex")),
        f"synth{SYNTH_VERSION}",
        "bulk-load",  # built inside EmbeddedBackend.bulk_load, as the indexer loads
        "force-merged",  # then merged, as `shopsearch index --force-merge` leaves a store
    ]
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


def cached_store(
    kind: str, n: int, titles: Sequence[tuple[str, str, str]], synth: TitleSynth, vectors: bool
) -> tuple[Path, dict[str, Any]]:
    """A store of the first n catalog rows (with random vectors when asked), built once per engine version."""

    path = CACHE / f"{kind}-{n}-{engine_fingerprint()}"
    marker = path / "bench-complete.json"
    if marker.exists():
        return path, {**json.loads(marker.read_text()), "cached": True}
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{kind}-{n}.lock", "w") as lock:
        if not _try_lock(lock):
            print(f"waiting for another process building {path}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return path, {**json.loads(marker.read_text()), "cached": True}
        return path, _build_store(path, kind, n, titles, synth, vectors)


def _try_lock(lock: Any) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _build_store(
    path: Path, kind: str, n: int, titles: Sequence[tuple[str, str, str]], synth: TitleSynth, vectors: bool
) -> dict[str, Any]:
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.products import Product

    marker = path / "bench-complete.json"
    for stale in CACHE.glob(f"{kind}-{n}-*"):  # an older engine's store of the same shape
        if stale != path:
            shutil.rmtree(stale, ignore_errors=True)
    progress = path / "bench-progress.json"  # an interrupted build resumes (upserts by id are idempotent)
    spent = json.loads(progress.read_text())["build_s"] if progress.exists() else 0.0
    print(f"building the cached {kind} store of {n:,} products in {path} (once per engine version)", flush=True)
    start = time.perf_counter()
    # a bulk load, as `shopsearch index` runs one: its lexical index is published in few commits
    with EmbeddedBackend(path, dim=DIM if vectors else None, durable=False) as backend, backend.bulk_load():
        have = backend.count()
        if have:
            print(f"  resuming after {have:,} products ({spent:.0f} s spent before)", flush=True)
        done = 0
        for c, rows in enumerate(catalog_rows(n, titles, synth)):
            done += len(rows)
            if done <= have:
                continue
            vecs = unit_vectors(len(rows), seed=10_000 + c) if vectors else None
            for b in range(0, len(rows), 1000):
                backend.upsert(
                    [Product.model_validate(r) for r in rows[b : b + 1000]],
                    None if vecs is None else vecs[b : b + 1000],
                )
            elapsed = spent + time.perf_counter() - start
            progress.write_text(json.dumps({"build_s": round(elapsed, 1), "products": done}))
            if done % 100_000 == 0:
                print(f"  {done:,} products, {elapsed:.0f} s", flush=True)
    with EmbeddedBackend(path, dim=DIM if vectors else None, durable=False) as backend:
        merge_start = time.perf_counter()
        before, after = backend.force_merge()
        merge_s = time.perf_counter() - merge_start
    print(f"  force merge: {before} -> {after} lexical segments, {merge_s:.1f} s", flush=True)
    total = spent + time.perf_counter() - start
    info = {
        "products": n,
        "vectors": vectors,
        "build_s": round(total, 1),
        "cached": False,
        "force_merge": {"segments_before": before, "segments_after": after, "seconds": round(merge_s, 1)},
    }
    marker.write_text(json.dumps(info))
    return info


def engine_name(backend: Any) -> str:
    """The class of the embedded store's lexical engine."""
    engine = getattr(backend, "lexical", None)
    return type(engine).__name__ if engine is not None else "unknown"


def lexical_segments(backend: Any) -> int | None:
    """How many segments the embedded store's lexical index searches (each is scored on its own)."""
    details = getattr(getattr(backend, "lexical", None), "details", None)
    return details().get("segments") if callable(details) else None


def disk_usage(path: Path) -> dict[str, int]:
    """Bytes per top-level entry of a data directory (folders summed), plus the total."""
    out: dict[str, int] = {}
    for entry in sorted(path.iterdir()):
        if entry.name in ("bench-complete.json", "bench-progress.json"):
            continue
        size = (
            entry.stat().st_size if entry.is_file() else sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
        )
        out[entry.name] = size
    out["total"] = sum(out.values())
    return out


def resident() -> dict[str, int]:
    """Resident bytes, split into private memory and mapped file pages. The store maps its SQLite file and
    tantivy its segments: touched file pages count in RSS but are the OS page cache, shared and reclaimable,
    which a process reading with read() also fills without RSS showing it."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("RssAnon", "RssFile")))
        return {name: int(fields[key].split()[0]) * 1024 for name, key in (("private", "RssAnon"), ("file", "RssFile"))}
    except (OSError, KeyError):  # not Linux: psutil's RSS, undivided
        import psutil

        return {"private": psutil.Process().memory_info().rss, "file": 0}


# ---------------------------------------------------------------------------------------- timing


def settings_gc_threshold() -> int:
    from middleware.config import ServerSettings

    return ServerSettings().gc_young_threshold


def serving_heap() -> None:
    from middleware.server import heap

    heap.settle(settings_gc_threshold())


def measure(fn: Callable[[int], int], n_queries: int, warmup: int, cap_s: float) -> dict[str, Any]:
    """Latency of fn(i) (returns its hit count) over queries 0..n-1 after `warmup` untimed calls,
    with the garbage collector set up as a serving process sets it once loaded (`middleware.server.heap`)."""
    for i in range(min(warmup, n_queries)):
        fn(i)
    serving_heap()
    lat: list[float] = []
    hits: list[int] = []
    stop_at = time.perf_counter() + cap_s
    for i in range(n_queries):
        t0 = time.perf_counter()
        hits.append(fn(i))
        lat.append(time.perf_counter() - t0)
        if time.perf_counter() > stop_at:
            break
    a = np.asarray(lat) * 1000.0
    return {
        "n": len(a),
        "of": n_queries,
        "capped": len(a) < n_queries,
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p95_ms": round(float(np.percentile(a, 95)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "mean_ms": round(float(a.mean()), 3),
        "max_ms": round(float(a.max()), 3),
        "mean_hits": round(float(np.mean(hits)), 1),
        "qps_one_thread": round(len(a) / float(a.sum() / 1000.0), 1),
    }


def _doc_tokens(product: Any) -> list[str]:
    """Every lexical field's tokens (`middleware.text.analyze_product`), concatenated in field order."""
    from middleware.text import analyze_product

    return [t for tokens in analyze_product(product.title, product.search_text()).values() for t in tokens]


def _lexical_fields() -> list[str]:
    from middleware.text import analyze_product

    return list(analyze_product("a", "b"))


def _query_tokens(text: str) -> list[str]:
    """The query's distinct tokens over every lexical field (`middleware.text.analyze_query`)."""
    from middleware.text import analyze_query

    return list(dict.fromkeys(t for tokens in analyze_query(text).values() for t in tokens))


def build_bm25s(docs: Sequence[list[str]], backend: str | None = None) -> Any:
    import bm25s

    # bm25s is fastest with its numba backend (its default is numpy); the target's peer gets the fast one
    chosen = backend or ("numba" if _bm25s_backend() == "numba" else "numpy")
    retriever = bm25s.BM25(backend=chosen)
    retriever.index(list(docs), show_progress=False)
    return retriever


def build_tantivy(docs: Sequence[list[str]]) -> tuple[Any, Any]:
    import tantivy

    builder = tantivy.SchemaBuilder()
    builder.add_text_field("t", stored=False, tokenizer_name="ws", index_option="freq")
    schema = builder.build()
    index = tantivy.Index(schema)
    index.register_tokenizer("ws", tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.whitespace()).build())
    writer = index.writer(heap_size=200_000_000, num_threads=1)
    for tokens in docs:
        writer.add_document(tantivy.Document(t=" ".join(tokens)))
    writer.commit()
    writer.wait_merging_threads()
    index.reload()
    return index, schema


def _bm25s_backend() -> str:
    import importlib.util

    return "numba" if importlib.util.find_spec("numba") is not None else "numpy (numba not installed)"


def peer_bm25s(
    tokens: Sequence[list[str]], qtokens: Sequence[list[str]], sizes: Sizes, backend: str | None = None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    retriever = build_bm25s(tokens, backend)
    out: dict[str, Any] = {"index_s": round(time.perf_counter() - t0, 1), "backend": backend or _bm25s_backend()}
    k = min(TOP_K, len(tokens))

    def query(i: int) -> int:
        _, scores = retriever.retrieve([qtokens[i]], k=k, show_progress=False)
        return int((scores[0] > 0).sum())  # bm25s fills the top k with zero-score documents

    out["none"] = measure(query, len(qtokens), sizes.warmup, sizes.cap_s)
    _line(f"bm25s same tokens{', ' + backend if backend else ''}", "none", out["none"])
    return out


def peer_tantivy(tokens: Sequence[list[str]], qtokens: Sequence[list[str]], sizes: Sizes) -> dict[str, Any]:
    import tantivy

    t0 = time.perf_counter()
    index, schema = build_tantivy(tokens)
    out: dict[str, Any] = {"index_s": round(time.perf_counter() - t0, 1), "version": tantivy.__version__}
    searcher = index.searcher()
    should = tantivy.Occur.Should
    queries = [
        tantivy.Query.boolean_query([(should, tantivy.Query.term_query(schema, "t", t)) for t in qt]) for qt in qtokens
    ]
    out["none"] = measure(
        lambda i: len(searcher.search(queries[i], TOP_K).hits), len(qtokens), sizes.warmup, sizes.cap_s
    )
    _line("tantivy same tokens", "none", out["none"])
    return out


# ---------------------------------------------------------------------------------------- sections


def index_throughput(rows_path: Path, store: Path, n: int, queries: Sequence[str], sizes: Sizes) -> dict[str, Any]:
    """`Indexer` with no embedder from a JSONL file into a fresh store, as `shopsearch index --embedder none`."""
    from loaders.indexer import Indexer
    from loaders.sources import read_rows
    from loaders.validate import DeadLetters
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.products import SignalUpdate

    start = time.perf_counter()
    backend = EmbeddedBackend(store, dim=None)
    try:
        summary = Indexer(None).index(
            read_rows(str(rows_path), "jsonl"), backend, dead_letters=DeadLetters(store / "dead.jsonl")
        )
        segments = lexical_segments(backend)
        wall = time.perf_counter() - start

        def bm25(i: int) -> int:
            return len(backend.bm25(queries[i], None, TOP_K))

        as_loaded = measure(bm25, len(queries), sizes.warmup, sizes.cap_s)
        _line("indexing run's store, as loaded", "none", as_loaded)
        merge_start = time.perf_counter()
        # timed apart: `--force-merge` is the user's choice; meanwhile one-product writes, as a serving
        # process makes them (they must not wait for the merge)
        merged_to: list[tuple[int, int]] = []
        merging = threading.Thread(target=lambda: merged_to.append(backend.force_merge()))
        merging.start()
        writes_ms: list[float] = []
        ids = list(itertools.islice(backend.iter_ids(), 0, None, max(1, n // 50)))
        while merging.is_alive() and ids:
            product = backend.get([ids[len(writes_ms) % len(ids)]])[0]
            t0 = time.perf_counter()
            backend.update_signals([SignalUpdate(id=product.id, sales=product.sales)])
            writes_ms.append((time.perf_counter() - t0) * 1000.0)
            time.sleep(0.05)
        merging.join()
        merge_s = time.perf_counter() - merge_start
        before, after = merged_to[0]
        merged = measure(bm25, len(queries), sizes.warmup, sizes.cap_s)
        _line("indexing run's store, merged", "none", merged)
    finally:
        backend.close()
    return {
        "products": summary.read,
        "indexed": summary.indexed,
        "wall_s": round(wall, 2),
        "docs_per_s": round(summary.read / wall, 1),
        "target_docs_per_s": TARGET_INDEX_DOCS_PER_S,
        "pass": summary.read / wall >= TARGET_INDEX_DOCS_PER_S,
        "lexical_segments": segments,
        "force_merge": {
            "segments_before": before,
            "segments_after": after,
            "seconds": round(merge_s, 2),
            "writes_during": len(writes_ms),
            "write_ms_p50": round(float(np.percentile(writes_ms, 50)), 2) if writes_ms else None,
            "write_ms_max": round(max(writes_ms), 2) if writes_ms else None,
        },
        "docs_per_s_with_force_merge": round(summary.read / (wall + merge_s), 1),
        "bm25_as_loaded": as_loaded,
        "bm25_merged": merged,
        "disk": disk_usage(store),
    }


def store_memory(store: Path, queries: Sequence[str], warmup: int) -> dict[str, Any]:
    """RSS added by opening a store and running `warmup` queries per filter case, in a fresh process (this one
    holds and frees the benchmark's data, which hides or inverts a delta)."""
    code = "import json, sys; from benchmarks.lexical_bench import _memory_child as m; print(json.dumps(m()))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps({"store": str(store), "queries": list(queries[:warmup])}),
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=600,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_child() -> dict[str, Any]:
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.text import analyze_query

    job = json.loads(sys.stdin.read())
    queries = job["queries"]
    filters = filter_cases()
    analyze_query(queries[0] if queries else "warm")  # the analysers' dictionaries are not the store's
    gc.collect()
    before = resident()
    backend = EmbeddedBackend(job["store"])
    opened = resident()
    try:
        for flt in filters.values():
            for q in queries:
                backend.bm25(q, flt, TOP_K)
        gc.collect()
        warm = resident()
        count = backend.count()
    finally:
        backend.close()

    def delta(after: dict[str, int], part: str) -> float:
        return round((after[part] - before[part]) / 2**20, 1)

    return {
        "products": count,
        "warmup_queries": len(filters) * len(queries),
        "rss_open_delta_mb": delta(opened, "private"),
        "rss_warm_delta_mb": delta(warm, "private"),
        "file_pages_open_delta_mb": delta(opened, "file"),
        "file_pages_warm_delta_mb": delta(warm, "file"),
        "measured_in": "a fresh process",
    }


def run(quick: bool, output_dir: Path) -> dict[str, Any]:
    from benchmarks.legacy_fts5 import Fts5LexicalIndex, LegacyFts5Store
    from middleware import fusion
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.budget import Deadline, Stopwatch
    from middleware.config import Settings
    from middleware.products import Product
    from middleware.query_expansion import QueryExpander
    from middleware.retrieve import retrieve

    sizes = QUICK if quick else FULL
    if os.environ.get("SHOPSEARCH_BENCH_LEXICAL_LARGE"):  # e.g. while the 1M store is not built yet
        sizes = Sizes(**{**asdict(sizes), "large": int(os.environ["SHOPSEARCH_BENCH_LEXICAL_LARGE"])})
    output_dir = Path(output_dir)
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "quick": quick, "sizes": asdict(sizes), "top_k": TOP_K}
    results["gc_young_threshold"] = settings_gc_threshold()
    titles = real_titles()
    per_set = Counter(ds for ds, _, _ in titles)
    queries = sample_queries(sizes.queries_per_set)
    nq = len(queries)
    results["data"] = {
        "real_titles": dict(per_set),
        "real_titles_total": len(titles),
        "queries": nq,
        "missing": "the original measurement's third (Chinese e-commerce) title set is not in the data folder",
        "catalog_real_share": round(min(len(titles), sizes.catalog) / sizes.catalog, 3),
        "brand_filter": BRAND_FILTER,
        "doc_tokens": "every lexical field's tokens (middleware.text.analyze_product) concatenated: "
        + ", ".join(_lexical_fields()),
    }
    print(f"lexical: {len(titles):,} real titles {dict(per_set)}, {nq} queries, catalog {sizes.catalog:,}", flush=True)
    synth = TitleSynth(titles)
    filters = filter_cases()
    settings = Settings()

    with tempfile.TemporaryDirectory(prefix="shopsearch-lexical-bench-") as tmp:
        tmpdir = Path(tmp)
        rows = [r for chunk in catalog_rows(sizes.catalog, titles, synth) for r in chunk]
        rows_path = tmpdir / "catalog.jsonl"
        with open(rows_path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

        # 1. indexing throughput (no embedder), disk and memory of that lexical-only store
        print("indexing throughput: Indexer(None) from JSONL into a fresh store", flush=True)
        results["index"] = index_throughput(rows_path, tmpdir / "index-store", sizes.catalog, queries, sizes)
        results["memory"] = store_memory(tmpdir / "index-store", queries, sizes.warmup)

        # 2. the same products analysed once, for the legacy engine and the same-token peers
        products = [Product.model_validate(r) for r in rows]
        t0 = time.perf_counter()
        docs = [Fts5LexicalIndex.analyze(p) for p in products]
        results["analysis_s"] = round(time.perf_counter() - t0, 1)
        qtokens = [_query_tokens(q) for q in queries]
        tokens = [_doc_tokens(p) for p in products]

        engines: dict[str, dict[str, Any]] = {}
        # shopsearch embedded, on the cached store (with vectors, for the hybrid cases too)
        store_path, build = cached_store("hybrid", sizes.catalog, titles, synth, vectors=True)
        backend = EmbeddedBackend(store_path)
        engine_class = engine_name(backend)
        emb: dict[str, Any] = {
            "engine": engine_class,
            "store": build,
            "disk": disk_usage(store_path),
            "lexical_segments": lexical_segments(backend),
        }
        for case, flt in filters.items():
            emb[case] = measure(
                lambda i, flt=flt: len(backend.bm25(queries[i], flt, TOP_K)), nq, sizes.warmup, sizes.cap_s
            )
            _line("shopsearch embedded", case, emb[case])
        engines["shopsearch embedded"] = emb
        lex = getattr(backend, "lexical", None)
        if hasattr(lex, "match_query") and hasattr(lex, "search"):  # the tantivy engine's internals: diagnostics
            parts = {}
            for case in ("none", "price+in_stock"):

                def search_alone(i: int, flt: Any = filters[case]) -> int:
                    if hasattr(lex, "top"):  # the engine's own choice of filter path
                        return len(lex.top(queries[i], flt, TOP_K))
                    query = lex.match_query(queries[i], flt)
                    return 0 if query is None else len(lex.search(query, TOP_K))

                parts[case] = measure(search_alone, nq, sizes.warmup, sizes.cap_s)
                _line("embedded: engine search alone", case, parts[case])
            engines["embedded: query + search, no row fetch"] = parts
            if hasattr(lex, "top"):  # the other part of a `bm25` call: reading back the rows the search found
                found = [[pk for pk, _ in lex.top(q, None, TOP_K)] for q in queries]

                def rows_alone(i: int) -> int:
                    with backend.store.reader() as conn:
                        return len(backend.store.products_by_pk(conn, found[i]))

                rows = measure(rows_alone, nq, sizes.warmup, sizes.cap_s)
                _line("embedded: row read alone", "none", rows)
                engines["embedded: row read alone"] = {"none": rows}
        # the same engine on the store without vectors (the indexing run's): the rows it reads are smaller
        with EmbeddedBackend(tmpdir / "index-store") as lexical_only:
            bare = measure(lambda i: len(lexical_only.bm25(queries[i], None, TOP_K)), nq, sizes.warmup, sizes.cap_s)
        _line("shopsearch embedded, no vectors", "none", bare)
        engines["shopsearch embedded, store without vectors"] = {"engine": engine_class, "none": bare}

        # hybrid: the pipeline's retrieval stage + fusion, on precomputed query vectors
        qvecs = unit_vectors(nq, seed=2)
        executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="bench-stage")

        def hybrid(i: int, flt: Any) -> int:
            def embed(_: str) -> Future[np.ndarray]:
                fut: Future[np.ndarray] = Future()
                fut.set_result(qvecs[i : i + 1])
                return fut

            found = retrieve(
                backend=backend,
                embed_query=embed,
                text=queries[i],
                filters=flt,
                n=TOP_K,
                use_bm25=True,
                use_knn=True,
                deadline=Deadline(settings.deadline_ms),
                executor=executor,
                watch=Stopwatch(),
            )
            if found.degraded:
                degraded.append(i)
            if settings.fusion.method == "rrf":
                return len(fusion.rrf(found.lists, k=settings.fusion.rrf_k))
            weights = {"bm25": settings.fusion.bm25_weight, "knn": settings.fusion.knn_weight}
            return len(fusion.minmax(found.lists, weights))

        hyb: dict[str, Any] = {"fusion": settings.fusion.method, "deadline_ms": settings.deadline_ms}
        for case in ("none", "price+in_stock"):
            degraded: list[int] = []
            hyb[case] = measure(lambda i, c=case: hybrid(i, filters[c]), nq, sizes.warmup, sizes.cap_s)
            hyb[case]["degraded_queries"] = len(set(degraded))
            _line("hybrid (retrieve + fusion)", case, hyb[case])
        hyb["knn_alone"] = measure(lambda i: len(backend.knn(qvecs[i], None, TOP_K)), nq, sizes.warmup, sizes.cap_s)
        _line("kNN alone", "none", hyb["knn_alone"])
        filter_cache = getattr(backend, "_filter_cache", None)
        if filter_cache is not None:  # what a filter not seen at this store generation costs
            flt = filters["price+in_stock"]

            def knn_uncached(i: int) -> int:
                filter_cache.clear()
                return len(backend.knn(qvecs[i], flt, TOP_K))

            hyb["knn_filter_uncached"] = measure(knn_uncached, nq, sizes.warmup, sizes.cap_s)
            _line("kNN, filter pks not cached", "price+in_stock", hyb["knn_filter_uncached"])
        executor.shutdown(wait=True)
        backend.close()
        results["hybrid"] = hyb

        # the legacy FTS5 engine ("before"), same products and tokens, scratch database
        t0 = time.perf_counter()
        legacy = LegacyFts5Store(tmpdir / "legacy.sqlite3")
        legacy.load(products, docs)
        leg: dict[str, Any] = {"engine": "Fts5LexicalIndex (frozen copy)", "load_s": round(time.perf_counter() - t0, 1)}
        leg["disk_bytes"] = legacy.size_bytes()
        for case, flt in filters.items():
            leg[case] = measure(
                lambda i, flt=flt: len(legacy.bm25(queries[i], flt, TOP_K)), nq, sizes.warmup, sizes.cap_s
            )
            _line("legacy FTS5", case, leg[case])
        legacy.close()
        engines["legacy FTS5 (before)"] = leg

        # query analysis alone (included in the two rows above, excluded from the peers below)
        engines["query analysis alone"] = {
            "none": measure(lambda i: len(_query_tokens(queries[i])), nq, 0, sizes.cap_s)
        }
        # what the pipeline does before BM25 and not counted above: typo corrections (fuzzy term lookups)
        with EmbeddedBackend(store_path) as typo_backend:
            expander = QueryExpander(typo_backend)
            engines["typo expansion alone"] = {
                "none": measure(
                    lambda i: len(expander.expand(queries[i])) - len(queries[i]), nq, sizes.warmup, sizes.cap_s
                )
            }
            # a search box's suggestions as the shopper types: the first 1, 2 or 3 characters of each query
            engines["suggestions (prefix terms)"] = {
                "none": measure(
                    lambda i: len(typo_backend.prefix_terms(queries[i].strip()[: 1 + i % 3], 10)),
                    nq,
                    sizes.warmup,
                    sizes.cap_s,
                )
            }
        _line("typo expansion alone", "none", engines["typo expansion alone"]["none"])
        _line("suggestions (prefix terms)", "none", engines["suggestions (prefix terms)"]["none"])

        engines["bm25s same tokens"] = peer_bm25s(tokens, qtokens, sizes)
        # bm25s as `bm25s.BM25()` comes: context for the ratio, which moves with the peer's backend
        engines["bm25s same tokens, default numpy backend"] = peer_bm25s(tokens, qtokens, sizes, backend="numpy")
        engines["tantivy same tokens"] = peer_tantivy(tokens, qtokens, sizes)
        del products, docs, tokens, rows
        results["engines"] = engines

    # 3. the large catalog: the embedded engine only (cached store, no vectors)
    gc.collect()
    large_path, large_build = cached_store("bm25", sizes.large, titles, synth, vectors=False)
    large_memory = store_memory(large_path, queries, sizes.warmup)
    backend = EmbeddedBackend(large_path)
    large: dict[str, Any] = {
        "engine": engine_name(backend),
        "store": large_build,
        "disk": disk_usage(large_path),
        "lexical_segments": lexical_segments(backend),
    }
    for case, flt in filters.items():
        large[case] = measure(
            lambda i, flt=flt: len(backend.bm25(queries[i], flt, TOP_K)), nq, sizes.warmup, sizes.large_cap_s
        )
        _line(f"shopsearch embedded @ {sizes.large:,}", case, large[case])
    large["memory"] = large_memory
    large["products"] = backend.count()
    backend.close()
    results["large"] = large

    results["targets"] = targets(results, sizes)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["load_average_at_end"] = list(os.getloadavg())
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path = write_json(output_dir, "lexical", results)
    report = speed_section(results)
    print(report)
    write_section(output_dir / "LEXICAL.md", report)
    print(f"wrote {path} and {output_dir / 'LEXICAL.md'}")
    return results


# ---------------------------------------------------------------------------------------- report


def _line(engine: str, case: str, m: dict[str, Any]) -> None:
    capped = f" (capped: {m['n']} of {m['of']})" if m["capped"] else ""
    print(
        f"  {engine:<34} {case:<15} p50 {m['p50_ms']:8.3f}  p95 {m['p95_ms']:8.3f}  p99 {m['p99_ms']:8.3f} ms"
        f"  hits {m['mean_hits']:6.1f}{capped}",
        flush=True,
    )


def targets(results: dict[str, Any], sizes: Sizes) -> list[dict[str, Any]]:
    emb = results["engines"]["shopsearch embedded"]
    b25 = results["engines"]["bm25s same tokens"]["none"]
    worst_filtered = max(emb["price+in_stock"]["p99_ms"], emb["brand"]["p99_ms"])
    ratio = emb["none"]["p99_ms"] / b25["p99_ms"] if b25["p99_ms"] > 0 else float("inf")
    p50_ratio = emb["none"]["p50_ms"] / b25["p50_ms"] if b25["p50_ms"] > 0 else float("inf")
    alone = results["engines"].get("embedded: query + search, no row fetch", {}).get("none")
    peer = results["engines"].get("tantivy same tokens", {}).get("none")
    floor = "".join(
        f"; {label} p99 {m['p99_ms']:.2f} ms = {m['p99_ms'] / b25['p99_ms']:.2f}x"
        for label, m in (
            ("engine alone", alone),
            ("row read alone", results["engines"].get("embedded: row read alone", {}).get("none")),
            ("tantivy on the same tokens, one field", peer),
        )
        if m and b25["p99_ms"] > 0
    )
    default = results["engines"].get("bm25s same tokens, default numpy backend", {}).get("none")
    if default and default["p99_ms"] > 0:
        floor += (
            f"; against bm25s's default numpy backend (p99 {default['p99_ms']:.2f} ms): "
            f"{emb['none']['p99_ms'] / default['p99_ms']:.2f}x"
        )
    large_worst = max(results["large"][c]["p99_ms"] for c in ("none", "price+in_stock", "brand"))
    hybrid_worst = max(results["hybrid"][c]["p99_ms"] for c in ("none", "price+in_stock"))
    n, big = f"{sizes.catalog:,}", f"{sizes.large:,}"
    idx = results["index"]
    return [
        {
            "target": f"BM25 top-{TOP_K} with filters, p99 <= {TARGET_FILTERED_P99_MS} ms @ {n}",
            "measured": f"{worst_filtered:.2f} ms (worst of price+in_stock, brand)",
            "pass": worst_filtered <= TARGET_FILTERED_P99_MS,
        },
        {
            "target": f"unfiltered p99 <= {TARGET_VS_BM25S}x bm25s same tokens @ {n}",
            "measured": f"{ratio:.2f}x (p99 {emb['none']['p99_ms']:.2f} vs {b25['p99_ms']:.2f} ms; p50 "
            f"{emb['none']['p50_ms']:.2f} vs {b25['p50_ms']:.2f} ms = {p50_ratio:.2f}x; filtered p99 "
            f"{emb['price+in_stock']['p99_ms']:.2f} / {emb['brand']['p99_ms']:.2f} ms{floor})",
            "pass": ratio <= TARGET_VS_BM25S,
        },
        {
            "target": f"BM25 p99 <= {TARGET_LARGE_P99_MS} ms @ {big}",
            "measured": f"{large_worst:.2f} ms (worst of unfiltered, price+in_stock, brand)",
            "pass": large_worst <= TARGET_LARGE_P99_MS,
        },
        {
            "target": f"hybrid (retrieve + fusion) p99 <= {TARGET_HYBRID_P99_MS} ms @ {n}",
            "measured": f"{hybrid_worst:.2f} ms (worst of unfiltered, price+in_stock)",
            "pass": hybrid_worst <= TARGET_HYBRID_P99_MS,
        },
        {
            "target": f"indexing, no embedder, >= {TARGET_INDEX_DOCS_PER_S:,} docs/s @ {n}",
            "measured": f"{idx['docs_per_s']:,.0f} docs/s",
            "pass": bool(idx["pass"]),
        },
    ]


def _segments_text(searched: Any, merge: dict[str, Any] | None) -> str:
    """How many lexical segments a store had, and what force_merge made of them."""
    if not merge:
        return f"{searched} segment(s)"
    return f"{merge['segments_before']} segment(s), merged to {merge['segments_after']} in {merge['seconds']} s"


def _memory_text(m: dict[str, Any]) -> str:
    if "error" in m:
        return "not measured (the measuring process failed)"
    warm = m.get("rss_warm_delta_mb")
    if warm is None or warm < 0:  # measured in the benchmark's own process, which freed memory meanwhile
        return "not readable (RSS fell while it was open: earlier steps' memory was freed)"
    opened = f"{m['rss_open_delta_mb']} MiB, then " if "rss_open_delta_mb" in m else ""
    where = f" ({m['measured_in']})" if "measured_in" in m else ""
    mapped = (
        f"; mapped file pages {m['file_pages_open_delta_mb']} MiB, then {m['file_pages_warm_delta_mb']} MiB"
        if "file_pages_warm_delta_mb" in m
        else ""
    )
    return f"private {opened}{warm} MiB after {m.get('warmup_queries', '?')} queries{mapped}{where}"


def _load_at_start(results: dict[str, Any]) -> str:
    start = results["machine"].get("load_average_at_start")
    return f" at the start {', '.join(f'{x:.1f}' for x in start)}," if start else ""


def _mb(b: int) -> float:
    return round(b / 2**20, 1)


def speed_section(results: dict[str, Any]) -> str:
    sizes = Sizes(**results["sizes"])
    data = results["data"]
    eng = results["engines"]
    rows = []
    for name, e in eng.items():
        for case in ("none", "price+in_stock", "brand"):
            if case in e:
                m = e[case]
                rows.append([name, case, m["p50_ms"], m["p95_ms"], m["p99_ms"], m["mean_hits"], f"{m['n']}/{m['of']}"])
    for case in ("none", "price+in_stock"):
        m = results["hybrid"][case]
        rows.append(
            [
                "hybrid: retrieve + fusion",
                case,
                m["p50_ms"],
                m["p95_ms"],
                m["p99_ms"],
                m["mean_hits"],
                f"{m['n']}/{m['of']}",
            ]
        )
    m = results["hybrid"]["knn_alone"]
    rows.append(["kNN alone", "none", m["p50_ms"], m["p95_ms"], m["p99_ms"], m["mean_hits"], f"{m['n']}/{m['of']}"])
    if "knn_filter_uncached" in results["hybrid"]:
        m = results["hybrid"]["knn_filter_uncached"]
        rows.append(
            [
                "kNN, filter pks not cached",
                "price+in_stock",
                m["p50_ms"],
                m["p95_ms"],
                m["p99_ms"],
                m["mean_hits"],
                f"{m['n']}/{m['of']}",
            ]
        )
    large = results["large"]
    large_rows = [
        [
            f"shopsearch embedded ({large['engine']})",
            c,
            large[c]["p50_ms"],
            large[c]["p95_ms"],
            large[c]["p99_ms"],
            large[c]["mean_hits"],
            f"{large[c]['n']}/{large[c]['of']}",
        ]
        for c in ("none", "price+in_stock", "brand")
    ]
    head = ["engine", "filters", "p50 ms", "p95 ms", "p99 ms", "mean hits", "timed/queries"]
    idx, mem = results["index"], results["memory"]
    emb = eng["shopsearch embedded"]
    per_set = ", ".join(f"{k} {v:,}" for k, v in data["real_titles"].items())
    built = "read from the cache" if large["store"]["cached"] else "this run"
    lines = [
        "## Speed",
        "",
        f"Written by `python -m benchmarks --only lexical{' --quick' if results['quick'] else ''}` "
        f"({results['finished_at']}); figures from one run on "
        f"{results['machine']['cpu_model']}, {results['machine']['usable_cores']} usable cores, shared with other work "
        f"(load average{_load_at_start(results)} at the end "
        f"{', '.join(f'{x:.1f}' for x in results['load_average_at_end'])}).",
        "",
        f"Data: {data['real_titles_total']:,} real titles ({per_set}); "
        f"{data['missing']}, so the catalog is those titles plus synthetic ones drawn from their vocabulary up to "
        f"{sizes.catalog:,} ({100 * data['catalog_real_share']:.0f}% real). {data['queries']} real queries "
        f"({sizes.queries_per_set} sampled per dataset, seeded). BM25 top {results['top_k']}, one query at a time, "
        f"in-process. Filters: `price+in_stock` = price 20–300 and in stock; `brand` = {data['brand_filter']}. "
        f"shopsearch rows include query analysis (jieba); the bm25s and tantivy rows use precomputed query tokens "
        f"(the analysis alone is its own row). Same tokens: {data['doc_tokens']}, no field boosts.",
        "",
        f"Embedded engine: `{emb['engine']}`. The figures this benchmark reproduces, as first reported (79,734 titles "
        "including the third set, 600 queries, top 100, 2 cores): SQLite FTS5 p50 44.7 / p95 181.5 / p99 306.3 ms, "
        "bm25s same tokens 0.6 / 1.0 / 1.4 ms, tantivy 0.27 same tokens 0.46 / 1.24 / 1.60 ms.",
        "",
        f"### {sizes.catalog:,} products",
        "",
        markdown_table(head, rows),
        "",
        f"### {sizes.large:,} products",
        "",
        markdown_table(head, large_rows),
        "",
        "### Targets",
        "",
        markdown_table(
            ["target", "measured", "pass"],
            [[t["target"], t["measured"], "pass" if t["pass"] else "FAIL"] for t in results["targets"]],
        ),
        "",
        "### Reading these figures",
        "",
        f"- bm25s scores with its {eng['bm25s same tokens'].get('backend', _bm25s_backend())} backend: every "
        "query token's postings are added into a dense score array, so frequent tokens (CJK unigrams, present in "
        "much of the catalog) cost in proportion to their postings. The target's peer is that backend, the "
        "fastest bm25s has; the `default numpy backend` row is bm25s as `bm25s.BM25()` comes, on the same "
        "index and tokens, for context: the ratio depends on which bm25s is the peer.",
        "- `typo expansion alone` is `QueryExpander.expand` (the pipeline's step before BM25, typo tolerance on): "
        "a fuzzy term lookup per Latin word of 5+ letters that no title word equals; its `mean hits` is the "
        "characters it adds. It is not in the `shopsearch embedded` rows.",
        "- `suggestions (prefix terms)` is `prefix_terms(prefix, 10)` on the first 1, 2 or 3 characters of each "
        "query (a search box's suggestions as the shopper types); a one-character prefix's term list is kept "
        "until the next commit, so after the warm-up those read a kept list.",
        "- `embedded: query + search, no row fetch` times the tantivy engine's query building and search alone; "
        "the `shopsearch embedded` rows add reading the top rows from SQLite and parsing them into `Product`s, "
        "which `embedded: row read alone` times by itself (the same reads of each query's unfiltered top rows).",
        f"- hybrid queries with a stage past the pipeline's deadline ({results['hybrid']['deadline_ms']} ms, "
        "counted degraded): "
        + ", ".join(f"{c} {results['hybrid'][c].get('degraded_queries', 0)}" for c in ("none", "price+in_stock"))
        + "; `kNN alone` is the unfiltered vector search by itself.",
        "- the embedded kNN keeps the pks (and faiss selector) of recent filters per store generation, so the "
        "filtered hybrid row, one filter repeated, reads them from that cache after its first query; "
        "`kNN, filter pks not cached` clears the cache before every query (a filter first seen since the last "
        "write). BM25 applies a broad price/stock filter after a pruned unfiltered search when that provably "
        "gives the same top 100, else inside the query.",
        "- every row is timed with the garbage collector set up as the service sets it once loaded "
        f"(`middleware.server.heap.settle`: start-up objects frozen, young-generation threshold "
        f"{results.get('gc_young_threshold', '?')}), after its untimed warm-up queries.",
        "- a row marked n/600 was stopped at its time cap after n queries; its percentiles are over those n.",
        "- build times of the cached stores are not indexing figures (they include resumed and contended builds); "
        "the indexing figure is the `Indexer` run below.",
        "- the cached stores are built as `shopsearch index --force-merge` leaves a store: a bulk load "
        "(`EmbeddedBackend.bulk_load`), then `force_merge`. Lexical segments: at "
        f"{sizes.catalog:,} "
        f"{_segments_text(emb.get('lexical_segments', '?'), emb.get('store', {}).get('force_merge'))}; "
        f"at {sizes.large:,} "
        f"{_segments_text(large.get('lexical_segments', '?'), large.get('store', {}).get('force_merge'))}; "
        f"the indexing run's store {_segments_text(idx.get('lexical_segments', '?'), idx.get('force_merge'))}, "
        "timed both as loaded and merged. "
        "Each segment is scored on its own, so a store grown by many small commits (up to 7 segments per size "
        "class before tantivy merges them) searches slower until it is merged.",
        "",
        *[f"- {note}" for note in results.get("notes", [])],
        "",
        "### Indexing, memory, disk",
        "",
        f"- indexing (`Indexer` with no embedder, JSONL → fresh store): {idx['products']:,} products in "
        f"{idx['wall_s']} s = {idx['docs_per_s']:,.0f} docs/s"
        + (
            f"; `force_merge` after it: {idx['force_merge']['seconds']} s "
            f"({idx['docs_per_s_with_force_merge']:,.0f} docs/s with it). BM25 top {TOP_K} (with rows) on "
            f"that store as loaded, p50 / p99: {idx['bm25_as_loaded']['p50_ms']} / "
            f"{idx['bm25_as_loaded']['p99_ms']} ms ({idx['force_merge']['segments_before']} segments); merged: "
            f"{idx['bm25_merged']['p50_ms']} / {idx['bm25_merged']['p99_ms']} ms "
            f"({idx['force_merge']['segments_after']})."
            + (
                f" One-product signal writes during the merge (one per 50 ms, as a serving process makes "
                f"them): {idx['force_merge']['writes_during']}, p50 {idx['force_merge']['write_ms_p50']} ms, "
                f"max {idx['force_merge']['write_ms_max']} ms."
                if idx["force_merge"].get("writes_during")
                else ""
            )
            if idx.get("force_merge")
            else "."
        ),
        f"- disk per {sizes.catalog:,} products, no vectors: {_mb(idx['disk']['total'])} MiB "
        f"({', '.join(f'{k} {_mb(v)}' for k, v in idx['disk'].items() if k != 'total')}); "
        f"with {DIM}-d vectors: {_mb(emb['disk']['total'])} MiB "
        f"({', '.join(f'{k} {_mb(v)}' for k, v in emb['disk'].items() if k != 'total')}); "
        f"legacy FTS5 scratch db: {_mb(eng['legacy FTS5 (before)']['disk_bytes'])} MiB.",
        f"- memory (RSS added by opening the store, then after warm-up queries; private memory apart from the "
        f"mapped file pages, which are the OS page cache): {sizes.catalog:,} products without "
        f"vectors {_memory_text(mem)}; {large['products']:,} products "
        f"{_memory_text(large.get('memory', {'rss_warm_delta_mb': large.get('rss_warm_delta_mb')}))}.",
        f"- {sizes.large:,}-product store: {_mb(large['disk']['total'])} MiB on disk; built in "
        f"{large['store']['build_s']} s ({built}).",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace this file's "## Speed" section (or add it), leaving every other section as it is."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Lexical engine\n\n"
    pattern = re.compile(r"^## Speed\n.*?(?=^## (?!#)|\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip() + "\n\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n", encoding="utf-8")


if __name__ == "__main__":
    import sys

    run(
        "--quick" in sys.argv,
        Path(__file__).resolve().parent / ("results/quick" if "--quick" in sys.argv else "results"),
    )
