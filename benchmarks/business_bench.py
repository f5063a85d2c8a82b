"""What business scoring costs in relevance when the signals have nothing to do with it.

The BEIR corpora carry no sales or stock, so with business on they only show that flat signals leave
the order alone (`shopsearch eval`, modes `hybrid-rrf+business`). Here the judged products of a seeded
sample of queries get seeded synthetic signals (log-normal sales, a share out of stock) that are
independent of relevance, and nDCG@10 is measured three ways over the same BM25 retrieval:

- off: business scoring disabled (the relevance order);
- relevance-first: the product's business score (`middleware/business.py`);
- linear (previous design, for reference): fused/best + 0.1·log1p(sales)/log1p(max) + 0.05·in_stock.

Signals unrelated to relevance can only lower nDCG; the smaller the drop, the more relevance leads.
Also counted: how often an out-of-stock product is in the top 3.

    python -m benchmarks.business_bench ../shared/data/homedepot --split train --max-queries 300 \\
        --relevant-min 2.5 --gain score-1 --output benchmarks/results/business.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from middleware.backends.embedded import EmbeddedBackend
from middleware.config import Settings
from middleware.evaluation.data import load_beir, sample_queries
from middleware.evaluation.metrics import evaluable_queries, ndcg_at_k
from middleware.evaluation.pools import build_pool
from middleware.pipeline import Pipeline
from middleware.schema import Hit, SearchRequest

DEPTH = 100


def linear_order(hits: list[Hit]) -> list[str]:
    """The previous design's order over the same candidates (from their explained scores)."""
    best = max((h.explain.fused or 0.0) for h in hits) or 1.0
    top = max(h.product.get("sales") or 0 for h in hits)
    scale = math.log1p(top) if top > 0 else 1.0

    def final(h: Hit) -> float:
        sales = h.product.get("sales") or 0
        stock = h.product.get("stock")
        in_stock = stock is None or stock > 0
        return (h.explain.fused or 0.0) / best + 0.1 * math.log1p(sales) / scale + (0.05 if in_stock else 0.0)

    order = {h.id: i for i, h in enumerate(hits)}
    return [h.id for h in sorted(hits, key=lambda h: (-final(h), order[h.id]))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--split", default=None)
    ap.add_argument("--max-queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--relevant-min", type=float, default=1.0)
    ap.add_argument("--gain", default="score")
    ap.add_argument("--out-of-stock-share", type=float, default=0.1)
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args(argv)

    ds = load_beir(args.dataset, args.split)
    kept, _ = evaluable_queries(list(ds.qrels), ds.qrels, args.relevant_min)
    query_ids = sample_queries(kept, args.max_queries, args.seed)
    pool = build_pool("test", ds.corpus, ds.qrels, query_ids)
    rng = random.Random(args.seed)
    products = []
    for doc_id in pool.doc_ids:
        p = ds.corpus[doc_id].to_product()
        sales = int(rng.lognormvariate(4.0, 2.0))  # median ~55, a long tail of best-sellers
        stock = 0 if rng.random() < args.out_of_stock_share else rng.randint(1, 500)
        products.append(p.model_copy(update={"sales": sales, "stock": stock}))

    runs: dict[str, list[float]] = {"off": [], "relevance-first": [], "linear (previous)": []}
    oos_top3: dict[str, int] = dict.fromkeys(runs, 0)
    reordered: dict[str, int] = dict.fromkeys(runs, 0)  # queries whose top 10 differs from "off"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        backend = EmbeddedBackend(tmp)
        backend.upsert(products, None)
        settings = Settings(embedder="none", reranker="none", deadline_ms=10_000)
        pipeline = Pipeline(settings, backend)
        stock_of = {p.id: p.stock for p in products}
        try:
            for qid in query_ids:
                req = SearchRequest(query=ds.queries[qid], size=DEPTH, retrieve_n=DEPTH, explain=True)
                off = pipeline.search(req.model_copy(update={"business_enabled": False})).hits
                on = pipeline.search(req).hits
                rankings = {
                    "off": [h.id for h in off],
                    "relevance-first": [h.id for h in on],
                    "linear (previous)": linear_order(off) if off else [],
                }
                for name, ranking in rankings.items():
                    runs[name].append(ndcg_at_k(ranking, ds.qrels[qid], 10, args.gain))
                    oos_top3[name] += sum(1 for i in ranking[:3] if stock_of[i] == 0)
                    reordered[name] += ranking[:10] != rankings["off"][:10]
        finally:
            pipeline.close()
    elapsed = time.perf_counter() - started

    n = len(query_ids)
    result: dict[str, Any] = {
        "dataset": ds.name,
        "split": ds.split,
        "queries": n,
        "pool_documents": len(pool),
        "retrieval": "bm25 (embedded store), top 100, no reranker",
        "signals": f"seeded: sales ~ lognormal(4, 2), {args.out_of_stock_share:.0%} out of stock, not from relevance",
        "gain": args.gain,
        "relevant_min": args.relevant_min,
        "seed": args.seed,
        "ndcg@10": {name: round(statistics.fmean(v), 4) for name, v in runs.items()},
        "ndcg@10_change_vs_off": {
            name: round(statistics.fmean(v) - statistics.fmean(runs["off"]), 4) for name, v in runs.items()
        },
        "queries_with_top10_reordered": reordered,
        "out_of_stock_in_top3_per_query": {name: round(c / n, 3) for name, c in oos_top3.items()},
        "seconds": round(elapsed, 1),
    }
    print(json.dumps(result, indent=1, ensure_ascii=False))
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
