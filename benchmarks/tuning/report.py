"""Before/after tables from a tuning run's eval JSONs: `python -m benchmarks.tuning.report RUNS_DIR`.

Reads eval-base.json / eval-tuned.json (mode `vector`), eval-rerank.json (hybrid-rrf vs
hybrid+rerank) and separation.jsonl, as written by benchmarks/tuning/homedepot.sh; prints Markdown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RETRIEVAL_METRICS = ("recall@1", "recall@5", "recall@10", "mrr@1", "mrr@5", "ndcg@10")
RERANK_METRICS = ("ndcg@10", "mrr@10", "recall@10")


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _row(name: str, values: dict[str, Any], metrics: tuple[str, ...]) -> str:
    return "| " + " | ".join([name, *(f"{values[m]:.4f}" for m in metrics)]) + " |"


def _header(first: str, metrics: tuple[str, ...]) -> list[str]:
    return ["| " + " | ".join([first, *metrics]) + " |", "|" + "---|" * (len(metrics) + 1)]


def report(runs: Path) -> str:
    lines: list[str] = []
    base = _load(runs / "eval-base.json")
    tuned_runs = [(p, _load(p)) for p in sorted(runs.glob("eval-tuned*.json"))]
    if base:
        queries = base["results"]["vector"]["global"]["queries"]
        lines.append(f"## Bi-encoder before/after ({queries} dev queries with a relevant document)\n")
        for pool in ("global", "test"):
            lines += [f"{pool} pool:", "", *_header("model", RETRIEVAL_METRICS)]
            lines.append(_row("all-MiniLM-L6-v2 (base)", base["results"]["vector"][pool], RETRIEVAL_METRICS))
            before = base["results"]["vector"][pool]
            for _path, tuned in tuned_runs:
                after = tuned["results"]["vector"][pool]
                name = f"fine-tuned: {Path(tuned['settings']['embedder']).name}"
                lines.append(_row(name, after, RETRIEVAL_METRICS))
                lines.append(
                    "| change | " + " | ".join(f"{after[m] - before[m]:+.4f}" for m in RETRIEVAL_METRICS) + " |"
                )
            lines.append("")
    sep_path = runs / "separation.jsonl"
    if sep_path.is_file():
        lines += ["Similarity separation on the dev queries (same mined negatives for both):", ""]
        lines += [
            "| embedder | mean cos(q, pos) | mean cos(q, neg) | separation | pos>neg pairs |",
            "|---|---|---|---|---|",
        ]
        for line in sep_path.read_text().splitlines():
            s = json.loads(line)
            lines.append(
                f"| {s['embedder']} | {s['mean_pos']:.4f} | {s['mean_neg']:.4f} | {s['separation']:.4f} "
                f"| {s['pair_accuracy']:.4f} |"
            )
        lines.append("")
    for path in sorted(runs.glob("eval-rerank*.json")):
        rerank = _load(path)
        assert rerank is not None
        name = Path(rerank["settings"]["reranker"]).name
        queries = rerank["results"]["hybrid-rrf"]["global"]["queries"]
        lines.append(f"## Cross-encoder `{name}` as the pipeline's reranker ({path.name}, {queries} queries)\n")
        for pool in ("global", "test"):
            lines += [f"{pool} pool:", "", *_header("mode", RERANK_METRICS)]
            for mode in ("hybrid-rrf", "hybrid+rerank"):
                if mode in rerank["results"]:
                    lines.append(_row(mode, rerank["results"][mode][pool], RERANK_METRICS))
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else "/work/helpers/tune-runs/homedepot")))
