"""Storefront latency on an embedded store: autocomplete (/v1/suggest's work) and facet counts.

`python -m benchmarks --only storefront [--quick]`, or on its own:
`python -m benchmarks.storefront_bench [--products 100000] [--store DIR] [--quick] [--output DIR]`

Builds (or reuses: --store, else a store cached under ~/.cache/shopsearch/bench-storefront, or
SHOPSEARCH_BENCH_STOREFRONT_CACHE) an embedded store of synthetic products titled from the qbqtc corpus,
fills the popular-query count with qbqtc queries, then times:
- suggest: storefront.suggest for prefixes of 1-3 characters of real queries (size 8);
- facets: storefront.compute_facets (brand, category, price ranges, price stats; disjunctive, with a
  brand filter picked, so two backend calls) over the lexical matches of real queries plus 100 ids
  standing in for the vector hits.
Prints the figures and writes benchmarks/results/storefront.json. The target is p99 <= 10 ms for
suggest at 100k products. Wall time and the calling thread's CPU time are both recorded, with the load
average before and after: on a shared machine the wall-time tail is mostly waiting for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from middleware import storefront
from middleware.backends.base import MatchSet
from middleware.products import Filters, Product
from middleware.schema import FacetRequest

BRANDS = ["欧米茄", "卡西欧", "天梭", "华为", "小米", "苹果", "索尼", "耐克", "Maison Lune", "SWAROVSKI"]
CATEGORIES = ["手表", "礼盒", "女士", "男士", "耳机", "手机", "运动", "美妆", "箱包", "珠宝首饰", "数码", "家居"]
SYNTH_VERSION = 1  # bump when `products` changes: invalidates the cached stores
CACHE = Path(
    os.environ.get("SHOPSEARCH_BENCH_STOREFRONT_CACHE", Path.home() / ".cache" / "shopsearch" / "bench-storefront")
)
FACETS = [
    "brand",
    "category",
    FacetRequest(field="price", ranges=[(0, 100), (100, 500), (500, 2000), (2000, None)]),
    FacetRequest(field="price", stats=True),
]


def products(n: int, titles: list[str], seed: int = 0) -> list[Product]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        title = titles[i % len(titles)] if titles else " ".join(rng.choices(CATEGORIES, k=4))
        out.append(
            Product(
                id=f"sku-{i}",
                title=title[:200],
                description=" ".join(rng.choices(CATEGORIES, k=rng.randint(2, 8))),
                brand=rng.choice(BRANDS),
                category=rng.sample(CATEGORIES, k=rng.randint(1, 2)),
                price=round(rng.uniform(5, 5000), 2),
                sales=rng.randint(0, 100_000),
                stock=rng.randint(0, 50),
            )
        )
    return out


def percentiles(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1000.0
    return {
        "n": len(a),
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p95_ms": round(float(np.percentile(a, 95)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "max_ms": round(float(a.max()), 3),
        "mean_ms": round(float(a.mean()), 3),
    }


def _open_store(path: Path, n: int, titles: list[str]) -> tuple[Any, float | None]:
    """The store at `path`, built there unless it holds this version's n products (a store of another
    version or size is built afresh)."""
    from middleware.backends.embedded import EmbeddedBackend

    marker = path / "bench-storefront.json"
    want = {"products": n, "synth_version": SYNTH_VERSION, "titles": len(titles)}
    try:
        reusable = json.loads(marker.read_text()) == want
    except (OSError, ValueError):
        reusable = False
    if not reusable and path.exists() and any(path.iterdir()):
        shutil.rmtree(path)
    backend = EmbeddedBackend(path)
    if reusable and backend.count() == n:
        return backend, None
    started = time.perf_counter()
    catalog = products(n, titles)
    for i in range(0, n, 5000):
        backend.upsert(catalog[i : i + 5000], None)
    marker.write_text(json.dumps(want))
    return backend, time.perf_counter() - started


def run(quick: bool, output_dir: Path, *, n_products: int | None = None, store: Path | None = None) -> dict[str, Any]:
    n = n_products or (3000 if quick else 100_000)
    try:
        titles, queries = common.corpus_texts("qbqtc")
    except OSError:
        titles, queries = [], ["手表", "礼盒", "耳机", "手机", "运动鞋", "女士包"]
    rng = random.Random(1)
    load_before = os.getloadavg()
    if store is None and not quick:
        store = CACHE / str(n)
    with tempfile.TemporaryDirectory(prefix="storefront-bench-") as tmp:
        backend, build_s = _open_store(store or Path(tmp), n, titles)
        try:
            popular = storefront.PopularQueries(min_count=1)  # every recorded query offered: the most work
            for q in rng.sample(queries, min(len(queries), 20_000)):
                popular.record(q)
            prefixes = [q[: rng.randint(1, 3)] for q in rng.sample(queries, min(len(queries), 300 if quick else 2000))]
            for p in prefixes[:50]:  # warm caches and lazy loads
                storefront.suggest(backend, popular, p, 8)
            suggest_s, suggest_cpu, returned = [], [], []
            for p in prefixes:
                t, c = time.perf_counter(), time.thread_time()
                found = storefront.suggest(backend, popular, p, 8)
                suggest_s.append(time.perf_counter() - t)
                suggest_cpu.append(time.thread_time() - c)
                returned.append(len(found))

            plan = storefront.facet_plan(FACETS)
            ids = tuple(f"sku-{rng.randrange(n)}" for _ in range(100))
            facet_s, facet_cpu, matched = [], [], []
            facet_queries = rng.sample(queries, min(len(queries), 30 if quick else 200))
            for q in facet_queries[:5]:
                storefront.compute_facets(backend, MatchSet(q, Filters(brand=[BRANDS[0]]), ids), plan)
            for q in facet_queries:
                match = MatchSet(q, Filters(brand=[BRANDS[0]]), ids)
                t, c = time.perf_counter(), time.thread_time()
                storefront.compute_facets(backend, match, plan)
                facet_s.append(time.perf_counter() - t)
                facet_cpu.append(time.thread_time() - c)
                matched.append(backend.count_matches(MatchSet(q, None, ids)))
        finally:
            backend.close()
    result = {
        "products": n,
        "build_s": round(build_s, 1) if build_s is not None else None,
        "popular_queries": len(popular),
        "suggest": {
            **percentiles(suggest_s),
            "cpu": percentiles(suggest_cpu),
            "size": 8,
            "mean_returned": round(float(np.mean(returned)), 2),
        },
        "facets": {
            **percentiles(facet_s),
            "cpu": percentiles(facet_cpu),
            "specs": ["brand", "category", "price ranges (4)", "price stats"],
            "disjunctive_groups": 2,
            "match_set_p50": int(np.median(matched)),
            "match_set_max": int(max(matched)),
        },
        "target": {"suggest_p99_ms": 10.0, "met": percentiles(suggest_s)["p99_ms"] <= 10.0},
        "load_average_before": load_before,
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "machine": common.machine_info(),
    }
    common.write_json(output_dir, "storefront", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storefront_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=None, help="catalog size (default 100000; --quick 3000)")
    parser.add_argument("--store", type=Path, default=None, help="reuse or build the store here (default: a temp dir)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    output = args.output or (common.DEFAULT_RESULTS / "quick" if args.quick else common.DEFAULT_RESULTS)
    r = run(args.quick, output, n_products=args.products, store=args.store)
    s, f = r["suggest"], r["facets"]
    before, after = r["load_average_before"][0], r["load_average"][0]
    print(f"storefront at {r['products']} products (build {r['build_s']} s; load average {before:.1f} -> {after:.1f})")
    print(f"  suggest  p50 {s['p50_ms']} ms  p95 {s['p95_ms']} ms  p99 {s['p99_ms']} ms  max {s['max_ms']} ms"
          f"  ({s['n']} prefixes, target p99 <= 10 ms: {'met' if r['target']['met'] else 'NOT met'})")  # fmt: skip
    print(f"           this thread's CPU time: p50 {s['cpu']['p50_ms']} ms  p99 {s['cpu']['p99_ms']} ms")
    print(f"  facets   p50 {f['p50_ms']} ms  p95 {f['p95_ms']} ms  p99 {f['p99_ms']} ms  max {f['max_ms']} ms"
          f"  ({f['n']} queries; match set p50 {f['match_set_p50']}, max {f['match_set_max']})")  # fmt: skip
    print(f"           this thread's CPU time: p50 {f['cpu']['p50_ms']} ms  p99 {f['cpu']['p99_ms']} ms")
    print(f"  wrote {output / 'storefront.json'}")


if __name__ == "__main__":
    main()
