"""`shopsearch opensearch init | reindex FILE | check | templates`: cluster setup and zero-downtime rebuilds."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from middleware.backends.base import BackendError
from middleware.cli import EXIT_FATAL, EXIT_OK, EXIT_USAGE, CliError, load_settings
from middleware.cli.index import source_flags
from middleware.cli.store import load_embedder
from middleware.config import Settings
from middleware.products import Product

EXIT_REJECTED = 3  # some catalog rows were rejected; every valid row was indexed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "opensearch",
        help="OpenSearch setup: install templates, rebuild the index behind its aliases, check the cluster",
        description="Manage the OpenSearch backend (settings: SHOPSEARCH_OPENSEARCH__*).",
    )
    sub = p.add_subparsers(dest="opensearch_command", metavar="ACTION")

    init = sub.add_parser("init", help="install component/index templates and the search pipeline (idempotent)")
    _common(init)
    init.set_defaults(func=run_init)

    reindex = sub.add_parser(
        "reindex",
        help="build a new versioned index from a catalog (JSONL, CSV, Parquet), verify it, swap both aliases",
        description="Validate, embed and bulk-load a whole catalog into a new index, the same way "
        "`shopsearch index` writes (dead letters, --map, the embedding cache), then swap the aliases.",
    )
    reindex.add_argument("file", metavar="FILE", help='catalog path, or "-" for stdin')
    source_flags(reindex)
    reindex.add_argument("--keep-old", action="store_true", help="keep the previous index (default: delete)")
    reindex.add_argument("--batch-size", type=int, default=256, help="products per embedding batch")
    reindex.add_argument(
        "--max-failures", type=int, default=0, help="documents the cluster may reject before aborting (0)"
    )
    reindex.add_argument("--no-embedding-cache", action="store_true", help="embed every text afresh")
    _common(reindex)
    reindex.set_defaults(func=run_reindex)

    check = sub.add_parser("check", help="report version, plugins (k-NN, neural-search), analyzer, aliases")
    _common(check)
    check.set_defaults(func=run_check)

    templates = sub.add_parser("templates", help="print (or write) the template and pipeline bodies as JSON")
    templates.add_argument("--out", help="directory to write the JSON files to (default: print)")
    templates.add_argument("--analyzer", default="smartcn", help="words analyzer to render (smartcn)")
    templates.add_argument("--dim", type=int, default=1024, help="vector dimension (1024 = bge-large-zh)")
    templates.set_defaults(func=run_templates)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="OpenSearch URL(s), comma-separated (env SHOPSEARCH_OPENSEARCH__URL)")
    p.add_argument("--embedder", help="hub id, local directory, or none for BM25 only (env SHOPSEARCH_EMBEDDER)")
    p.add_argument("--dim", type=int, help="vector dimension (default: the embedder's; none when disabled)")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {"backend": "opensearch", "embedder": getattr(args, "embedder", None)}
    settings = load_settings(args, **overrides)
    if getattr(args, "url", None):
        cfg = settings.opensearch.model_copy(update={"url": [u.strip() for u in args.url.split(",") if u.strip()]})
        settings = settings.model_copy(update={"opensearch": cfg})
    return settings


def _dim(args: argparse.Namespace, settings: Settings, embedder: Any = None) -> int | None:
    if args.dim is not None:
        if args.dim < 1:
            raise CliError(f"--dim must be positive, got {args.dim}", EXIT_USAGE)
        return args.dim
    if embedder is None:
        embedder = load_embedder(settings)
    return None if embedder is None else int(embedder.dim)


def _backend(settings: Settings, dim: int | None) -> Any:
    from middleware.backends.opensearch import OpenSearchBackend

    try:
        return OpenSearchBackend.from_settings(settings, dim=dim)
    except BackendError as err:
        raise CliError(str(err)) from None


def run_init(args: argparse.Namespace) -> int:
    from middleware.backends import opensearch_admin

    settings = _settings(args)
    backend = _backend(settings, _dim(args, settings))
    try:
        report = opensearch_admin.install(backend)
    except (BackendError, ValueError) as err:
        raise CliError(str(err)) from None
    finally:
        backend.close()
    print(report.render())
    return EXIT_OK if report.ok else EXIT_FATAL


def run_check(args: argparse.Namespace) -> int:
    from middleware.backends import opensearch_admin

    settings = _settings(args)
    dim = args.dim if args.dim is not None else (1 if settings.embedder_enabled else None)
    backend = _backend(settings, dim)  # only "is a vector expected" matters for the check
    try:
        report = opensearch_admin.check(backend)
    except BackendError as err:
        raise CliError(str(err)) from None
    finally:
        backend.close()
    print(report.render())
    return EXIT_OK if report.ok else EXIT_FATAL


def run_reindex(args: argparse.Namespace) -> int:
    from loaders.embed_cache import EmbeddingCache
    from loaders.indexer import Indexer
    from loaders.report import Summary
    from loaders.sources import SourceError
    from loaders.validate import DeadLetters
    from middleware.backends import opensearch_admin
    from middleware.backends.base import EmbedderMismatch
    from middleware.cli.index import dead_letter_path, embedding_cache_path, source_rows

    if args.batch_size < 1 or args.max_failures < 0:
        raise CliError("--batch-size must be >= 1 and --max-failures >= 0", EXIT_USAGE)
    settings = _settings(args)
    rows = source_rows(args, Product.model_fields)
    embedder = load_embedder(settings)
    dim = _dim(args, settings, embedder)
    backend = _backend(settings, dim)
    dead_letters = DeadLetters(dead_letter_path(args, settings))
    cache = None
    summary = Summary(command="reindex", source=args.file)
    try:
        if embedder is not None and not args.no_embedding_cache:
            cache = EmbeddingCache(embedding_cache_path(settings), embedder.model_id, embedder.dim)
        indexer = Indexer(embedder, cache=cache, batch_size=args.batch_size)
        report = opensearch_admin.rebuild(
            backend,
            lambda target: indexer.fill(rows, target, dead_letters=dead_letters, summary=summary),
            keep_old=args.keep_old,
            max_failures=args.max_failures,
            progress=print,
            embedder=indexer.binding,
        )
    except EmbedderMismatch as err:
        raise CliError(str(err)) from None
    except SourceError as err:
        raise CliError(f"{err}; nothing was swapped", EXIT_FATAL) from None
    except (BackendError, ValueError, OSError) as err:
        raise CliError(str(err)) from None
    finally:
        dead_letters.close()
        if cache is not None:
            cache.close()
        backend.close()
    summary.finish(report.seconds)
    summary.dead_letter_path = str(dead_letters.path) if dead_letters.count else None
    print(report.render())
    for line in summary.lines():  # the rows read: rejected, duplicates, cut fields, cache hits
        print(line)
    if dead_letters.first is not None:
        first = dead_letters.first
        print(
            f"shopsearch: {summary.rejected} rows rejected; first: line {first.line}: {first.reason} "
            f"(all in {dead_letters.path})",
            file=sys.stderr,
        )
        return EXIT_REJECTED
    return EXIT_OK


def template_files(settings: Settings, dim: int | None, analyzer: str) -> dict[str, dict[str, Any]]:
    """file name -> JSON body, as `index_templates/` holds them."""
    from middleware.backends import opensearch_bodies as bodies

    cfg = settings.opensearch
    files: dict[str, dict[str, Any]] = {}
    for name, body in bodies.component_templates(cfg, dim, analyzer).items():
        files[f"component_template.{name}.json"] = body
    files[f"index_template.{bodies.index_template_name(cfg)}.json"] = bodies.index_template(cfg, with_vector=bool(dim))
    for technique in ("min_max", "l2", "z_score", "rrf"):
        variant = cfg.model_copy(update={"hybrid_normalization": technique})
        files[f"search_pipeline.{technique}.json"] = bodies.search_pipeline(variant, settings.fusion)
    from middleware.events.opensearch import index_templates as event_templates

    for name, body in event_templates(settings.events).items():  # the event log's indexes (UBI's names)
        files[f"index_template.{name}.json"] = body
    return files


def run_templates(args: argparse.Namespace) -> int:
    settings = Settings()
    if args.dim < 1:
        raise CliError(f"--dim must be positive, got {args.dim}", EXIT_USAGE)
    try:
        files = template_files(settings, args.dim, args.analyzer)
    except ValueError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    if not args.out:
        print(json.dumps(files, ensure_ascii=False, indent=2))
        return EXIT_OK
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (out / name).write_text(json.dumps(body, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(files)} files to {out}")
    return EXIT_OK
