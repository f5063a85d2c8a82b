"""Shared pieces of the reliability harness: synthetic catalogs, tiny models, an in-process service."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from middleware.products import Product

# The CLI as a subprocess (there is no middleware/cli/__main__.py): the same entry point as `shopsearch`.
CLI = [sys.executable, "-c", "import sys; from middleware.cli import main; sys.exit(main())"]

BRANDS = ["Acme", "Zeta", "Omega", "北极星", "山茶"]
CATEGORIES = [["手表"], ["耳机"], ["连衣裙", "夏装"], ["保温杯"], ["衬衫"]]
WORDS = ["轻奢", "小众", "纯棉", "无线", "蓝牙", "不锈钢", "真皮", "复古", "简约", "运动", "防水", "礼盒"]


def product_row(i: int, rng: random.Random, version: int = 0) -> dict[str, Any]:
    """One catalog row; unique title per (id, version), so every vector of the tiny model differs."""
    words = " ".join(rng.sample(WORDS, 3))
    row: dict[str, Any] = {
        "id": f"p{i:06d}",
        "title": f"{words} 商品{i} 版{version}",
        "brand": BRANDS[i % len(BRANDS)],
        "category": CATEGORIES[i % len(CATEGORIES)],
        "price": round(rng.uniform(1, 5000), 2),
        "sales": rng.randrange(0, 100_000),
        "stock": rng.choice([None, 0, rng.randrange(1, 500)]),
    }
    if rng.random() < 0.5:
        row["description"] = f"{rng.choice(WORDS)} {rng.choice(WORDS)} 描述{i}-{version}"
    return row


def write_catalog(
    path: Path, n: int, seed: int = 0, *, dup_share: float = 0.05, bad_every: int = 997
) -> dict[str, Any]:
    """A JSONL catalog of `n` distinct products plus updates of earlier ids and a few bad rows.

    Returns {"expected": {id: Product of its LAST valid row}, "rows": lines written, "bad": bad rows}.
    """
    rng = random.Random(seed)
    expected: dict[str, Product] = {}
    lines = 0
    bad = 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = product_row(i, rng)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            expected[row["id"]] = Product.model_validate(row)
            lines += 1
            if i and rng.random() < dup_share:  # a later row for an earlier id: an update, never a second product
                j = rng.randrange(0, i)
                update = product_row(j, rng, version=rng.randrange(1, 9))
                f.write(json.dumps(update, ensure_ascii=False) + "\n")
                expected[update["id"]] = Product.model_validate(update)
                lines += 1
            if i % bad_every == bad_every - 1:  # rejected rows: dead letters, never stored
                f.write(json.dumps({"id": f"bad{i}", "title": "坏行", "price": -1}) + "\n")
                f.write("{not json\n")
                lines += 2
                bad += 2
    return {"expected": expected, "rows": lines, "bad": bad}


def write_signal_updates(path: Path, ids: list[str], n: int, seed: int = 0) -> int:
    """`n` signal rows over `ids` (repeats included); returns the number of rows."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            row: dict[str, Any] = {"id": rng.choice(ids)}
            for name in rng.sample(["price", "sales", "stock"], rng.randrange(1, 4)):
                row[name] = round(rng.uniform(0, 999), 2) if name == "price" else rng.randrange(0, 10_000)
            f.write(json.dumps(row) + "\n")
    return n


def expected_signals(path: Path) -> dict[str, dict[str, Any]]:
    """Per id, the fields every row set, later rows winning field by field (update-signals' semantics)."""
    out: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            out.setdefault(row["id"], {}).update({k: v for k, v in row.items() if k != "id"})
    return out


# ------------------------------------------------------------------------------------------- models


def tiny_models(work: Path) -> tuple[Path, Path, Path]:
    """Tiny random-init embedder and reranker directories (built once per work dir) and an ONNX cache."""
    from tests.support.tiny_models import make_tiny_bert, make_tiny_xlmr

    emb, rer, cache = work / "tiny-bge-zh", work / "tiny-bge-reranker", work / "model-cache"
    if not (emb / "config.json").exists():
        make_tiny_bert(emb)
    if not (rer / "config.json").exists():
        make_tiny_xlmr(rer)
    cache.mkdir(parents=True, exist_ok=True)
    return emb, rer, cache


def load_models(work: Path) -> tuple[Any, Any]:
    from middleware.models import Embedder, Reranker

    emb, rer, cache = tiny_models(work)
    return Embedder(str(emb), cache_dir=cache), Reranker(str(rer), cache_dir=cache, precision="fp32")


def demo_store(path: Path, embedder: Any) -> Any:
    """The 28-product demo catalog in an embedded store, with the embedder's vectors."""
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.cli.search import load_demo_catalog

    products = load_demo_catalog(None)
    backend = EmbeddedBackend(path, dim=embedder.dim)
    backend.upsert(products, embedder.encode_documents([p.embedding_text() for p in products]))
    return backend


def service_settings(data_dir: Path | None = None, **server: Any) -> Any:
    from middleware.config import Settings

    values: dict[str, Any] = {"server": {"warm_up": False, **server}, "rerank_k": 10, "deadline_ms": 2000}
    if data_dir is not None:
        values["data_dir"] = data_dir
    return Settings(_env_file=None, **values)


def make_app(backend: Any, embedder: Any, reranker: Any, settings: Any) -> Any:
    from middleware.pipeline import Pipeline
    from middleware.server.app import create_app

    return create_app(settings, Pipeline(settings, backend, embedder, reranker))


# ------------------------------------------------------------------------------------- live server


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """The app under uvicorn on a free loopback port (a background thread); yields its base URL."""
    import threading

    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def env_for_cli(work: Path, data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "SHOPSEARCH_DATA_DIR": str(data_dir),
            "SHOPSEARCH_MODEL_CACHE_DIR": str(work / "model-cache"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env
