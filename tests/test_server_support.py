"""Fixtures shared by the service tests: tiny models, an embedded store with the demo catalog, a live server.

(Kept in a test module, imported by the others, because tests/conftest.py belongs to another helper.)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from middleware.backends.embedded import EmbeddedBackend
from middleware.cli.search import load_demo_catalog
from middleware.config import Settings
from middleware.models import Embedder, Reranker
from middleware.pipeline import Pipeline
from middleware.server.app import create_app


@pytest.fixture(scope="session")
def server_models(tiny_embedder_dir: Path, tiny_reranker_dir: Path, model_cache_dir: Path) -> tuple[Embedder, Reranker]:
    embedder = Embedder(str(tiny_embedder_dir), cache_dir=model_cache_dir)
    reranker = Reranker(str(tiny_reranker_dir), cache_dir=model_cache_dir, precision="fp32")
    return embedder, reranker


def fill_store(path: Path, embedder: Embedder) -> EmbeddedBackend:
    products = load_demo_catalog(None)
    backend = EmbeddedBackend(path, dim=embedder.dim)
    backend.upsert(products, embedder.encode_documents([p.embedding_text() for p in products]))
    return backend


@pytest.fixture(scope="session")
def server_store(server_models, tmp_path_factory) -> Iterator[EmbeddedBackend]:
    """Read-only for tests: the 28-product demo catalog. Tests that write make their own store."""
    backend = fill_store(tmp_path_factory.mktemp("server-store"), server_models[0])
    yield backend
    backend.close()


def make_settings(tmp: Path | None = None, **server: Any) -> Settings:
    values: dict[str, Any] = {"server": server, "rerank_k": 10, "deadline_ms": 5000}
    if tmp is not None:
        values["data_dir"] = tmp
    else:  # no data directory of its own: no event log (it would land in the working directory)
        values["events"] = {"enabled": False}
    return Settings(**values)


def make_app(
    store: EmbeddedBackend,
    embedder: Any,
    reranker: Any,
    settings: Settings | None = None,
    **server: Any,
) -> FastAPI:
    settings = settings or make_settings(**server)
    return create_app(settings, Pipeline(settings, store, embedder, reranker))


# ----------------------------------------------------------------------------------- fault injection


class FailingReranker(Reranker):
    """The real reranker, with its scoring made to fail (fault injection)."""

    def __init__(self, real: Reranker) -> None:
        self.__dict__.update(real.__dict__)

    def score(self, query: str, docs: Any) -> np.ndarray:
        raise RuntimeError("injected reranker failure")

    def score_encoded(self, encodings: Any) -> np.ndarray:  # the service's shared-batch path
        raise RuntimeError("injected reranker failure")


class SlowReranker(Reranker):
    """The real reranker, slowed down by `delay_s` per call (fault injection)."""

    def __init__(self, real: Reranker, delay_s: float) -> None:
        self.__dict__.update(real.__dict__)
        self.delay_s = delay_s

    def score(self, query: str, docs: Any) -> np.ndarray:
        time.sleep(self.delay_s)
        return super().score(query, docs)

    def score_encoded(self, encodings: Any) -> np.ndarray:  # the service's shared-batch path
        time.sleep(self.delay_s)
        return super().score_encoded(encodings)


class KnnFailingBackend(EmbeddedBackend):
    """The real embedded store whose vector search fails (fault injection)."""

    def __init__(self, real: EmbeddedBackend) -> None:
        self.__dict__.update(real.__dict__)

    def knn(self, vector: Any, filters: Any, n: int) -> list:
        raise RuntimeError("injected kNN failure")


class UnreachableBackend(EmbeddedBackend):
    """The real store, every read failing as an unreachable backend does (fault injection)."""

    def __init__(self, real: EmbeddedBackend) -> None:
        self.__dict__.update(real.__dict__)

    def _down(self, *args: Any, **kwargs: Any) -> Any:
        from middleware.backends.base import BackendError

        raise BackendError("connection refused: http://admin:hunter2@10.0.0.9:9200")

    bm25 = knn = get = count = _down  # type: ignore[assignment]


# -------------------------------------------------------------------------------------- live server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """The app under uvicorn on a free loopback port, in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_a_loaded_server_freezes_its_start_up_heap_and_sets_the_young_threshold() -> None:
    import gc

    from middleware.server import heap

    before = gc.get_threshold()
    try:
        heap.settle(12_345)
        assert gc.get_threshold() == (12_345, *before[1:])
        assert gc.get_freeze_count() > 0  # what was alive at start-up is out of the collector's scans
        heap.settle(0)  # 0 keeps the threshold as it is
        assert gc.get_threshold() == (12_345, *before[1:])
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
