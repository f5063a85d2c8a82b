"""`shopsearch models check`: load the configured embedder and reranker (local or a model server) and
say, one line each, whether they work and whether the embedder's vectors fit the store."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from middleware.cli import EXIT_FATAL, EXIT_OK, load_settings
from middleware.config import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="check the configured embedder and reranker (local models or model servers)",
        description="Model diagnostics (SHOPSEARCH_EMBEDDER*, SHOPSEARCH_RERANKER*, SHOPSEARCH_REMOTE_MODELS__*).",
    )
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    check = sub.add_parser(
        "check",
        help="load each model, embed / score one probe, compare the dimension with the store",
        description="One line per model: ok, or what is wrong and which setting to change. Exit 1 on any failure.",
    )
    check.add_argument("--embedder", help="override SHOPSEARCH_EMBEDDER (hub id, directory, URL, or none)")
    check.add_argument("--reranker", help="override SHOPSEARCH_RERANKER (hub id, directory, URL, or none)")
    check.add_argument("--json", action="store_true", help="print the results as JSON")
    check.set_defaults(func=run_check)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _where(model: Any) -> str:
    url = getattr(model, "url", None)
    api = getattr(model, "api", None)
    return f" at {url} ({api})" if url else f" ({getattr(model, 'runtime', '?')}, {getattr(model, 'device', '?')})"


def _store_dim(settings: Settings) -> tuple[int | None, Any, str | None]:
    """The vector dimension the configured store holds (None: no vectors yet), its recorded embedder
    binding (None: never bound), and a note when the store could not be read (a store problem is
    `shopsearch opensearch check`'s, not ours)."""
    if settings.backend == "embedded":
        from middleware.backends.embedded import DB_NAME, EmbeddedBackend

        if not (settings.data_dir / DB_NAME).is_file():
            return None, None, None  # nothing indexed yet: any dimension fits
        backend: Any = None
        try:
            backend = EmbeddedBackend(settings.data_dir)
            stats = backend.stats()
        except Exception as err:  # a broken store is reported, not a model failure
            return None, None, f"store: cannot read {settings.data_dir}: {err}"
        finally:
            if backend is not None:
                backend.close()
    else:
        from middleware.backends import open_backend

        try:
            backend = open_backend(settings)
            try:
                stats = backend.stats()
            finally:
                backend.close()
        except Exception as err:
            return None, None, f"store: cannot read the OpenSearch index ({err}); dimension not compared"
    dim = stats.get("dim") if isinstance(stats, dict) else getattr(stats, "dim", None)
    binding = getattr(stats, "embedder", None)
    return (int(dim) if isinstance(dim, int) else None), binding, None


def _check_embedder(settings: Settings) -> dict[str, Any]:
    from middleware.models import ModelLoadError, load_embedder

    if not settings.embedder_enabled:
        return {"model": "embedder", "ok": True, "line": "embedder: none (BM25 only)"}
    started = time.perf_counter()
    try:
        embedder = load_embedder(settings)
    except (ModelLoadError, OSError, ValueError) as err:
        return {"model": "embedder", "ok": False, "line": f"embedder: FAIL {err}"}
    assert embedder is not None
    try:
        took_ms = (time.perf_counter() - started) * 1000
        result: dict[str, Any] = {"model": "embedder", "ok": True, "model_id": embedder.model_id, "dim": embedder.dim}
        store_dim, binding, note = _store_dim(settings)
        if note:
            result["note"] = note
        where = settings.data_dir if settings.backend == "embedded" else "the OpenSearch index"
        if binding is not None:
            result["store_embedder"] = {"model": binding.model, "dim": binding.dim}
        if binding is not None and binding.model != "none" and binding.model != embedder.model_id:
            result["ok"] = False
            result["line"] = (
                f"embedder: FAIL {embedder.model_id!r}{_where(embedder)} is not the embedder {where} was indexed "
                f"with ({binding.model!r}, {binding.dim}-d): set embedder (and embedder_model, for a model server) "
                "to that model, or re-index into a new store"
            )
        elif binding is not None and binding.dim is not None and binding.dim != embedder.dim:
            result["ok"] = False
            result["line"] = (
                f"embedder: FAIL {embedder.model_id!r}{_where(embedder)} gives {embedder.dim}-d vectors but {where} "
                f"was bound to {binding.model!r} at {binding.dim}-d: the server serves another model under that name"
            )
        elif store_dim is not None and store_dim != embedder.dim:
            result["ok"] = False
            result["line"] = (
                f"embedder: FAIL {embedder.model_id!r}{_where(embedder)} gives {embedder.dim}-d vectors but {where} "
                f"holds {store_dim}-d vectors: set embedder (and embedder_model) to the model the store was "
                "indexed with, or re-index into a new store"
            )
        else:
            result["line"] = f"embedder: ok {embedder.model_id!r}{_where(embedder)}, {embedder.dim}-d, {took_ms:.0f} ms"
        return result
    finally:
        close = getattr(embedder, "close", None)
        if callable(close):
            close()


def _check_reranker(settings: Settings) -> dict[str, Any]:
    from middleware.models import ModelLoadError, load_reranker

    if not settings.reranker_enabled:
        return {"model": "reranker", "ok": True, "line": "reranker: none (fused order)"}
    started = time.perf_counter()
    try:
        reranker = load_reranker(settings)
        assert reranker is not None
        reranker.score("probe", ["probe"])  # remote rerankers probe at load already; local ones run once here
    except (ModelLoadError, OSError, ValueError) as err:
        return {"model": "reranker", "ok": False, "line": f"reranker: FAIL {err}"}
    took_ms = (time.perf_counter() - started) * 1000
    close = getattr(reranker, "close", None)
    if callable(close):
        close()
    return {
        "model": "reranker",
        "ok": True,
        "model_id": reranker.model_id,
        "line": f"reranker: ok {reranker.model_id!r}{_where(reranker)}, {took_ms:.0f} ms",
    }


def run_check(args: argparse.Namespace) -> int:
    settings = load_settings(args, embedder=args.embedder, reranker=args.reranker)
    results = [_check_embedder(settings), _check_reranker(settings)]
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
    else:
        for result in results:
            print(result["line"])
            if result.get("note"):
                print(result["note"])
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_FATAL
