"""Fusion defaults by measurement: one retrieval per query, every fusion configuration in memory.

    python -m benchmarks.tuning.fusion_grid --workdir /work/runs/tuning/work \\
        --output benchmarks/results/fusion.json [--sets homedepot,qbqtc] [--max-queries 2000]

Per set and pool (global, test): the BM25 and kNN lists of each query are captured once through the
product's own store, expander and kNN floor (`middleware.tuning.fusion.capture_dataset`), then fused
under the grid of `default_grid()` (RRF k, weighted RRF, min-max weights, floor on/off). Reports mean
nDCG@10 per configuration, BM25 and vector alone, the best per method, paired tests of the best and of
the candidate defaults against the current default, and a dev/held-out split check (`tune`). A sample of
rankings is checked against the product's `middleware.fusion` functions.
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

from middleware.evaluation.data import load_beir, sample_queries
from middleware.evaluation.metrics import evaluable_queries
from middleware.evaluation.significance import compare
from middleware.tuning import fusion as tuning

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
# set -> (qrels split, gain mapping, relevant_min): the conventions of benchmarks/results/eval
SETS: dict[str, tuple[str, str, float]] = {
    "homedepot": ("train", "score-1", 2.5),
    "qbqtc": ("test", "score", 1.0),
}
EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
CURRENT = tuning.FusionConfig("rrf", rrf_k=60)  # the default before this measurement
BM25_ONLY = tuning.FusionConfig("minmax", bm25_weight=1.0, knn_weight=0.0)
VECTOR_ONLY = tuning.FusionConfig("minmax", bm25_weight=0.0, knn_weight=1.0)


def _log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _check_fast_path(captured: dict[str, tuning.QueryLists], scorer: tuning.FastScorer, grid: list) -> int:
    """The array scorer's top-10 equals the product's fusion functions on a sample; returns checks run."""
    checks = 0
    for index in range(0, len(scorer.query_ids), max(1, len(scorer.query_ids) // 50)):
        lists = captured[scorer.query_ids[index]]
        for config in grid[:: max(1, len(grid) // 12)]:
            expected = tuning.fuse_ranking(lists, config, 10)
            got = scorer.ranking(index, config, 10)
            if expected != got:
                raise AssertionError(f"fast path differs for {config.label}: {got} != {expected}")
            checks += 1
    return checks


def run_set(name: str, args: argparse.Namespace) -> dict[str, Any]:
    split, gain, relevant_min = SETS[name]
    dataset = load_beir(args.data / name, split)
    selected = sample_queries(dataset.judged_query_ids(), args.max_queries, args.seed)
    query_ids, skipped = evaluable_queries(selected, dataset.qrels, relevant_min)
    grid = tuning.default_grid()
    out: dict[str, Any] = {
        "split": split,
        "gain": gain,
        "relevant_min": relevant_min,
        "queries": {"selected": len(selected), "evaluated": len(query_ids), "skipped_no_relevant": len(skipped)},
        "pools": {},
    }
    for pool in args.pools:
        started = time.perf_counter()
        captured = tuning.capture_dataset(
            dataset, query_ids, embedder=args.embedder, workdir=args.workdir, pool=pool, log=_log
        )
        capture_s = time.perf_counter() - started
        scorer = tuning.FastScorer(captured, dataset.qrels, query_ids, gain_mapping=gain)
        checks = _check_fast_path(captured, scorer, grid)
        started = time.perf_counter()
        scores = tuning.grid_scores(scorer, [CURRENT, BM25_ONLY, VECTOR_ONLY, *grid])
        grid_s = time.perf_counter() - started
        means = {c: float(v.mean()) for c, v in scores.items()}
        best = max(grid, key=lambda c: (means[c], c == CURRENT))
        best_by: dict[str, Any] = {}
        for label, members in (
            ("rrf", [c for c in grid if c.method == "rrf" and not c.weighted_rrf]),
            ("weighted-rrf", [c for c in grid if c.weighted_rrf]),
            ("minmax", [c for c in grid if c.method == "minmax"]),
        ):
            for floor in (True, False):
                pick = max((c for c in members if c.knn_floor == floor), key=lambda c: means[c])
                best_by[f"{label}{'' if floor else ' no-floor'}"] = {**pick.to_dict(), "ndcg@10": round(means[pick], 4)}
        tests = []
        for config in dict.fromkeys([best, *args.candidates_configs]):
            if config not in scores:
                scores[config] = scorer.ndcg(config)
            result = compare("ndcg@10", config.label, scores[config], CURRENT.label, scores[CURRENT], seed=args.seed)
            tests.append(result.to_dict())
        bm25_tests = [
            compare("ndcg@10", c.label, scores[c], "bm25 alone", scores[BM25_ONLY], seed=args.seed).to_dict()
            for c in dict.fromkeys([best, *args.candidates_configs])
        ]
        split_check = tuning.tune(scorer, grid, CURRENT, dev_fraction=0.5, seed=args.seed)
        out["pools"][pool] = {
            "queries": len(query_ids),
            "capture_s": round(capture_s, 1),
            "grid_s": round(grid_s, 1),
            "fast_path_checks": checks,
            "bm25": round(means[BM25_ONLY], 4),
            "vector": round(means[VECTOR_ONLY], 4),
            "current": {**CURRENT.to_dict(), "ndcg@10": round(means[CURRENT], 4)},
            "best": {**best.to_dict(), "ndcg@10": round(means[best], 4)},
            "best_by_method": best_by,
            "paired_tests_vs_current": tests,
            "paired_tests_vs_bm25": bm25_tests,
            "dev_held_out": {k: split_check[k] for k in ("queries", "chosen", "dev", "held_out")},
            "grid": sorted(({**c.to_dict(), "ndcg@10": round(means[c], 4)} for c in grid), key=lambda r: -r["ndcg@10"]),
        }
        _log(f"{name} {pool}: best {best.label} {means[best]:.4f}, current {means[CURRENT]:.4f}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--sets", default="homedepot,qbqtc")
    p.add_argument("--pools", default="global,test")
    p.add_argument("--embedder", default=EMBEDDER)
    p.add_argument("--max-queries", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("./eval-work"))
    p.add_argument(
        "--candidates",
        default="rrf:60,rrf:20,rrf:10,rrf:1,minmax:0.5,minmax:0.7,minmax:0.8,minmax:0.9",
        help="configs tested against rrf k=60",
    )
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    args.pools = [x for x in args.pools.split(",") if x]
    args.candidates_configs = []
    for item in args.candidates.split(","):
        method, value = item.split(":")
        if method == "rrf":
            args.candidates_configs.append(tuning.FusionConfig("rrf", rrf_k=int(value)))
        else:
            w = float(value)
            args.candidates_configs.append(tuning.FusionConfig("minmax", bm25_weight=w, knn_weight=round(1 - w, 1)))
    results: dict[str, Any] = {
        "command": "python -m benchmarks.tuning.fusion_grid " + " ".join(argv if argv is not None else sys.argv[1:]),
        "embedder": args.embedder,
        "max_queries": args.max_queries,
        "seed": args.seed,
        "load_average": os.getloadavg(),
        "sets": {},
    }
    for name in [x for x in args.sets.split(",") if x]:
        results["sets"][name] = run_set(name, args)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({n: {p: v["best"] for p, v in s["pools"].items()} for n, s in results["sets"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    np.seterr(divide="ignore")
    raise SystemExit(main())
