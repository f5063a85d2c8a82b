"""`shopsearch eval DATA_DIR`: relevance and latency of each search mode on BEIR-layout judgments."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from middleware.cli import EXIT_FATAL, EXIT_OK, EXIT_USAGE, CliError, load_settings

DEFAULT_MODES = "bm25,bm25s-peer,vector,hybrid-rrf,hybrid-minmax,hybrid+rerank,hybrid+rerank+business"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return number


def register(subparsers: argparse._SubParsersAction) -> None:
    from middleware.evaluation.metrics import DEFAULT_GAIN, GAIN_MAPPINGS
    from middleware.evaluation.runner import ALL_MODES

    p = subparsers.add_parser(
        "eval",
        help="measure each search mode on BEIR-layout judgments (quality, latency, both pools)",
        description="Index a BEIR folder (corpus.jsonl, queries.jsonl, qrels-<split>.tsv) and report "
        "recall@1/5/10/100, MRR@1/5/10 and nDCG@10 per mode and pool, with latency. Modes: " + ", ".join(ALL_MODES),
    )
    p.add_argument("dataset", metavar="DATA_DIR", help="BEIR folder")
    p.add_argument("--split", help="qrels split (default: the only one, or test)")
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated (default {DEFAULT_MODES})")
    p.add_argument("--pools", default="global,test", help="global, test or both (default global,test)")
    p.add_argument("--embedder", help="embedder path or name, e.g. sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--reranker", help="reranker path or name")
    p.add_argument("--max-queries", type=_positive_int, help="seeded sample of the judged queries")
    p.add_argument("--seed", type=int, default=0, help="sampling and resampling seed (default 0)")
    p.add_argument(
        "--gain",
        choices=sorted(GAIN_MAPPINGS),
        default=DEFAULT_GAIN,
        help=f"nDCG gain of a grade (default {DEFAULT_GAIN}, as pytrec_eval/BEIR; score-1 for 1-3 scales)",
    )
    p.add_argument(
        "--relevant-min",
        type=float,
        default=1.0,
        help="grade at or above which a document counts as relevant for recall and MRR (default 1)",
    )
    p.add_argument("--bm25-weight", type=_non_negative_float, default=0.3, help="hybrid-minmax (default 0.3)")
    p.add_argument("--knn-weight", type=_non_negative_float, default=0.7, help="hybrid-minmax (default 0.7)")
    p.add_argument("--rerank-fusion", choices=["rrf", "minmax"], default="rrf", help="fusion under rerank")
    p.add_argument("--rerank-k", type=_positive_int, help="candidates reranked (default: the pipeline's)")
    p.add_argument(
        "--compare-metrics",
        default="ndcg@10,recall@10",
        help="paired tests of every mode against the first one on these metrics (default ndcg@10,recall@10)",
    )
    p.add_argument("--resamples", type=_positive_int, default=10_000, help="significance resamples")
    p.add_argument("--output", help="write the results JSON here")
    p.add_argument("--per-query", help="write per-query metric values (JSON) here")
    p.add_argument("--plot", help="write a PNG chart here")
    p.add_argument("--workdir", default="./eval-work", help="cached vectors and indexes (default ./eval-work)")
    p.add_argument(
        "--backend",
        choices=["embedded", "opensearch"],
        help="where the product modes search (default: the configured backend, SHOPSEARCH_BACKEND); "
        "opensearch loads the corpus into an index prefix of its own (shopsearch-eval-<key>) on the configured "
        "cluster and reuses it while corpus, pool, embedder and mapping are unchanged",
    )
    p.add_argument("--config", help="settings file (the cluster of --backend opensearch)")
    p.add_argument("--threads", type=_positive_int, help="onnxruntime threads (default: core count)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from middleware.evaluation.data import EvalDataError, load_beir
    from middleware.evaluation.report import format_summary, plot, write_json
    from middleware.evaluation.runner import EvalConfig, Evaluation, per_query_document

    if not args.quiet:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("eval %(asctime)s %(message)s", "%H:%M:%S"))
        logger = logging.getLogger("middleware.evaluation")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the root handler would print every line twice
    from middleware.backends.base import BackendError

    settings = load_settings(args)
    try:
        config = EvalConfig(
            backend=args.backend or settings.backend,
            opensearch=settings.opensearch,
            modes=list(dict.fromkeys(_csv(args.modes))),
            pools=list(dict.fromkeys(_csv(args.pools))),
            embedder=args.embedder,
            reranker=args.reranker,
            max_queries=args.max_queries,
            seed=args.seed,
            gain=args.gain,
            relevant_min=args.relevant_min,
            workdir=Path(args.workdir),
            rerank_k=args.rerank_k,
            rerank_fusion=args.rerank_fusion,
            bm25_weight=args.bm25_weight,
            knn_weight=args.knn_weight,
            compare_metrics=_csv(args.compare_metrics),
            n_resamples=args.resamples,
            threads=args.threads,
        )
        dataset = load_beir(args.dataset, args.split)
    except (ValueError, EvalDataError) as err:
        raise CliError(str(err), EXIT_USAGE) from None

    try:
        results = Evaluation(dataset, config).run()
    except (ValueError, BackendError) as err:  # nothing to evaluate, or the cluster failed
        raise CliError(str(err), EXIT_FATAL) from None
    for warning in results.get("warnings", []):
        print(f"shopsearch: warning: {warning}", file=sys.stderr)
    evaluations = results.pop("_evaluations")
    results.pop("_rankings")
    print(format_summary(results))
    try:
        if args.output:
            write_json(results, args.output)
            print(f"results: {args.output}")
        if args.per_query:
            write_json(per_query_document(evaluations), args.per_query)
            print(f"per-query values: {args.per_query}")
        if args.plot:
            plot(results, args.plot)
            print(f"chart: {args.plot}")
    except OSError as err:
        raise CliError(f"cannot write output: {err}", EXIT_FATAL) from None
    return EXIT_OK
