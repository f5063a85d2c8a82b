"""`shopsearch tune …`: training pairs, hard negatives, teacher scores, embedder/reranker fine-tuning.

Needs the `tune` extra (sentence-transformers, datasets, accelerate) for the two train commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from middleware.cli import EXIT_OK, EXIT_USAGE, CliError, load_settings

log = logging.getLogger(__name__)

EXIT_SHORT_OF_NEGATIVES = 3  # mine-negatives wrote its output, but most records got too few negatives


LIVE_EVENT_LOG = "<event log>"  # --from-events without SRC: read the configured store's log


def register(subparsers: argparse._SubParsersAction) -> None:
    tune = subparsers.add_parser("tune", help="fine-tune the embedder/reranker on your own judgments")
    sub = tune.add_subparsers(dest="tune_command", metavar="STEP")
    tune.set_defaults(func=lambda args: _usage(tune))

    p = sub.add_parser(
        "make-pairs",
        help="query→positives pairs from a BEIR folder or from shoppers' clicks, split by query",
        epilog="--from-events: searches and events (queries.jsonl + events.jsonl export) become pairs: engaged "
        "products are positives scored with position-bias correction, skip-above products negatives",
    )
    # dest beir_dir: the global --data-dir (the store, and its event log) keeps its own name
    p.add_argument(
        "beir_dir", nargs="?", metavar="DATA_DIR", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels-<split>.tsv)"
    )
    p.add_argument("--from-events", metavar="SRC", nargs="?", const=LIVE_EVENT_LOG,
                   help="export folder holding queries.jsonl + events.jsonl; without SRC, the configured "
                   "store's event log (--data-dir / SHOPSEARCH_BACKEND)")  # fmt: skip
    p.add_argument("--catalog", help="with --from-events: products JSONL or BEIR corpus.jsonl (default: the store)")
    p.add_argument("--correction", choices=["ipw", "coec", "none"], default="ipw",
                   help="position-bias correction of click scores (default ipw)")  # fmt: skip
    p.add_argument("--propensities", choices=["ctr", "harvest"], default="harvest",
                   help="harvest (products seen at adjacent positions; else the CTR ratio) or ctr")  # fmt: skip
    p.add_argument("--no-skip-above", action="store_true",
                   help="negatives: every shown, never-engaged product (default: skip-above only)")  # fmt: skip
    p.add_argument("--min-query-searches", type=int, default=3, help="served searches a query needs (default 3)")
    p.add_argument("--min-impressions", type=int, default=3, help="times a product was shown for it (default 3)")
    p.add_argument("--min-skips", type=int, default=2, help="skips a skip-above negative needs (default 2)")
    p.add_argument("--min-clicks", type=int, default=1, help="searches engaging a positive (default 1)")
    p.add_argument("--positive-min", type=float, help="corrected score of a positive (ipw/none 0.1, coec 1.0)")
    p.add_argument("--max-negatives", type=int, default=30, help="negatives per query (default 30)")
    p.add_argument("--propensity-floor", type=float, default=0.05, help="lowest position propensity (0.05)")
    p.add_argument("--output-dir", required=True, help="writes train.jsonl, dev.jsonl, id lists (+ beir/)")
    p.add_argument("--split", default="train", help="qrels split to read (default train)")
    p.add_argument("--threshold", type=float, default=1.0, help="score ≥ this is a positive (homedepot: 2.5)")
    p.add_argument("--dev-fraction", type=float, default=0.1, help="share of queries held out (default 0.1)")
    p.add_argument("--label-min", type=float, help="grade mapped to label 0 (default: lowest in qrels)")
    p.add_argument("--label-max", type=float, help="grade mapped to label 1 (default: highest in qrels)")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=run_make_pairs)

    p = sub.add_parser(
        "mine-negatives",
        help="add hard negatives found with the current embedder",
        epilog="exit codes: 0 done; 3 output written but most records got fewer than --negatives (the "
        "reason on stderr); 2 usage; 1 fatal",
    )
    p.add_argument("--input", required=True, help='pairs JSONL: {"query", "pos": [...]} a line')
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", help="BEIR corpus.jsonl to embed and search (in-memory faiss)")
    source.add_argument("--index", action="store_true", help="search the live store (configured backend)")
    p.add_argument(
        "--retriever",
        choices=["knn", "hybrid"],
        default="knn",
        help="with --index: the embedder's kNN alone (default), or the product's hybrid retrieval and "
        "fusion, the lists the reranker reorders at query time",
    )
    p.add_argument("--output", required=True, help="output JSONL (FlagEmbedding format)")
    p.add_argument("--range", default="2-200", help="1-based ranks A-B to sample from (default 2-200)")
    p.add_argument("--negatives", type=int, default=10, help="negatives per query (default 10)")
    p.add_argument("--dup-threshold", type=float, default=0.98, help="cosine to a positive ≥ this: duplicate")
    p.add_argument("--no-dup-cosine", action="store_true", help="near-duplicates by normalised text only")
    p.add_argument("--margin", type=float, help="skip candidates with cosine > lowest positive − margin")
    p.add_argument("--max-records", type=int, help="seeded subsample of the input records")
    p.add_argument("--corpus-cache", help="NPY file keeping the corpus vectors between runs (same model)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--embedder", help="embedder (default: the configured SHOPSEARCH_EMBEDDER)")
    p.add_argument("--query-instruction", help="override the embedder's query instruction")
    p.set_defaults(func=run_mine)

    p = sub.add_parser("teacher-scores", help="add the reranker's raw logits as pos_scores/neg_scores")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--reranker", help="reranker (default: the configured SHOPSEARCH_RERANKER)")
    p.add_argument("--sigmoid", action="store_true", help="also store probabilities as pos_probs/neg_probs")
    p.set_defaults(func=run_teacher)

    p = sub.add_parser("separation", help="mean positive vs mean negative similarity of an embedder")
    p.add_argument("--input", required=True, help="pairs JSONL with negatives (e.g. mined dev pairs)")
    p.add_argument("--embedder", help="embedder (default: the configured SHOPSEARCH_EMBEDDER)")
    p.add_argument("--query-instruction", help="override the embedder's query instruction")
    p.set_defaults(func=run_separation)

    p = sub.add_parser("train-embedder", help="contrastive (+ KD) fine-tuning of the bi-encoder")
    _train_flags(p, default_base="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--group-size", type=int, default=8, help="1 positive + N-1 negatives (default 8)")
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--query-instruction", help="prefix for queries only (default: the base's own)")
    p.add_argument("--pooling", choices=["cls", "mean"], help="for plain transformers bases (default cls)")
    p.add_argument("--kd", choices=["auto", "on", "off", "only"], default="auto",
                   help="distil teacher scores: auto = when every record has them (default)")  # fmt: skip
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--teacher-temperature", type=float, default=1.0)
    p.add_argument("--cached", action="store_true", help="CachedMNRL: big batches, bounded memory")
    p.add_argument("--mini-batch-size", type=int, default=32, help="with --cached")
    p.add_argument("--max-pos-per-query", type=int, default=1, help="groups per query (one per positive)")
    p.set_defaults(func=run_train_embedder)

    p = sub.add_parser("train-reranker", help="fine-tune a cross-encoder (BCE or listwise; binary or graded labels)")
    _train_flags(p, default_base="BAAI/bge-reranker-v2-m3")
    p.add_argument("--labels", choices=["auto", "binary", "graded"], default="auto")
    p.add_argument("--negatives-per-query", type=int, default=7)
    p.add_argument("--pos-weight", type=float, help="BCE positive weight (default #neg/#pos)")
    p.add_argument(
        "--loss",
        choices=["bce", "lambda", "listnet"],
        default="bce",
        help="bce: pointwise pairs (default); lambda (LambdaLoss) or listnet: one ranked list per query",
    )
    p.add_argument("--max-docs-per-query", type=int, default=16, help="listwise: documents per query (default 16)")
    p.set_defaults(func=run_train_reranker)

    _register_fusion(sub)


def _register_fusion(sub: argparse._SubParsersAction) -> None:
    from middleware.evaluation.metrics import GAIN_MAPPINGS

    p = sub.add_parser(
        "fusion",
        help="pick the fusion method, weights and RRF k for your judgments (dev split), report them on held-out",
        description="Index a BEIR folder as `shopsearch eval` does, retrieve every judged query once (BM25 and "
        "kNN lists), fuse them in memory under a grid (RRF k, weighted RRF, min-max weights; the kNN floor on and "
        "off), choose on a seeded dev split of the queries and report nDCG@10 of the chosen and the current "
        "configuration on the held-out queries with a paired test. Writes a settings snippet.",
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels-<split>.tsv)")
    p.add_argument("--split", help="qrels split (default: the only one, or test)")
    p.add_argument("--embedder", help="embedder (default: the configured SHOPSEARCH_EMBEDDER)")
    p.add_argument("--output", required=True, help="settings snippet to write (env lines, or JSON with --format json)")
    p.add_argument("--format", choices=["env", "json"], default="env", help="snippet format (default env)")
    p.add_argument("--report", help="write the full report (grid, held-out test) as JSON here")
    p.add_argument("--pool", choices=["global", "test"], default="global", help="documents searched (default global)")
    p.add_argument("--dev-fraction", type=float, default=0.5, help="share of queries to choose on (default 0.5)")
    p.add_argument("--max-queries", type=int, help="seeded sample of the judged queries")
    p.add_argument("--seed", type=int, default=0, help="split, sampling and resampling seed (default 0)")
    p.add_argument("--gain", choices=sorted(GAIN_MAPPINGS), default="score", help="nDCG gain of a grade")
    p.add_argument("--relevant-min", type=float, default=1.0, help="queries need a document graded at least this")
    p.add_argument("--no-floor-grid", action="store_true", help="keep the kNN floor on in every configuration")
    p.add_argument("--resamples", type=int, default=10_000, help="paired-test resamples (default 10000)")
    p.add_argument("--workdir", default="./eval-work", help="cached vectors, indexes, lists (default ./eval-work)")
    p.set_defaults(func=run_tune_fusion)


def _train_flags(p: argparse.ArgumentParser, *, default_base: str) -> None:
    p.add_argument("--input", required=True, help="pairs JSONL with negatives (mine-negatives output)")
    p.add_argument("--output-dir", required=True, help="where the trained model is saved")
    p.add_argument("--base", default=default_base, help=f"base model (default {default_base})")
    p.add_argument("--max-steps", type=int, help="stop after N optimiser steps (default: --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--max-length", type=int, help="tokens per text (default 128 embedder, 256 reranker)")
    p.add_argument("--max-records", type=int, help="seeded subsample of the input records")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--fp16", action="store_true", help="mixed precision (CUDA GPU only)")
    p.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT/checkpoints")
    p.add_argument("--seed", type=int, default=42)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _read(path: str) -> list[dict[str, Any]]:
    from middleware.tuning.data import TuningDataError, read_pairs

    try:
        return read_pairs(path)
    except TuningDataError as err:
        raise CliError(str(err), EXIT_USAGE) from None


def _print_summary(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, indent=2, ensure_ascii=False, default=str))


# ------------------------------------------------------------------------------------------ handlers


def run_make_pairs(args: argparse.Namespace) -> int:
    from middleware.tuning.data import TuningDataError, build_pairs, write_pairs_build

    if (args.beir_dir is None) == (args.from_events is None):
        raise CliError("make-pairs: give either DATA_DIR (BEIR judgments) or --from-events SRC", EXIT_USAGE)
    if args.from_events is not None:
        return _make_pairs_from_events(args)
    if args.catalog is not None:
        raise CliError("--catalog goes with --from-events (a BEIR folder has its own corpus.jsonl)", EXIT_USAGE)
    try:
        build, _corpus, queries, qrels = build_pairs(
            args.beir_dir,
            split=args.split,
            threshold=args.threshold,
            dev_fraction=args.dev_fraction,
            seed=args.seed,
            label_min=args.label_min,
            label_max=args.label_max,
        )
        summary = write_pairs_build(build, args.output_dir, args.beir_dir, queries, qrels, split=args.split)
    except TuningDataError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    _print_summary(summary)
    return EXIT_OK


def _store_texts(args: argparse.Namespace, records: list[Any]) -> dict[str, str]:
    """Texts of every served product, read from the configured store."""
    from middleware.cli.store import open_store, require_store

    settings = load_settings(args)
    require_store(settings)
    ids = sorted({object_id for record in records for object_id in record.hit_ids})
    backend = open_store(settings)
    try:
        texts: dict[str, str] = {}
        for start in range(0, len(ids), 500):
            for product in backend.get(ids[start : start + 500]):
                texts[product.id] = product.embedding_text()
    finally:
        backend.close()
    return texts


def _live_events(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    """Every query record and trusted event of the configured store's event log, oldest first."""
    from middleware.events.sqlite import FILE_NAME
    from middleware.events.store import open_event_log

    settings = load_settings(args)
    if settings.backend == "embedded" and not (settings.data_dir / FILE_NAME).is_file():
        path = settings.data_dir / FILE_NAME
        raise CliError(f"--from-events: no event log at {path} (nothing logged yet?)", EXIT_USAGE)
    log = open_event_log(settings)
    try:
        return list(log.queries()), list(log.events())
    finally:
        log.close()


def _make_pairs_from_events(args: argparse.Namespace) -> int:
    from middleware.tuning.clicks import ClickPairsConfig, click_pairs, read_catalog, read_export
    from middleware.tuning.data import TuningDataError, split_by_query, write_jsonl

    try:
        config = ClickPairsConfig(
            correction=args.correction,
            propensities=args.propensities,
            skip_above=not args.no_skip_above,
            min_query_searches=args.min_query_searches,
            min_impressions=args.min_impressions,
            min_skips=args.min_skips,
            min_clicks=args.min_clicks,
            positive_min=args.positive_min,
            max_negatives=args.max_negatives,
            propensity_floor=args.propensity_floor,
        )
        if args.from_events == LIVE_EVENT_LOG:
            records, events = _live_events(args)
        else:
            records, events = read_export(args.from_events)
        catalog = read_catalog(args.catalog) if args.catalog else _store_texts(args, records)
        pairs, stats = click_pairs(records, events, catalog, config)
        train_ids, dev_ids = split_by_query([r["query_id"] for r in pairs], args.dev_fraction, args.seed)
    except TuningDataError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    if not pairs:
        raise CliError(
            f"no pairs: {stats.queries} queries, {stats.queries_below_evidence} with fewer than "
            f"{config.min_query_searches} searches, {stats.queries_without_positive} without a positive "
            "(lower --min-query-searches / --min-impressions / --positive-min, or log more traffic)",
            EXIT_USAGE,
        )
    out = Path(args.output_dir)
    dev = set(dev_ids)
    write_jsonl(out / "train.jsonl", (r for r in pairs if r["query_id"] not in dev))
    write_jsonl(out / "dev.jsonl", (r for r in pairs if r["query_id"] in dev))
    (out / "train_query_ids.txt").write_text("".join(f"{q}\n" for q in train_ids))
    (out / "dev_query_ids.txt").write_text("".join(f"{q}\n" for q in dev_ids))
    summary = {
        "source": "event log" if args.from_events == LIVE_EVENT_LOG else str(Path(args.from_events).resolve()),
        "correction": config.correction,
        "propensity_method": config.propensities,
        "skip_above": config.skip_above,
        "train_records": len(train_ids),
        "dev_records": len(dev_ids),
        **stats.to_dict(),
    }
    (out / "pairs_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    _print_summary(summary)
    return EXIT_OK


def _embedder_settings(args: argparse.Namespace) -> Any:  # -> Settings
    overrides: dict[str, Any] = {"embedder": args.embedder}
    if args.query_instruction is not None:
        overrides["query_instruction"] = args.query_instruction
    return load_settings(args, **overrides)


def _require_embedder(settings: Any, purpose: str = "mining") -> Any:  # -> Embedder
    from middleware.cli.store import load_embedder

    embedder = load_embedder(settings)
    if embedder is None:
        raise CliError(f"{purpose} needs an embedder: set --embedder or SHOPSEARCH_EMBEDDER", EXIT_USAGE)
    return embedder


def run_mine(args: argparse.Namespace) -> int:
    from middleware.tuning.common import subsample
    from middleware.tuning.data import TuningDataError, load_corpus, write_jsonl
    from middleware.tuning.negatives import CorpusSearcher, IndexSearcher, MiningConfig, mine_negatives, parse_range

    try:
        config = MiningConfig(
            rank_range=parse_range(args.range),
            negatives=args.negatives,
            seed=args.seed,
            dup_threshold=None if args.no_dup_cosine else args.dup_threshold,
            margin=args.margin,
        )
        records = subsample(_read(args.input), args.max_records, args.seed)
        corpus = load_corpus(args.corpus) if args.corpus else None
    except TuningDataError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    if args.retriever == "hybrid" and corpus is not None:
        raise CliError("--retriever hybrid searches the live store: use it with --index", EXIT_USAGE)
    settings = _embedder_settings(args)
    pipeline = None
    if corpus is not None:
        embedder = _require_embedder(settings)
        log.info("embedding %d corpus documents", len(corpus))
        searcher: Any = CorpusSearcher(corpus, embedder, cache=args.corpus_cache)
        backend = None
    else:
        from middleware.cli.store import bound_settings, check_embedder_fits, open_store, require_store

        require_store(settings)
        backend = open_store(settings)
        try:
            settings = bound_settings(settings, backend)  # the live store's own embedder by default
            embedder = _require_embedder(settings)
            check_embedder_fits(backend, embedder, settings)
        except BaseException:
            backend.close()
            raise
        if args.retriever == "hybrid":
            from middleware.pipeline import Pipeline
            from middleware.tuning.negatives import HybridSearcher

            pipeline = Pipeline(settings, backend, embedder, None, owns_backend=False)
            searcher = HybridSearcher(pipeline, embedder)
        else:
            searcher = IndexSearcher(backend, embedder)
    try:
        mined, stats = mine_negatives(records, embedder, searcher, config)
    finally:
        if pipeline is not None:
            pipeline.close()
        if backend is not None:
            backend.close()
    write_jsonl(args.output, mined)
    _print_summary(
        {
            "output": args.output,
            "records": stats.records,
            "negatives": stats.negatives,
            "records_short_of_negatives": stats.short,
            "excluded": stats.excluded,
            "range": list(config.rank_range),
            "retriever": "corpus-knn" if corpus is not None else args.retriever,
            "seed": config.seed,
        }
    )
    if stats.records and stats.short * 2 > stats.records:
        excluded = ", ".join(f"{k} {v}" for k, v in stats.excluded.items() if v) or "none"
        print(
            f"shopsearch: {stats.short} of {stats.records} records got fewer than {config.negatives} negatives "
            f"({stats.negatives} mined in all; candidates excluded: {excluded}): widen --range, loosen "
            "--dup-threshold/--margin, or check the embedder",
            file=sys.stderr,
        )
        return EXIT_SHORT_OF_NEGATIVES
    return EXIT_OK


def run_separation(args: argparse.Namespace) -> int:
    from middleware.tuning.separation import similarity_separation

    records = _read(args.input)
    settings = _embedder_settings(args)
    embedder = _require_embedder(settings, "separation")
    try:
        figures = similarity_separation(embedder, records)
    except ValueError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    print(json.dumps({"embedder": settings.embedder, **figures}, ensure_ascii=False))
    return EXIT_OK


def run_teacher(args: argparse.Namespace) -> int:
    from middleware.models import ModelLoadError, load_reranker
    from middleware.tuning.data import write_jsonl
    from middleware.tuning.teacher import add_teacher_scores

    records = _read(args.input)
    settings = load_settings(args, reranker=args.reranker)
    if not settings.reranker_enabled:
        raise CliError("teacher scores need a reranker: set --reranker or SHOPSEARCH_RERANKER", EXIT_USAGE)
    try:
        reranker = load_reranker(settings)
    except ModelLoadError as err:
        raise CliError(str(err)) from None
    scored = add_teacher_scores(records, reranker, sigmoid=args.sigmoid)
    write_jsonl(args.output, scored)
    n_pairs = sum(len(r["pos_scores"]) + len(r["neg_scores"]) for r in scored)
    _print_summary({"output": args.output, "records": len(scored), "pairs_scored": n_pairs, "raw_logits": True})
    return EXIT_OK


def _common_train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    for flag in ("max_steps", "batch_size", "save_steps", "logging_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be ≥ 1, got {value}", EXIT_USAGE)
    kwargs: dict[str, Any] = {
        "base": args.base,
        "max_steps": args.max_steps,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "warmup_ratio": args.warmup_ratio,
        "max_records": args.max_records,
        "gradient_checkpointing": args.gradient_checkpointing,
        "fp16": args.fp16,
        "save_steps": args.save_steps,
        "logging_steps": args.logging_steps,
        "resume": args.resume,
        "seed": args.seed,
    }
    if args.max_length is not None:
        kwargs["max_length"] = args.max_length
    return kwargs


def _train(args: argparse.Namespace, kind: str) -> int:
    from middleware.tuning.common import TrainingSetupError

    records = _read(args.input)
    try:
        if kind == "embedder":
            from middleware.tuning.train_embedder import EmbedderTrainConfig, train_embedder

            config: Any = EmbedderTrainConfig(
                **_common_train_kwargs(args),
                group_size=args.group_size,
                temperature=args.temperature,
                query_instruction=args.query_instruction,
                pooling=args.pooling,
                kd=args.kd,
                kd_weight=args.kd_weight,
                teacher_temperature=args.teacher_temperature,
                cached=args.cached,
                mini_batch_size=args.mini_batch_size,
                max_pos_per_query=args.max_pos_per_query,
            )
            result = train_embedder(records, args.output_dir, config)
        else:
            from middleware.tuning.train_reranker import RerankerTrainConfig, train_reranker

            config = RerankerTrainConfig(
                **_common_train_kwargs(args),
                labels=args.labels,
                negatives_per_query=args.negatives_per_query,
                pos_weight=args.pos_weight,
                loss=args.loss,
                max_docs_per_query=args.max_docs_per_query,
            )
            result = train_reranker(records, args.output_dir, config)
    except TrainingSetupError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    losses = result.losses
    _print_summary(
        {
            "output_dir": str(Path(result.output_dir)),
            "steps": result.steps,
            "examples": result.rows,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "notes": result.notes,
        }
    )
    return EXIT_OK


def run_train_embedder(args: argparse.Namespace) -> int:
    return _train(args, "embedder")


def run_train_reranker(args: argparse.Namespace) -> int:
    return _train(args, "reranker")


def run_tune_fusion(args: argparse.Namespace) -> int:
    from middleware.evaluation.data import EvalDataError, load_beir, sample_queries
    from middleware.evaluation.metrics import evaluable_queries
    from middleware.tuning import fusion as tuning

    if not 0.0 < args.dev_fraction < 1.0:
        raise CliError(f"--dev-fraction must be between 0 and 1 (exclusive), got {args.dev_fraction}", EXIT_USAGE)
    for flag in ("max_queries", "resamples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be ≥ 1, got {value}", EXIT_USAGE)
    settings = load_settings(args, embedder=args.embedder)
    if settings.embedder in ("", "none"):
        raise CliError("fusion tuning needs an embedder: set --embedder or SHOPSEARCH_EMBEDDER", EXIT_USAGE)
    try:
        dataset = load_beir(args.data_dir, args.split)
    except EvalDataError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    selected = sample_queries(dataset.judged_query_ids(), args.max_queries, args.seed)
    query_ids, _skipped = evaluable_queries(selected, dataset.qrels, args.relevant_min)
    if len(query_ids) < 4:
        raise CliError(
            f"fusion tuning needs at least 4 queries with a document graded ≥ {args.relevant_min}, "
            f"got {len(query_ids)}",
            EXIT_USAGE,
        )
    try:
        captured = tuning.capture_dataset(
            dataset,
            query_ids,
            embedder=settings.embedder,
            workdir=Path(args.workdir),
            pool=args.pool,
            settings_overrides={"knn_floor": settings.knn_floor, "typo_tolerance": settings.typo_tolerance},
            log=lambda line: print(f"tune fusion: {line}", file=sys.stderr),
        )
        scorer = tuning.FastScorer(captured, dataset.qrels, query_ids, gain_mapping=args.gain)
        grid = tuning.default_grid(floors=(True,) if args.no_floor_grid else (True, False))
        report = tuning.tune(
            scorer,
            grid,
            tuning.current_config(settings),
            dev_fraction=args.dev_fraction,
            seed=args.seed,
            n_resamples=args.resamples,
        )
    except ValueError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    chosen = tuning.FusionConfig(**{k: v for k, v in report["chosen"].items() if k != "label"})
    report["dataset"] = {"path": str(args.data_dir), "split": dataset.split, "pool": args.pool}
    report["settings"] = {"embedder": settings.embedder, "gain": args.gain, "relevant_min": args.relevant_min}
    try:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(tuning.settings_snippet(chosen, fmt=args.format), encoding="utf-8")
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        raise CliError(f"cannot write output: {err}") from None
    test = report["held_out"]["paired_test"]
    print(
        f"chosen on {report['queries']['dev']} dev queries: {report['chosen']['label']} "
        f"(current: {report['current']['label']})\n"
        f"held-out nDCG@10 over {report['queries']['held_out']} queries: chosen {report['held_out']['chosen']:.4f}, "
        f"current {report['held_out']['current']:.4f}, difference {test['mean_diff']:+.4f} "
        f"[{test['ci_low']:+.4f}, {test['ci_high']:+.4f}] p={test['p_value']:.4f}\n"
        f"settings: {args.output}"
    )
    return EXIT_OK
