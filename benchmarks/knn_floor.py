"""Calibrate the kNN match floor of one embedder on judged product-search data (homedepot, English).

For a sample of judged queries it embeds the whole corpus, takes each query's best cosine similarity,
and records where the relevant products (score >= 2.5) and the judged-irrelevant ones (score < 2) fall
relative to it, plus the best similarity that gibberish queries reach. Prints the figures and writes
benchmarks/results/knn_floor.json.

    python -m benchmarks.knn_floor [--queries 600] [--embedder sentence-transformers/all-MiniLM-L6-v2]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DATA_DIR, REPO_ROOT, machine_info, write_json

GIBBERISH = [
    "xyzzyqwerty",
    "qzxvbn",
    "asdfghjkl",
    "zxqv wplk",
    "blorptang",
    "kkkkkkk",
    "qwfpgjluy",
    "mnbvcxzlkj",
    "xqzt vrrp",
    "plugh xyzzy",
    "zzzzqqq",
    "wqrtyp",
    "jjxkq",
    "vbnmzx",
    "ffffgh",
    "ghjqzk",
]


def _quantiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(arr, q)), 4) for q in (1, 2, 5, 10, 25, 50)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA_DIR / "homedepot")
    p.add_argument("--embedder", default="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--queries", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = p.parse_args()

    from middleware.models import Embedder

    corpus = [json.loads(line) for line in (args.data / "corpus.jsonl").open(encoding="utf-8")]
    queries = {q["_id"]: q["text"] for q in map(json.loads, (args.data / "queries.jsonl").open(encoding="utf-8"))}
    judged: dict[str, dict[str, float]] = {}
    with (args.data / "qrels-train.tsv").open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            judged.setdefault(row["query-id"], {})[row["corpus-id"]] = float(row["score"])
    eligible = sorted(q for q, docs in judged.items() if q in queries and any(s >= 2.5 for s in docs.values()))
    sample = random.Random(args.seed).sample(eligible, min(args.queries, len(eligible)))

    embedder = Embedder(args.embedder)
    t = time.perf_counter()
    docs = embedder.encode_documents([(d.get("title") or d.get("text") or " ")[:512] for d in corpus])
    embed_s = time.perf_counter() - t
    index = {d["_id"]: i for i, d in enumerate(corpus)}
    qvecs = embedder.encode_queries([queries[q] for q in sample])
    sims = qvecs @ docs.T  # normalised vectors: cosine

    relevant, irrelevant, best, top100_ratio = [], [], [], []
    for row, qid in zip(sims, sample, strict=True):
        top = float(row.max())
        best.append(top)
        order = np.sort(row)[::-1][:100]
        top100_ratio.append(float(order[-1] / top))
        for doc_id, score in judged[qid].items():
            if doc_id in index:
                ratio = float(row[index[doc_id]] / top)
                (relevant if score >= 2.5 else irrelevant if score < 2.0 else []).append(ratio)
    gib = embedder.encode_queries(GIBBERISH) @ docs.T
    gib_best = [float(r.max()) for r in gib]

    # the relative floor: 2% of relevant products fall below it; the absolute one: above every gibberish best
    relative = round(float(np.percentile(relevant, 2)), 2)
    absolute = round(max(gib_best) + 0.02, 2)
    share_best_below_abs = float(np.mean(np.asarray(best) < absolute))
    payload = {
        "benchmark": "knn_floor",
        "note": "a real pretrained embedder on real judged queries: the figures measure it (no random weights)",
        "embedder": args.embedder,
        "data": str(args.data.name),
        "queries": len(sample),
        "corpus": len(corpus),
        "embed_corpus_s": round(embed_s, 1),
        "relevant_ratio": _quantiles(relevant),
        "relevant_n": len(relevant),
        "irrelevant_ratio": _quantiles(irrelevant),
        "irrelevant_n": len(irrelevant),
        "irrelevant_below_relative_floor": round(float(np.mean(np.asarray(irrelevant) < relative)), 4),
        "best_similarity": _quantiles(best),
        "top100_last_ratio": _quantiles(top100_ratio),
        "top100_hits_kept_by_relative_floor": round(float(np.mean(np.asarray(top100_ratio) >= relative)), 4),
        "gibberish_best_similarity": {"max": round(max(gib_best), 4), "median": round(float(np.median(gib_best)), 4)},
        "recommended": {"relative": relative, "absolute": absolute},
        "real_queries_with_best_below_absolute": round(share_best_below_abs, 4),
        "machine": machine_info(),
    }
    print(json.dumps({k: v for k, v in payload.items() if k != "machine"}, indent=2))
    write_json(args.output, "knn_floor", payload)


if __name__ == "__main__":
    main()
