"""`shopsearch index`, `update-signals`, `delete` and `stats`: the catalog loader's command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from loaders.pipeline import DEFAULT_MAX_PRUNE_SHARE
from middleware.cli import EXIT_OK, EXIT_USAGE, CliError, load_settings
from middleware.cli.store import open_store, require_store
from middleware.config import Settings

EXIT_REJECTED = 3  # some rows were rejected (or not found); every valid row was applied
EXIT_PRUNE_REFUSED = 4  # every row was indexed, but the snapshot looked incomplete: nothing was pruned

EXIT_CODES = """\
exit codes:
  0  every row was indexed (or applied)
  3  some rows were rejected (see the dead-letter file) or, for update-signals, named unknown ids;
     every valid row was indexed
  4  index --prune: every row was indexed but the prune was refused (the reason is on stderr)
  1  fatal: backend unreachable, model missing, source unreadable mid-way; the reason is on stderr.
     Committed batches stay committed: run again with --resume to continue
  2  usage error: bad option, missing file, unknown format or encoding
"""

INDEX_EPILOG = (
    """\
Sources: JSONL, CSV (with a header row) or Parquet, by extension or --format; FILE "-" reads stdin.
Rows that fail validation go to the dead-letter file as {"line", "raw", "reason"}; blank lines are
skipped; a later row with an id seen before updates that product. Products whose content is
unchanged are neither re-embedded nor rewritten (price/sales/stock changes are applied in place),
and texts embedded before are read from <data_dir>/cache/embeddings.sqlite.

--resume continues after the last committed batch of a run that crashed or was killed (the
checkpoint lives in <data_dir>/checkpoints/). Re-running a whole file is always safe: products are
upserted by id.

--prune deletes stored products whose id is not in FILE, treating FILE as a full catalog snapshot.
It runs only after the whole file was read and indexed, and is refused when any row was rejected
(a malformed row's product would otherwise be deleted though it is still on sale) or when it would
delete more than --max-prune-share of the stored products (default 0.5: a truncated export looks
like a mass delisting). --force-prune lifts both. A snapshot with no valid product (an empty or
header-only file) is always refused.

"""
    + EXIT_CODES
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index",
        help="load a catalog (JSONL, CSV, Parquet) into the store",
        description="Validate, embed and upsert a product catalog.",
        epilog=INDEX_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help='catalog path, or "-" for stdin')
    source_flags(p)
    p.add_argument("--embedder", help="hub id, local directory, or none for BM25 only (env SHOPSEARCH_EMBEDDER)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows per embed + write batch (default 512; 2048 with --embedder none)",
    )
    p.add_argument("--resume", action="store_true", help="continue after the last committed batch of FILE")
    p.add_argument("--prune", action="store_true", help="delete stored products absent from FILE (a snapshot)")
    p.add_argument(
        "--force-prune", action="store_true", help="prune even when rows were rejected or most products would go"
    )
    p.add_argument(
        "--max-prune-share",
        type=float,
        default=DEFAULT_MAX_PRUNE_SHARE,
        metavar="F",
        help=f"refuse a prune deleting more than this share of the store (default {DEFAULT_MAX_PRUNE_SHARE})",
    )
    p.add_argument("--no-embedding-cache", action="store_true", help="embed every changed text afresh")
    p.add_argument(
        "--force-merge",
        action="store_true",
        help="when the load is done, merge the lexical index into one segment (see `shopsearch force-merge`)",
    )
    _output_flags(p)
    p.set_defaults(func=run_index)

    m = subparsers.add_parser(
        "force-merge",
        help="merge the lexical index into one segment: faster searches after loads and many small writes",
        description="Merge the lexical index's segments into one (OpenSearch: one per shard, `_forcemerge`). "
        "Each segment is searched on its own, so a store written in many commits searches slower. Searches "
        "and writes go on during the merge; what writes change is searchable once it ends. The embedded "
        "store rewrites its lexical index from SQLite, about three seconds per 100,000 products. Only the "
        "process that writes the store merges: with `shopsearch serve` running on the data dir, this asks "
        "the server's process and waits for its merge (refused if it has not started within 10 s).",
        epilog="exit codes: 0 merged (or nothing to merge); 1 the backend failed or refused; 2 usage",
    )
    m.add_argument("--json", action="store_true", help="print the result as JSON")
    m.set_defaults(func=run_force_merge)

    s = subparsers.add_parser(
        "update-signals",
        help="apply price/sales/stock changes by id (no re-embedding)",
        description="Apply price, sales and stock changes by product id. Text and vectors are never touched. "
        "Rows need an id and at least one of price, sales, stock; rows for unknown ids go to the "
        "dead-letter file.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("file", metavar="FILE", help='changes file, or "-" for stdin')
    source_flags(s)
    s.add_argument("--batch-size", type=int, default=1000, help="updates per write (default 1000)")
    _output_flags(s)
    s.set_defaults(func=run_update_signals)

    d = subparsers.add_parser(
        "delete",
        help="delete products by id",
        epilog="exit codes: 0 done (ids not in the store are counted, not errors); 1 fatal; 2 usage",
    )
    d.add_argument("--ids", help="comma-separated product ids")
    d.add_argument("--ids-file", help='file with one id per line ("-" for stdin)')
    d.add_argument("--json", action="store_true", help="print the result as JSON")
    d.set_defaults(func=run_delete)

    t = subparsers.add_parser("stats", help="products, vectors, size on disk, models, last indexing run")
    t.add_argument("--json", action="store_true", help="print as JSON")
    t.set_defaults(func=run_stats)


def source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["jsonl", "csv", "parquet"], help="default: from the file extension")
    p.add_argument("--encoding", default="utf-8", help="text encoding of JSONL/CSV, e.g. gbk (default utf-8)")
    p.add_argument(
        "--map",
        metavar="FIELD=COLUMN,...",
        help="take product fields from differently named columns, e.g. title=name,sales=sold_count",
    )
    p.add_argument("--dead-letter", metavar="PATH", help="rejected rows (default <data_dir>/dead-letters/<time>.jsonl)")


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", metavar="PATH", help="also write the run summary as JSON here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="S", help="log interval off a terminal")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


# ---------------------------------------------------------------------------------------------- helpers


def loader_dir(settings: Settings) -> Path:
    """Loader bookkeeping (the last runs' summaries) beside the store, outside the backend's own files."""
    return Path(settings.data_dir) / "loader"


def embedding_cache_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / "cache" / "embeddings.sqlite"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def source_rows(args: argparse.Namespace, fields: Any):
    from loaders.sources import SourceError, detect_format, parse_mapping, read_rows

    try:
        fmt = detect_format(args.file, args.format)
        mapping = parse_mapping(args.map, fields)
    except SourceError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    if args.file != "-" and not os.path.isfile(args.file):
        raise CliError(f"no such file: {args.file}", EXIT_USAGE)
    import codecs

    try:
        codecs.lookup(args.encoding)
    except LookupError:
        raise CliError(f"unknown encoding {args.encoding!r}", EXIT_USAGE) from None
    if args.batch_size is not None and args.batch_size < 1:
        raise CliError("--batch-size must be at least 1", EXIT_USAGE)
    return read_rows(args.file, fmt, encoding=args.encoding, mapping=mapping)


def dead_letter_path(args: argparse.Namespace, settings: Settings, previous: str | None = None) -> Path:
    if args.dead_letter:
        return Path(args.dead_letter)
    if previous:
        return Path(previous)  # a resumed run continues its first attempt's file
    stamp = time.strftime("%Y%m%dT%H%M%S")
    return Path(settings.data_dir) / "dead-letters" / f"{stamp}-{os.getpid()}.jsonl"


def _finish(args: argparse.Namespace, settings: Settings, summary: Any, merged: dict[str, Any] | None = None) -> None:
    from loaders.checkpoint import atomic_write_json

    record = summary.to_dict()
    if merged is not None:
        record["force_merge"] = merged
    atomic_write_json(loader_dir(settings) / f"last-{summary.command}.json", record)  # shown by `stats`
    if args.report:
        try:
            atomic_write_json(Path(args.report), record)
        except OSError as err:
            print(f"shopsearch: cannot write --report {args.report}: {err}", file=sys.stderr)
    if args.json:
        print(json.dumps(record, ensure_ascii=False, indent=2))
    else:
        for line in summary.lines():
            print(line)
        if merged is not None:
            print(_merge_line(merged))
    if summary.prune_refused:
        print(f"shopsearch: prune refused: {summary.prune_refused}", file=sys.stderr)


def run_guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Expected failures in the middle of a run → CliError (one line on stderr, no traceback)."""
    from loaders.sources import SourceError
    from middleware.backends import BackendError
    from middleware.backends.base import EmbedderMismatch
    from middleware.models import ModelLoadError

    try:
        return fn(*args, **kwargs)
    except EmbedderMismatch as err:
        raise CliError(str(err)) from None
    except SourceError as err:
        raise CliError(f"{err} (batches before it are committed; re-running the fixed file is safe)") from None
    except BackendError as err:
        raise CliError(f"backend failed: {err} (committed batches are kept; use --resume)") from None
    except ModelLoadError as err:
        raise CliError(str(err)) from None
    except OSError as err:
        raise CliError(f"I/O error: {err}") from None


# ---------------------------------------------------------------------------------------------- commands


def run_index(args: argparse.Namespace) -> int:
    from loaders.checkpoint import Checkpoint
    from loaders.embed_cache import EmbeddingCache
    from loaders.indexer import Indexer
    from loaders.report import Progress, Summary
    from loaders.validate import DeadLetters
    from middleware.cli.store import bound_settings, load_embedder
    from middleware.products import Product

    settings = load_settings(args, embedder=args.embedder)
    if args.force_prune and not args.prune:
        raise CliError("--force-prune needs --prune", EXIT_USAGE)
    if not 0.0 <= args.max_prune_share <= 1.0:
        raise CliError(f"--max-prune-share must be between 0 and 1, got {args.max_prune_share}", EXIT_USAGE)
    if args.resume and args.file == "-":
        raise CliError("--resume needs a file: stdin cannot be re-read", EXIT_USAGE)
    rows = source_rows(args, Product.model_fields)

    backend = open_store(settings)  # the dimension comes from the binding the indexer records
    cache = None
    dead_letters = None
    try:
        settings = bound_settings(settings, backend)  # a bound store keeps its embedder by default
        embedder = load_embedder(settings)
        checkpoint = Checkpoint(Path(settings.data_dir) / "checkpoints", args.file) if args.file != "-" else None
        state = checkpoint.load() if (checkpoint is not None and args.resume) else None
        if args.resume and state is None:
            print(f"shopsearch: no checkpoint for {args.file}: indexing from the start", file=sys.stderr)
        dead_letters = DeadLetters(dead_letter_path(args, settings, (state or {}).get("dead_letter_path")))
        if embedder is not None and not args.no_embedding_cache:
            cache = EmbeddingCache(embedding_cache_path(settings), embedder.model_id, embedder.dim)
        indexer = Indexer(embedder, cache=cache, batch_size=args.batch_size)
        summary = run_guarded(
            indexer.index,
            rows,
            backend,
            dead_letters=dead_letters,
            checkpoint=checkpoint,
            resume_state=state,
            prune=args.prune,
            force_prune=args.force_prune,
            max_prune_share=args.max_prune_share,
            progress=Progress("indexing", every_s=args.progress_every, enabled=not args.quiet),
            summary=Summary(command="index", source=args.file),
        )
        merged = _force_merge(backend) if args.force_merge else None
    finally:
        if dead_letters is not None:
            dead_letters.close()
        if cache is not None:
            cache.close()
        backend.close()
    _finish(args, settings, summary, merged)
    if summary.rejected:
        return EXIT_REJECTED
    return EXIT_PRUNE_REFUSED if summary.prune_refused else EXIT_OK


def run_update_signals(args: argparse.Namespace) -> int:
    from loaders.pipeline import apply_signal_rows
    from loaders.report import Progress, Summary
    from loaders.validate import DeadLetters
    from middleware.products import SignalUpdate

    settings = load_settings(args)
    rows = source_rows(args, SignalUpdate.model_fields)
    require_store(settings)
    backend = open_store(settings)
    dead_letters = DeadLetters(dead_letter_path(args, settings))
    try:
        summary = run_guarded(
            apply_signal_rows,
            rows,
            backend,
            dead_letters=dead_letters,
            batch_size=args.batch_size,
            progress=Progress("updating", every_s=args.progress_every, enabled=not args.quiet),
            summary=Summary(command="update-signals", source=args.file),
        )
    finally:
        dead_letters.close()
        backend.close()
    _finish(args, settings, summary)
    return EXIT_REJECTED if (summary.rejected or summary.not_found) else EXIT_OK


def _force_merge(backend: Any) -> dict[str, Any]:
    from middleware.backends import BackendError

    started = time.monotonic()
    try:
        before, after = backend.force_merge()
    except BackendError as err:
        raise CliError(str(err)) from None
    return {"segments_before": before, "segments_after": after, "seconds": round(time.monotonic() - started, 2)}


def _merge_line(result: dict[str, Any]) -> str:
    return f"lexical segments {result['segments_before']} -> {result['segments_after']} ({result['seconds']} s)"


def run_force_merge(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    require_store(settings)
    backend = open_store(settings)
    try:
        result = _force_merge(backend)
    finally:
        backend.close()
    print(json.dumps(result) if args.json else _merge_line(result))
    return EXIT_OK


def run_delete(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    ids: list[str] = []
    if args.ids:
        ids.extend(i.strip() for i in args.ids.split(",") if i.strip())
    if args.ids_file:
        try:
            if args.ids_file == "-":
                lines = sys.stdin.read().splitlines()
            else:
                lines = Path(args.ids_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise CliError(f"cannot read --ids-file {args.ids_file}: {err}", EXIT_USAGE) from None
        ids.extend(line.strip() for line in lines if line.strip())
    if not args.ids and not args.ids_file:
        raise CliError("delete needs --ids a,b,c or --ids-file FILE", EXIT_USAGE)
    ids = list(dict.fromkeys(ids))
    require_store(settings)
    backend = open_store(settings)
    deleted = 0
    try:
        for i in range(0, len(ids), 1000):
            deleted += run_guarded(backend.delete, ids[i : i + 1000])
    finally:
        backend.close()
    result = {"requested": len(ids), "deleted": deleted, "not_found": len(ids) - deleted}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"deleted {deleted} of {len(ids)} ids ({len(ids) - deleted} not in the store)")
    return EXIT_OK


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed while walking
                total += (Path(root) / name).stat().st_size
    return total


def run_stats(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    data_dir = Path(settings.data_dir)
    require_store(settings)
    backend = open_store(settings)
    try:
        backend_stats = run_guarded(backend.stats)
        data_dir_bytes = _dir_bytes(data_dir) if data_dir.is_dir() else 0  # measured while open, as the backend's
    finally:
        backend.close()
    cache_path = embedding_cache_path(settings)
    result: dict[str, Any] = {
        "backend": settings.backend,
        "data_dir": str(data_dir),
        "products": backend_stats.products,
        "vectors": backend_stats.vectors,
        "dim": backend_stats.dim,
        "bytes_on_disk": backend_stats.size_bytes,
        "data_dir_bytes": data_dir_bytes,
        "embedder": backend_stats.embedder.model if backend_stats.embedder else None,
        "reranker": settings.reranker if settings.reranker_enabled else None,
        "embedding_cache_bytes": cache_path.stat().st_size if cache_path.exists() else 0,
        "last_index_run": _read_json(loader_dir(settings) / "last-index.json"),
        "last_signal_update": _read_json(loader_dir(settings) / "last-update-signals.json"),
        "backend_stats": dataclasses.asdict(backend_stats),
    }
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2, default=str))
        return EXIT_OK
    print(f"backend      {result['backend']} ({data_dir})")
    print(f"products     {result['products']}")
    dim = f" × {result['dim']}-d" if result["dim"] else ""
    print(f"vectors      {result['vectors']}{dim}")
    print(f"index size   {_human(result['bytes_on_disk'])} (data dir {_human(result['data_dir_bytes'])})")
    print(f"embedder     {result['embedder'] or '-'}" + (f"  (dim {result['dim']})" if result["dim"] else ""))
    print(f"reranker     {result['reranker'] or 'none'} (configured)")
    print(f"emb. cache   {_human(result['embedding_cache_bytes'])}")
    for label, last in (("last index", result["last_index_run"]), ("last signals", result["last_signal_update"])):
        if not last:
            print(f"{label:<13}-")
            continue
        print(
            f"{label:<13}{last.get('source')} at {last.get('started_at')}: read {last.get('read')}, "
            f"indexed {last.get('indexed')}, updated {last.get('updated')}, unchanged {last.get('unchanged')}, "
            f"rejected {last.get('rejected')}, deleted {last.get('deleted')}, {last.get('seconds')} s, "
            f"{last.get('docs_per_second')} docs/s"
        )
    return EXIT_OK


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
