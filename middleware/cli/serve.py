"""`shopsearch serve`: the REST API and the OpenSearch-compatible proxy (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import errno
import logging
import socket
from pathlib import Path

from middleware.cli import EXIT_OK, EXIT_USAGE, CliError, load_settings
from middleware.config import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the REST API (/v1) and the OpenSearch-compatible proxy",
        description="Serve /v1/search, /v1/rerank, /v1/embed, the OpenSearch proxy routes, /healthz, "
        "/readyz and /metrics. OpenAPI docs at /v1/docs.",
    )
    p.add_argument("--host", help="address to bind (env SHOPSEARCH_SERVER__HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (env SHOPSEARCH_SERVER__PORT, default 8080)")
    p.add_argument(
        "--workers",
        type=int,
        help="processes sharing the port, each with its own models (env SHOPSEARCH_SERVER__WORKERS, default 1)",
    )
    p.add_argument("--embedder", help="hub id, local directory, or none (env SHOPSEARCH_EMBEDDER)")
    p.add_argument("--reranker", help="hub id, local directory, or none (env SHOPSEARCH_RERANKER)")
    p.add_argument(
        "--models-only",
        action="store_true",
        help="serve the models only, no store: OpenAI /v1/embeddings, TEI /embed and /rerank, Cohere /v1/rerank",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)


def _check_port(host: str, port: int) -> None:
    """Fail with one line before loading models when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise CliError(f"cannot listen on {host}:{port}: the port is in use (--port)", EXIT_USAGE) from None
            raise CliError(f"cannot listen on {host}:{port}: {err.strerror} (--host/--port)", EXIT_USAGE) from None


def _with_store_embedder(settings: Settings) -> Settings:
    """The store's recorded embedder unless one was chosen, as for every command that reads a store.

    A store that cannot be opened here is left to the pipeline, which reports it in one line."""
    from middleware.cli.store import bound_settings, embedder_chosen, open_store

    if embedder_chosen(settings) or (settings.backend == "embedded" and not Path(settings.data_dir).is_dir()):
        return settings
    try:
        backend = open_store(settings)
    except CliError:
        return settings
    try:
        return bound_settings(settings, backend)
    except CliError:
        return settings
    finally:
        backend.close()


def run_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {"embedder": args.embedder, "reranker": args.reranker}
    settings = load_settings(args, **overrides)
    server = settings.server
    flags = {"host": args.host, "port": args.port, "workers": args.workers}
    updates = {k: v for k, v in flags.items() if v is not None}
    if args.port is not None and not 1 <= args.port <= 65535:
        raise CliError(f"--port {args.port}: expected 1-65535", EXIT_USAGE)
    if args.workers is not None and not 1 <= args.workers <= 64:
        raise CliError(f"--workers {args.workers}: expected 1-64", EXIT_USAGE)
    if updates:
        settings = settings.model_copy(update={"server": server.model_copy(update=updates)})
        server = settings.server
    _check_port(server.host, server.port)
    if args.models_only:
        if server.workers > 1:
            raise CliError("--workers applies to the full service; run one models-only server per port", EXIT_USAGE)
        return _serve_models(settings, args.log_level)
    if server.workers > 1:
        return _serve_workers(_with_store_embedder(settings), args)

    import uvicorn

    from middleware.backends.base import BackendError, EmbedderMismatch
    from middleware.credentials import CredentialsError
    from middleware.models import ModelLoadError
    from middleware.pipeline import Pipeline
    from middleware.server.app import create_app
    from middleware.server.auth import ApiKeyError

    settings = _with_store_embedder(settings)
    try:
        pipeline = Pipeline.from_settings(settings)
    except ModelLoadError as err:
        raise CliError(str(err)) from None
    except EmbedderMismatch as err:
        raise CliError(f"the store and the embedder do not match: {err}", EXIT_USAGE) from None
    except BackendError as err:
        raise CliError(f"backend unavailable: {err}") from None
    except ValueError as err:  # e.g. a store of other-dimension vectors than the embedder makes
        raise CliError(f"cannot serve these settings: {err}", EXIT_USAGE) from None
    try:
        app = create_app(settings, pipeline)
    except (ApiKeyError, CredentialsError) as err:
        pipeline.close()
        raise CliError(str(err), EXIT_USAGE) from None
    from middleware.server.errors import RedactingFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    print(f"shopsearch: serving on http://{server.host}:{server.port} (docs at /v1/docs)", flush=True)
    try:
        uvicorn.run(app, host=server.host, port=server.port, log_level=args.log_level, access_log=False)
    finally:
        pipeline.close()
    return EXIT_OK


def _serve_models(settings: Settings, log_level: str) -> int:
    """The models-only server: models load in the background (readiness false until they do)."""
    import uvicorn

    from middleware.server.auth import ApiKeyError
    from middleware.server.errors import RedactingFilter
    from middleware.server.model_routes import create_models_app

    if not settings.embedder_enabled and not settings.reranker_enabled:
        raise CliError("--models-only with embedder=none and reranker=none serves nothing", EXIT_USAGE)
    try:
        app = create_models_app(settings)
    except ApiKeyError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    server = settings.server
    print(f"shopsearch: serving models on http://{server.host}:{server.port} (readiness at /readyz)", flush=True)
    uvicorn.run(app, host=server.host, port=server.port, log_level=log_level, access_log=False)
    return EXIT_OK


def _serve_workers(settings: Settings, args: argparse.Namespace) -> int:
    """N worker processes on one port; each loads models and backend in the background (readiness
    false until it has). Settings reach the workers through their environment."""
    import asyncio
    import os

    import uvicorn

    from middleware.credentials import CredentialsError
    from middleware.server.app import create_app
    from middleware.server.auth import ApiKeyError
    from middleware.server.metrics import ServiceMetrics
    from middleware.server.upstream import Upstream
    from middleware.server.workers import FACTORY, differing_fields, worker_environment

    settings = settings.model_copy(update={"data_dir": Path(settings.data_dir).resolve()})
    try:  # what a worker would only find out after starting: bad API keys or cluster credentials
        create_app(settings)
        upstream = Upstream.from_settings(settings, ServiceMetrics())
        if upstream is not None:
            asyncio.run(upstream.aclose())
    except (ApiKeyError, CredentialsError) as err:
        raise CliError(str(err), EXIT_USAGE) from None
    env = worker_environment(settings, getattr(args, "config", None))
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        seen = load_settings(argparse.Namespace())  # what each worker will build from its environment
        differ = differing_fields(settings, seen)
        if differ:
            raise CliError(f"cannot pass these settings to the workers: {', '.join(differ)}", EXIT_USAGE)
        server = settings.server
        print(
            f"shopsearch: serving on http://{server.host}:{server.port} with {server.workers} workers "
            "(readiness at /readyz, docs at /v1/docs)",
            flush=True,
        )
        uvicorn.run(
            FACTORY,
            factory=True,
            host=server.host,
            port=server.port,
            workers=server.workers,
            log_level=args.log_level,
            access_log=False,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return EXIT_OK
