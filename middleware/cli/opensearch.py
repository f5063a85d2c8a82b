"""`shopsearch opensearch init | reindex FILE | check | templates`: cluster setup and zero-downtime rebuilds."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from middleware.backends.base import BackendError
from middleware.cli import EXIT_FATAL, EXIT_OK, EXIT_USAGE, CliError, load_settings
from middleware.config import Settings
from middleware.products import Product, describe_validation_error

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
        help="build a new versioned index from a JSONL catalog, verify it, swap both aliases atomically",
    )
    reindex.add_argument("file", metavar="FILE", help="JSONL catalog, one product per line")
    reindex.add_argument("--keep-old", action="store_true", help="keep the previous index (default: delete)")
    reindex.add_argument("--batch-size", type=int, default=256, help="products per embedding batch")
    reindex.add_argument(
        "--max-failures", type=int, default=0, help="documents the cluster may reject before aborting (0)"
    )
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


def _load_embedder(settings: Settings) -> Any:
    if not settings.embedder_enabled:
        return None
    try:
        from middleware.models import ModelLoadError, load_embedder
    except ImportError as err:
        raise CliError(f"embedder support is not available ({err}); set SHOPSEARCH_EMBEDDER=none") from None
    try:
        return load_embedder(settings)
    except ModelLoadError as err:
        raise CliError(str(err)) from None


def _dim(args: argparse.Namespace, settings: Settings, embedder: Any = None) -> int | None:
    if args.dim is not None:
        if args.dim < 1:
            raise CliError(f"--dim must be positive, got {args.dim}", EXIT_USAGE)
        return args.dim
    if embedder is None:
        embedder = _load_embedder(settings)
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


def read_jsonl(path: Path, rejected: list[str]) -> Iterator[Product]:
    """Products from a JSONL file; bad lines are recorded in `rejected` as "line N: reason"."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield Product.model_validate(json.loads(line))
            except json.JSONDecodeError as err:
                rejected.append(f"line {number}: invalid JSON ({err.msg})")
            except ValidationError as err:
                rejected.append(f"line {number}: {describe_validation_error(err)}")


def _embedded(products: Iterator[Product], embedder: Any, batch: int) -> Iterator[tuple[Product, np.ndarray | None]]:
    chunk: list[Product] = []

    def flush() -> Iterator[tuple[Product, np.ndarray | None]]:
        if embedder is None:
            yield from ((p, None) for p in chunk)
            return
        vectors = embedder.encode_documents([p.embedding_text() for p in chunk])
        yield from zip(chunk, vectors, strict=True)

    for product in products:
        chunk.append(product)
        if len(chunk) >= batch:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()


def run_reindex(args: argparse.Namespace) -> int:
    from middleware.backends import opensearch_admin

    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"catalog file not found: {path}", EXIT_USAGE)
    if args.batch_size < 1 or args.max_failures < 0:
        raise CliError("--batch-size must be >= 1 and --max-failures >= 0", EXIT_USAGE)
    settings = _settings(args)
    embedder = _load_embedder(settings)
    dim = _dim(args, settings, embedder)
    backend = _backend(settings, dim)
    rejected: list[str] = []
    try:
        report = opensearch_admin.reindex(
            backend,
            _embedded(read_jsonl(path, rejected), embedder, args.batch_size),
            keep_old=args.keep_old,
            max_failures=args.max_failures,
            progress=print,
        )
    except (BackendError, ValueError, OSError, UnicodeDecodeError) as err:
        raise CliError(str(err)) from None
    finally:
        backend.close()
    print(report.render())
    if rejected:
        print(f"shopsearch: {len(rejected)} rows rejected; first: {rejected[0]}", file=sys.stderr)
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
