"""Which lexical analysis wins on Chinese titles: jieba words, CJK uni+bigrams, or both combined.

Indexes the QBQTC titles into the embedded backend (no vectors), then for every query with at least
one relevant judgement (label >= 1) scores the whole corpus once per analysis with the backend's own
FTS5 bm25 (`EmbeddedBackend.bm25_analysis_scores`) and ranks it under each combination: raw weighted
sum, or each analysis scaled by its best match ("max") then summed. Reports nDCG@10 (graded gains
0/1/2), recall@10/100 and MRR@10, and checks that the backend's SQL path (`bm25`) returns the same
top-10 as the combination computed here.

    python -m benchmarks.analysis_qbqtc [--data ../shared/data/qbqtc] [--limit N] [--seed 0]

Prints a table and writes benchmarks/results/analysis_qbqtc.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import random
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from middleware.backends.embedded import EmbeddedBackend
from middleware.products import Product

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "qbqtc"
RESULTS = Path(__file__).resolve().parent / "results" / "analysis_qbqtc.json"

# (name, combine, words weight, cjk weight)
CONFIGS: list[tuple[str, str, float, float]] = [
    ("words", "sum", 1.0, 0.0),
    ("cjk", "sum", 0.0, 1.0),
    ("sum 1:0.25", "sum", 1.0, 0.25),
    ("sum 1:0.5", "sum", 1.0, 0.5),
    ("sum 1:1", "sum", 1.0, 1.0),
    ("sum 1:1.5", "sum", 1.0, 1.5),
    ("sum 1:2", "sum", 1.0, 2.0),
    ("sum 1:3", "sum", 1.0, 3.0),
    ("max 1:0.5", "max", 1.0, 0.5),
    ("max 1:1", "max", 1.0, 1.0),
    ("max 1:2", "max", 1.0, 2.0),
    ("max 1:3", "max", 1.0, 3.0),
]


def load(data: Path) -> tuple[list[dict[str, str]], dict[str, str], dict[str, dict[str, int]]]:
    with open(data / "corpus.jsonl", encoding="utf-8") as f:
        corpus = [json.loads(line) for line in f if line.strip()]
    with open(data / "queries.jsonl", encoding="utf-8") as f:
        queries = {q["_id"]: q["text"] for q in map(json.loads, f) if q}
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with open(data / "qrels-test.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels[row["query-id"]][row["corpus-id"]] = int(row["score"])
    return corpus, queries, qrels


def metrics(ranked: list[str], judged: dict[str, int]) -> tuple[float, float, float, float]:
    """nDCG@10 (linear gain, as trec_eval), recall@10, recall@100, MRR@10 (relevant: label >= 1)."""
    relevant = {d for d, g in judged.items() if g >= 1}
    dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(judged.values(), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    mrr = next((1.0 / (i + 1) for i, d in enumerate(ranked[:10]) if d in relevant), 0.0)
    r10 = len(relevant & set(ranked[:10])) / len(relevant)
    r100 = len(relevant & set(ranked[:100])) / len(relevant)
    return dcg / idcg if idcg else 0.0, r10, r100, mrr


class QueryScores:
    """One query's per-analysis scores over the union of matches, as arrays (ranked per config)."""

    def __init__(self, words: dict[str, float], cjk: dict[str, float], pk: dict[str, int]) -> None:
        self.ids = list(words.keys() | cjk.keys())
        self.pks = np.array([pk[i] for i in self.ids], dtype=np.int64)
        self.in_words = np.array([i in words for i in self.ids], dtype=bool)
        self.in_cjk = np.array([i in cjk for i in self.ids], dtype=bool)
        self.words = np.array([words.get(i, 0.0) for i in self.ids])
        self.cjk = np.array([cjk.get(i, 0.0) for i in self.ids])

    def rank(self, combine: str, ww: float, wc: float, n: int = 100) -> list[str]:
        """Top n under one combination; ties by rowid, as the backend orders them."""
        if not self.ids:
            return []
        words, cjk = self.words, self.cjk
        if combine == "max":
            words = words / words.max() if self.in_words.any() else words
            cjk = cjk / cjk.max() if self.in_cjk.any() else cjk
        score = ww * words + wc * cjk
        matched = (self.in_words if ww else False) | (self.in_cjk if wc else False)
        idx = np.flatnonzero(matched)
        order = idx[np.lexsort((self.pks[idx], -score[idx]))][:n]
        return [self.ids[i] for i in order]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=0, help="seeded subsample of queries (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", type=int, default=300, help="queries to cross-check against bm25()")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (args.data / "corpus.jsonl").is_file():
        print(f"error: no BEIR corpus.jsonl in {args.data}", file=sys.stderr)
        return 2

    corpus, queries, qrels = load(args.data)
    evaluated = sorted(q for q, judged in qrels.items() if q in queries and max(judged.values()) >= 1)
    if args.limit and args.limit < len(evaluated):
        evaluated = sorted(random.Random(args.seed).sample(evaluated, args.limit))
    print(f"corpus {len(corpus)} titles, {len(evaluated)} queries with a relevant judgement", flush=True)

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBackend(tmp, durable=False) as backend:
        t0 = time.perf_counter()
        products = [Product(id=d["_id"], title=d["title"] or d.get("text") or "-") for d in corpus]
        for start in range(0, len(products), 2000):
            backend.upsert(products[start : start + 2000], None)
        index_s = time.perf_counter() - t0
        pk = {p.id: i for i, p in enumerate(products)}  # fresh store: rowids follow insertion order
        print(f"indexed in {index_s:.1f} s ({backend.stats().size_bytes / 1e6:.1f} MB)", flush=True)

        sums = {name: np.zeros(4) for name, *_ in CONFIGS}
        t0 = time.perf_counter()
        for n, qid in enumerate(evaluated, start=1):
            scores = QueryScores(**backend.bm25_analysis_scores(queries[qid]), pk=pk)
            for name, combine, ww, wc in CONFIGS:
                sums[name] += metrics(scores.rank(combine, ww, wc), qrels[qid])
            if n % 2000 == 0:
                print(f"  {n}/{len(evaluated)} queries, {time.perf_counter() - t0:.0f} s", flush=True)
        eval_s = time.perf_counter() - t0

        results = {name: dict(zip(("ndcg@10", "recall@10", "recall@100", "mrr@10"), (s / len(evaluated)).tolist(),
                                  strict=True)) for name, s in sums.items()}  # fmt: skip
        best = max(CONFIGS, key=lambda c: results[c[0]]["ndcg@10"])

        # the SQL path must rank as the computation above, and its latency is worth knowing
        check = random.Random(args.seed + 1).sample(evaluated, min(args.check, len(evaluated)))
        backend.lexical.combine, backend.lexical.words_weight, backend.lexical.cjk_weight = best[1], best[2], best[3]
        agree, latencies = 0, []
        for qid in check:
            t = time.perf_counter()
            sql_top = [c.id for c in backend.bm25(queries[qid], None, 10)]
            latencies.append(time.perf_counter() - t)
            scores = QueryScores(**backend.bm25_analysis_scores(queries[qid]), pk=pk)
            agree += sql_top == scores.rank(*best[1:], n=10)

    print(f"\n{'analysis':<12} {'nDCG@10':>8} {'R@10':>7} {'R@100':>7} {'MRR@10':>7}")
    for name, *_ in CONFIGS:
        r = results[name]
        mark = "  <- best" if name == best[0] else ""
        print(f"{name:<12} {r['ndcg@10']:8.4f} {r['recall@10']:7.4f} {r['recall@100']:7.4f} {r['mrr@10']:7.4f}{mark}")
    p50, p95 = np.percentile(latencies, [50, 95]) * 1000
    print(f"\nbm25() top-10 equals the computed combination on {agree}/{len(check)} queries;"
          f" bm25() latency p50 {p50:.1f} ms, p95 {p95:.1f} ms; evaluation took {eval_s:.0f} s")  # fmt: skip

    report: dict[str, Any] = {
        "dataset": str(args.data),
        "corpus_size": len(corpus),
        "queries_evaluated": len(evaluated),
        "subsample": {"limit": args.limit, "seed": args.seed} if args.limit else None,
        "relevance": "label >= 1 relevant; nDCG uses graded gains 0/1/2 (linear)",
        "bm25": "SQLite FTS5 bm25(), k1=1.2 b=0.75, titles only",
        "sqlite": sqlite3.sqlite_version,
        "python": platform.python_version(),
        "configs": {name: {"combine": c, "words_weight": ww, "cjk_weight": wc} for name, c, ww, wc in CONFIGS},
        "results": results,
        "best": best[0],
        "sql_path_agreement": {"queries": len(check), "identical_top10": agree},
        "bm25_latency_ms": {"p50": round(float(p50), 2), "p95": round(float(p95), 2)},
        "index_seconds": round(index_s, 1),
        "evaluation_seconds": round(eval_s, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
