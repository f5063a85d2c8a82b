"""`shopsearch serve --workers N`: N processes answering on one port (uvicorn's supervisor).

uvicorn starts each worker from an import string, so a worker knows only what its environment says:
the serving command turns its resolved settings into `SHOPSEARCH_*` variables (`worker_environment`)
and each worker rebuilds them with `Settings()` in `create_worker_app`. Each worker loads its own
models and opens its own backend in the background (readiness false until then); caches, batching
queues and the in-flight limit are per worker.

With the embedded store every worker opens the same data directory: SQLite (WAL) is the source of
truth and serialises writes from any worker; each worker's derived indexes follow the store's
generation on their next search (see the embedded backend), so a write through one worker is
visible to every worker's searches.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI

from middleware.config import Settings

FACTORY = "middleware.server.workers:create_worker_app"


def worker_environment(settings: Settings, config_file: str | None) -> dict[str, str]:
    """The `SHOPSEARCH_*` variables that make `Settings()` in a worker equal `settings` here: the
    values a flag (or the store's recorded embedder) chose, on top of the inherited environment."""
    env = {
        "SHOPSEARCH_DATA_DIR": str(Path(settings.data_dir).resolve()),
        "SHOPSEARCH_EMBEDDER": settings.embedder,
        "SHOPSEARCH_RERANKER": settings.reranker,
        "SHOPSEARCH_SERVER__HOST": settings.server.host,
        "SHOPSEARCH_SERVER__PORT": str(settings.server.port),
        "SHOPSEARCH_SERVER__WORKERS": str(settings.server.workers),
    }
    if config_file:
        env["SHOPSEARCH_CONFIG"] = str(Path(config_file).resolve())
    return env


def differing_fields(a: Settings, b: Settings) -> list[str]:
    """Dotted names of the settings whose values differ (secrets compared by value, never shown)."""

    def flat(values: dict[str, object], prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in values.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    left, right = flat(a.model_dump()), flat(b.model_dump())
    return sorted(k for k in left.keys() | right.keys() if left.get(k) != right.get(k))


def create_worker_app() -> FastAPI:
    """One worker's app (uvicorn's factory): settings from the environment, models loading in the background."""
    from middleware.server.app import create_app
    from middleware.server.errors import RedactingFilter

    root = logging.getLogger()
    if not root.handlers:  # a spawned worker: the logging the command set up, redacted as there
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        handler.addFilter(RedactingFilter())
    return create_app(Settings())
