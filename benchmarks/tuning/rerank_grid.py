"""The reranker against hybrid on held-out queries, for each rerank_k: quality beside CPU cost.

    python -m benchmarks.tuning.rerank_grid PAIRS/beir --split dev --reranker RR \\
        --workdir /work/runs/tuning/work --ks 10,20,50 --max-queries 300 \\
        --output benchmarks/results/rerank_tuning.json

Per pool (global, test), each query's hybrid list is the product's own fusion of its captured BM25 and
kNN lists under the default fusion settings (`middleware.tuning.fusion`, as `shopsearch eval`'s
`hybrid-rrf`); the reranker (the product's `Reranker`, INT8 ONNX on CPU by default) scores the top
max(ks) once, and each rerank_k reorders its own top k as the pipeline's `rerank_head` does (score
descending, ties in fused order; the tail stays in fused order). Paired tests against hybrid per k.
CPU cost: process CPU ms and wall ms of one reranker call over the top k, timed per k on the first
`--latency-queries` queries (with `uptime` load beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from middleware.config import Settings
from middleware.evaluation.data import load_beir, sample_queries
from middleware.evaluation.metrics import evaluable_queries, evaluate_run
from middleware.evaluation.significance import compare
from middleware.models import load_reranker
from middleware.tuning import fusion as tuning

EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"


def _log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def reranked(ranking: list[str], scores: np.ndarray, k: int) -> list[str]:
    """`rerank_head`'s order: the top k by score (ties in fused order), then the rest as fused."""
    head = ranking[:k]
    order = sorted(range(len(head)), key=lambda i: (-float(scores[i]), i))
    return [head[i] for i in order] + ranking[k:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path)
    p.add_argument("--split", default="dev")
    p.add_argument("--reranker", required=True)
    p.add_argument("--precision", default="int8", choices=["fp32", "int8"])
    p.add_argument("--embedder", default=EMBEDDER)
    p.add_argument("--ks", default="10,20,50")
    p.add_argument("--pools", default="global,test")
    p.add_argument("--max-queries", type=int)
    p.add_argument("--latency-queries", type=int, default=30)
    p.add_argument("--gain", default="score-1")
    p.add_argument("--relevant-min", type=float, default=2.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: core count)")
    p.add_argument("--workdir", type=Path, default=Path("./eval-work"))
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    ks = sorted({int(x) for x in args.ks.split(",") if x})
    dataset = load_beir(args.data_dir, args.split)
    selected = sample_queries(dataset.judged_query_ids(), args.max_queries, args.seed)
    query_ids, skipped = evaluable_queries(selected, dataset.qrels, args.relevant_min)
    settings = Settings(reranker=args.reranker, reranker_precision=args.precision, embedder=args.embedder)
    if args.threads:
        settings = settings.model_copy(update={"threads": args.threads})
    reranker = load_reranker(settings)
    assert reranker is not None
    current = tuning.current_config(settings)
    text = {doc_id: doc.to_product().embedding_text() for doc_id, doc in dataset.corpus.items()}
    reranker.score("warm up", [text[next(iter(text))]] * 4)
    out: dict[str, Any] = {
        "command": "python -m benchmarks.tuning.rerank_grid " + " ".join(argv if argv is not None else sys.argv[1:]),
        "reranker": args.reranker,
        "precision": args.precision,
        "fusion": current.to_dict(),
        "queries": {"selected": len(selected), "evaluated": len(query_ids), "skipped_no_relevant": len(skipped)},
        "gain": args.gain,
        "relevant_min": args.relevant_min,
        "load_average_start": os.getloadavg(),
        "pools": {},
    }
    for pool in [x for x in args.pools.split(",") if x]:
        captured = tuning.capture_dataset(
            dataset, query_ids, embedder=args.embedder, workdir=args.workdir, pool=pool, log=_log
        )
        hybrid = {q: tuning.fuse_ranking(captured[q], current, 100) for q in query_ids}
        started = time.perf_counter()
        scores = {}
        for i, q in enumerate(query_ids):
            head = hybrid[q][: max(ks)]
            scores[q] = np.asarray(reranker.score(dataset.queries[q], [text[d] for d in head]), np.float32)
            if (i + 1) % 100 == 0:
                _log(f"{pool}: scored {i + 1}/{len(query_ids)} queries")
        score_s = time.perf_counter() - started
        runs = {
            "hybrid": hybrid,
            **{f"rerank@{k}": {q: reranked(hybrid[q], scores[q], k) for q in query_ids} for k in ks},
        }
        evals = {
            name: evaluate_run(run, dataset.qrels, query_ids, relevant_min=args.relevant_min, gain_mapping=args.gain)
            for name, run in runs.items()
        }
        cell: dict[str, Any] = {"scoring_s": round(score_s, 1), "modes": {}}
        for name, ev in evals.items():
            row = {m: round(float(v), 4) for m, v in ev.means.items() if m in ("ndcg@10", "mrr@10", "recall@10")}
            if name != "hybrid":
                test = compare(
                    "ndcg@10",
                    name,
                    ev.per_query["ndcg@10"],
                    "hybrid",
                    evals["hybrid"].per_query["ndcg@10"],
                    seed=args.seed,
                )
                row["vs_hybrid"] = test.to_dict()
            cell["modes"][name] = row
        out["pools"][pool] = cell
        _log(f"{pool}: " + ", ".join(f"{n} {r['ndcg@10']:.4f}" for n, r in cell["modes"].items()))
    # CPU cost of one reranker call per k (the pipeline scores the head in one call)
    latency: dict[str, Any] = {}
    sample = query_ids[: args.latency_queries]
    captured = tuning.capture_dataset(
        dataset, query_ids, embedder=args.embedder, workdir=args.workdir, pool="global", log=_log
    )
    for k in [*ks, 100] if 100 not in ks else ks:
        cpu, wall = [], []
        for q in sample:
            docs = [text[d] for d in tuning.fuse_ranking(captured[q], current, k)]
            c0, w0 = time.process_time(), time.perf_counter()
            reranker.score(dataset.queries[q], docs)
            cpu.append((time.process_time() - c0) * 1000)
            wall.append((time.perf_counter() - w0) * 1000)
        latency[str(k)] = {
            "cpu_ms_median": round(float(np.median(cpu)), 1),
            "wall_ms_median": round(float(np.median(wall)), 1),
            "wall_ms_p95": round(float(np.percentile(wall, 95)), 1),
            "queries": len(sample),
        }
        _log(f"rerank_k {k}: cpu {latency[str(k)]['cpu_ms_median']} ms, wall {latency[str(k)]['wall_ms_median']} ms")
    out["latency"] = latency
    out["load_average_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
