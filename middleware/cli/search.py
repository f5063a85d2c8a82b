"""`shopsearch search` and `shopsearch demo`."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from middleware.cli import EXIT_OK, EXIT_USAGE, CliError, load_settings
from middleware.products import Filters, Product, describe_validation_error
from middleware.schema import SearchRequest, SearchResponse

DEMO_QUERY = "适合送女友的轻奢小众手表"
FILTER_KEYS = ("category", "brand", "price_min", "price_max", "in_stock", "ids")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("search", help="search the indexed products")
    p.add_argument("query", help="the shopper's query text")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="category=手表 | brand=Casio,Omega | price_min=100 | price_max=2000 | in_stock=true | ids=a,b "
        "(repeatable; lists are comma-separated and match any)",
    )
    p.add_argument("--size", type=int, default=10, help="hits to show (default 10)")
    p.add_argument("--from", dest="from_", type=int, default=0, help="offset of the first hit")
    p.add_argument("--retrieval", choices=["hybrid", "bm25", "vector"], default="hybrid")
    p.add_argument("--fusion", choices=["rrf", "minmax"], help="default: the configured method")
    p.add_argument("--no-rerank", action="store_true", help="skip the cross-encoder")
    p.add_argument("--explain", action="store_true", help="show every stage's score")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    _model_flags(p)
    p.set_defaults(func=run_search)

    d = subparsers.add_parser(
        "demo",
        help="index a small sample catalog and compare keyword, vector, hybrid and hybrid+rerank",
    )
    d.add_argument("--query", action="append", help=f"query to run (repeatable; default {DEMO_QUERY!r})")
    d.add_argument("--size", type=int, default=8, help="hits per column (default 8)")
    d.add_argument("--catalog", help="JSONL catalog to use instead of the bundled sample")
    d.add_argument("--json", action="store_true", help="print the rankings as JSON")
    _model_flags(d)
    d.set_defaults(func=run_demo)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embedder", help="hub id, local directory, or none (env SHOPSEARCH_EMBEDDER)")
    p.add_argument("--reranker", help="hub id, local directory, or none (env SHOPSEARCH_RERANKER)")


def parse_filters(items: list[str]) -> Filters | None:
    """`KEY=VALUE` flags → Filters; a bad key or value is a usage error naming it."""
    if not items:
        return None
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in FILTER_KEYS:
            raise CliError(
                f"--filter {item!r}: expected KEY=VALUE with KEY one of {', '.join(FILTER_KEYS)}", EXIT_USAGE
            )
        if key in {"category", "brand", "ids"}:
            values.setdefault(key, []).extend(v.strip() for v in raw.split(",") if v.strip())
        elif key == "in_stock":
            if raw.strip().lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise CliError(f"--filter in_stock={raw!r}: expected true or false", EXIT_USAGE)
            values[key] = raw.strip().lower() in {"true", "1", "yes"}
        else:
            values[key] = raw.strip()
    try:
        return Filters.model_validate(values)
    except ValidationError as err:
        raise CliError(f"--filter: {describe_validation_error(err)}", EXIT_USAGE) from None


def run_search(args: argparse.Namespace) -> int:
    settings = load_settings(args, embedder=args.embedder, reranker=args.reranker)
    try:
        request = SearchRequest(
            query=args.query,
            filters=parse_filters(args.filter),
            size=args.size,
            **{"from": args.from_},
            retrieval=args.retrieval,
            fusion=args.fusion,
            rerank=not args.no_rerank,
            explain=args.explain,
        )
    except ValidationError as err:
        raise CliError(describe_validation_error(err), EXIT_USAGE) from None
    from middleware.cli.store import open_pipeline

    pipeline, settings = open_pipeline(settings)
    try:
        if request.retrieval == "vector" and pipeline.embedder is None:
            raise CliError("--retrieval vector needs an embedder: pass --embedder or use bm25/hybrid", EXIT_USAGE)
        if pipeline.backend.count() == 0:
            raise CliError(f"no products indexed in {settings.data_dir}: run `shopsearch index CATALOG` first")
        try:
            response = pipeline.search(request)
        except ValueError as err:  # a request the store or models cannot serve
            raise CliError(str(err), EXIT_USAGE) from None
    finally:
        pipeline.close()
    if args.json:
        print(response.model_dump_json(indent=2))
    else:
        print_response(response, explain=args.explain)
    return EXIT_OK


def print_response(response: SearchResponse, *, explain: bool) -> None:
    header = ["#", "id", "score", "title", "price", "sales", "stock"]
    if explain:
        header += ["bm25", "knn", "fused", "rerank", "relevance", "sales_bonus", "stock_penalty"]
    rows = []
    for rank, hit in enumerate(response.hits, start=1):
        p = hit.product
        row = [
            str(rank),
            hit.id,
            f"{hit.score:.4f}",
            _clip(p.get("title", ""), 36),
            _num(p.get("price")),
            _num(p.get("sales")),
            _num(p.get("stock")),
        ]
        if explain and hit.explain is not None:
            e = hit.explain
            row += [_num(e.bm25), _num(e.knn), _num(e.fused), _num(e.rerank)]
            row += [_num(e.relevance), _num(e.sales_bonus), _num(e.stock_penalty)]
        rows.append(row)
    print(_table(header, rows))
    timings = "  ".join(f"{k} {v:.1f}ms" for k, v in response.timings_ms.items())
    print(
        f"\n{response.total} matches ({response.relation}), {response.reranked} reranked, "
        f"took {response.took_ms:.1f} ms ({timings})"
    )
    if response.degraded:
        print(f"degraded: {', '.join(response.degraded)}")


# --- demo -------------------------------------------------------------------------------------------

DEMO_MODES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("keyword (BM25)", {"retrieval": "bm25", "rerank": False, "business_enabled": False}),
    ("vector (kNN)", {"retrieval": "vector", "rerank": False, "business_enabled": False}),
    ("hybrid (RRF)", {"retrieval": "hybrid", "rerank": False, "business_enabled": False}),
    ("hybrid + rerank + business", {"retrieval": "hybrid", "rerank": True, "business_enabled": True}),
)


def load_demo_catalog(path: str | None) -> list[Product]:
    if path:
        text = Path(path).read_text(encoding="utf-8")
    else:
        text = resources.files("middleware.data").joinpath("demo_catalog.jsonl").read_text(encoding="utf-8")
    products = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            products.append(Product.model_validate_json(line))
        except ValidationError as err:
            print(f"shopsearch: catalog line {line_no} skipped: {describe_validation_error(err)}", file=sys.stderr)
    return products


def run_demo(args: argparse.Namespace) -> int:
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.pipeline import Pipeline

    settings = load_settings(args, embedder=args.embedder, reranker=args.reranker)
    if not settings.embedder_enabled:
        raise CliError("the demo compares vector search too: set an embedder (--embedder PATH)", EXIT_USAGE)
    demo_dir = Path(settings.data_dir) / "demo"
    settings = settings.model_copy(update={"data_dir": demo_dir})
    products = load_demo_catalog(args.catalog)
    queries = args.query or [DEMO_QUERY]

    from middleware.models import ModelLoadError, load_embedder, load_reranker

    try:
        embedder = load_embedder(settings)
        reranker = load_reranker(settings)
    except ModelLoadError as err:
        raise CliError(str(err)) from None
    assert embedder is not None
    shutil.rmtree(demo_dir, ignore_errors=True)  # the demo store is rebuilt from the sample every run
    backend = EmbeddedBackend(demo_dir, dim=embedder.dim)
    backend.upsert(products, embedder.encode_documents([p.embedding_text() for p in products]))
    pipeline = Pipeline(settings, backend, embedder, reranker)

    report: dict[str, Any] = {
        "embedder": settings.embedder,
        "reranker": settings.reranker if reranker is not None else None,
        "products": len(products),
        "queries": {},
    }
    try:
        for query in queries:
            columns: dict[str, list[str]] = {}
            for name, options in DEMO_MODES:
                if options["rerank"] and reranker is None:
                    name = "hybrid + business (no reranker)"
                response = pipeline.search(SearchRequest(query=query, size=args.size, **options))
                columns[name] = [f"{h.product['title']}" for h in response.hits]
            report["queries"][query] = columns
    finally:
        pipeline.close()

    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return EXIT_OK
    print(f"{len(products)} sample products · embedder {settings.embedder} · reranker {report['reranker']}")
    if reranker is None:
        print("(reranker disabled: set SHOPSEARCH_RERANKER or --reranker to compare the rerank stage)")
    for query, columns in report["queries"].items():
        print(f"\nquery: {query}\n")
        names = list(columns)
        rows = [
            [str(i + 1)] + [_clip(columns[n][i] if i < len(columns[n]) else "", 24) for n in names]
            for i in range(args.size)
        ]
        print(_table(["#", *names], rows))
    return EXIT_OK


# --- plain tables that line up with CJK text (two columns per wide character) ------------------------


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    if _width(text) <= width:
        return text
    out, used = "", 0
    for ch in text:
        w = _width(ch)
        if used + w > width - 1:
            break
        out, used = out + ch, used + w
    return out + "…"


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(_width(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(_pad(h, w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(_pad(c, w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
