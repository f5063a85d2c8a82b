"""HTTP service benchmark: latency percentiles and QPS by concurrency, rerank on/off, micro-batching
on/off, and the service's own overhead.

The service runs as `shopsearch serve` in a subprocess (the real command, its own interpreter), over an
embedded store built from real product titles (qbqtc corpus; a synthetic catalog when the data folder
is missing). Every request carries a distinct real query, so the caches never answer: the figures are
model + backend + service time. Random-weight models: rankings are meaningless, timings are not.

    python -m benchmarks.service_bench [--quick] [--models tiny|full] [--output DIR]

Overhead = client-observed latency − (retrieve + rerank) from the response's own stage timings:
the HTTP layer, JSON, queueing for a worker, fusion and business scoring. At concurrency 1 it is the
service's fixed cost; at higher concurrency it also holds time waiting for the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks import common

CONCURRENCY = (1, 4, 16)


def _catalog(n: int, seed: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
    """Products (real titles where available) and real queries."""
    rng = random.Random(seed)
    try:
        titles, queries = common.corpus_texts("qbqtc")
    except OSError:
        titles, queries = [], []
    if len(titles) < n or len(queries) < 50:
        from tests.support.tiny_models import PRODUCT_CORPUS

        words = [w for line in PRODUCT_CORPUS for w in line.split()]
        titles = [" ".join(rng.sample(words, 6)) for _ in range(n)]
        queries = [" ".join(rng.sample(words, 3)) for _ in range(2000)]
    brands = ["Acme", "Lune", "Nova", "Orbit", "Zen", None]
    categories = [["手表"], ["数码", "耳机"], ["服饰"], ["美妆"], ["家居"], ["食品"]]
    products = [
        {
            "id": f"p{i}",
            "title": titles[i][:200],
            "brand": rng.choice(brands),
            "category": rng.choice(categories),
            "price": round(rng.uniform(5, 5000), 2),
            "sales": rng.randint(0, 20000),
            "stock": rng.choice([0, 3, 20, 100, None]),
        }
        for i in range(n)
    ]
    unique_queries = list(dict.fromkeys(q.strip() for q in queries if q.strip()))
    rng.shuffle(unique_queries)
    return products, unique_queries


def _build_store(data_dir: Path, products: list[dict[str, Any]], embedder_dir: Path, cache: Path) -> float:
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.models import Embedder
    from middleware.products import Product

    started = time.perf_counter()
    embedder = Embedder(str(embedder_dir), cache_dir=cache)
    rows = [Product(**p) for p in products]
    backend = EmbeddedBackend(data_dir, dim=embedder.dim)
    for start in range(0, len(rows), 256):
        chunk = rows[start : start + 256]
        backend.upsert(chunk, embedder.encode_documents([p.embedding_text() for p in chunk]))
    backend.close()
    return time.perf_counter() - started


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """`shopsearch serve` in a subprocess, configured through SHOPSEARCH_* variables."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServeProcess:
        code = "import sys; from middleware.cli import main; sys.exit(main(sys.argv[1:]))"
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--port", str(self.port), "--log-level", "warning"],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 600  # full-size models export to ONNX on first use
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"shopsearch serve exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("shopsearch serve did not become ready")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout_s=20)
        self.log.close()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def _load(
    url: str, route: str, queries: list[str], concurrency: int, rerank: bool, timeout_s: float
) -> dict[str, Any]:
    latencies: list[float] = []
    overheads: list[float] = []
    statuses: dict[int, int] = {}
    degraded = 0
    pending = iter(queries)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            nonlocal degraded
            for query in pending:
                if route == "v1":
                    body: dict[str, Any] = {"query": query, "size": 10, "rerank": rerank}
                    path = "/v1/search"
                else:
                    body = {"query": {"match": {"title": query}}, "size": 10}
                    path = "/products/_search"
                started = time.perf_counter()
                r = await client.post(path, json=body)
                elapsed_ms = (time.perf_counter() - started) * 1000.0
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code != 200:
                    continue
                latencies.append(elapsed_ms)
                if route == "v1":
                    payload = r.json()
                    timings = payload["timings_ms"]
                    degraded += bool(payload["degraded"])
                else:
                    timings = _server_timing(r.headers.get("server-timing", ""))
                    degraded += "x-shopsearch-degraded" in r.headers
                work = timings.get("retrieve", 0.0) + timings.get("rerank", 0.0)
                overheads.append(elapsed_ms - work)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "requests": len(queries),
        "ok": len(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "degraded": degraded,
        "qps": len(latencies) / wall if wall > 0 else float("nan"),
        "p50_ms": _percentile(latencies, 0.50),
        "p95_ms": _percentile(latencies, 0.95),
        "p99_ms": _percentile(latencies, 0.99),
        "mean_ms": statistics.fmean(latencies) if latencies else float("nan"),
        "overhead_p50_ms": _percentile(overheads, 0.50),
        "overhead_p95_ms": _percentile(overheads, 0.95),
    }


def _server_timing(header: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";dur=")
        if name and rest:
            out[name] = float(rest)
    return out


def run(quick: bool, output_dir: Path, *, models: str | None = None) -> dict[str, Any]:
    """Benchmark the service. models: "tiny" (default with quick) or "full" (random-weight bge sizes)."""
    models = models or ("tiny" if quick else "full")
    full = models == "full"
    output_dir = Path(output_dir)
    # the store and the server log are scratch data: outside the repository
    work = Path(os.environ.get("SHOPSEARCH_BENCH_WORK", common.BENCH_MODELS.parent / "service-bench-work"))
    work.mkdir(parents=True, exist_ok=True)
    bench_models = common.prepare_models(quick=not full)
    from middleware.config import default_model_cache

    # the product's model cache, as the other benchmarks use: full-size ONNX exports are made once
    cache = Path(os.environ.get("SHOPSEARCH_MODEL_CACHE_DIR") or default_model_cache())
    n_products = 300 if full else (500 if quick else 3000)
    products, queries = _catalog(n_products)
    data_dir = work / f"store-{models}-{n_products}"
    build_s = None
    if not (data_dir / "done").exists():
        build_s = _build_store(data_dir, products, bench_models.embedder, cache)
        (data_dir / "done").write_text("ok")

    per_scenario = (lambda c: max(2 * c, 8)) if full else (lambda c: 40 if quick else 200)
    base_env = service_env(data_dir, bench_models.embedder, bench_models.reranker, cache)
    timeout_s = 600.0 if full else 60.0
    take = query_feed(queries)

    rows: list[dict[str, Any]] = []
    log_path = work / "serve.log"
    for batching in (True, False):
        env = {**base_env, "SHOPSEARCH_SERVER__BATCHING_ENABLED": "true" if batching else "false"}
        with ServeProcess(env, log_path) as server:
            asyncio.run(_load(server.url, "v1", take(8), 4, True, timeout_s))  # warm-up
            levels = CONCURRENCY if batching else (16,)
            for concurrency in levels:
                for rerank in (True, False):
                    result = asyncio.run(
                        _load(server.url, "v1", take(per_scenario(concurrency)), concurrency, rerank, timeout_s)
                    )
                    rows.append({"route": "/v1/search", "batching": batching, "concurrency": concurrency,
                                 "rerank": rerank, **result})  # fmt: skip
                    _print_row(rows[-1])
            if batching:
                result = asyncio.run(_load(server.url, "proxy", take(per_scenario(1)), 1, True, timeout_s))
                rows.append({"route": "/products/_search", "batching": True, "concurrency": 1, "rerank": True,
                             **result})  # fmt: skip
                _print_row(rows[-1])
            metrics_sample = httpx.get(f"{server.url}/metrics", timeout=10).text if batching else None
            if metrics_sample is not None:
                output_dir.mkdir(parents=True, exist_ok=True)
                (output_dir / f"service-{models}-metrics.txt").write_text(metrics_sample)

    table = common.markdown_table(
        ["route", "batching", "conc.", "rerank", "QPS", "p50 ms", "p95 ms", "p99 ms", "overhead p50 ms", "degraded"],
        [
            [r["route"], "on" if r["batching"] else "off", r["concurrency"], "on" if r["rerank"] else "off",
             r["qps"], r["p50_ms"], r["p95_ms"], r["p99_ms"], r["overhead_p50_ms"], r["degraded"]]
            for r in rows
        ],
    )  # fmt: skip
    print(table)
    payload = {
        "models": models,
        "embedder": str(bench_models.embedder),
        "reranker": str(bench_models.reranker),
        "products": n_products,
        "store_build_s": build_s,
        "rerank_k": 20,
        "machine": common.machine_info(),
        "scenarios": rows,
        "table_markdown": table,
        "overhead_definition": "client latency − (retrieve + rerank) stage timings reported by the service",
    }
    path = common.write_json(output_dir, f"service{'' if models == 'tiny' else '-full'}", payload)
    print(f"wrote {path}")
    return payload


def _print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['route']:<18} batching={'on ' if r['batching'] else 'off'} c={r['concurrency']:<2} "
        f"rerank={'on ' if r['rerank'] else 'off'} qps={r['qps']:.1f} p50={r['p50_ms']:.1f} "
        f"p95={r['p95_ms']:.1f} p99={r['p99_ms']:.1f} overhead_p50={r['overhead_p50_ms']:.1f} ms "
        f"ok={r['ok']}/{r['requests']} degraded={r['degraded']}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (and tiny models by default)")
    parser.add_argument("--models", choices=["tiny", "full"], default=None, help="default: tiny with --quick")
    parser.add_argument("--output", type=Path, default=common.DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    result = run(args.quick, args.output, models=args.models)
    print(json.dumps({k: result[k] for k in ("models", "products")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def service_env(data_dir: Path, embedder: Path, reranker: Path, cache: Path) -> dict[str, str]:
    """The `serve` environment the service benchmarks share: the bench models, rerank_k 20, and a
    deadline long enough to measure the whole work rather than the degradation path."""
    return {
        "SHOPSEARCH_BACKEND": "embedded",
        "SHOPSEARCH_DATA_DIR": str(data_dir),
        "SHOPSEARCH_EMBEDDER": str(embedder),
        "SHOPSEARCH_RERANKER": str(reranker),
        "SHOPSEARCH_MODEL_CACHE_DIR": str(cache),
        "SHOPSEARCH_RERANK_K": "20",
        "SHOPSEARCH_DEADLINE_MS": "120000",
        "SHOPSEARCH_MAX_DEADLINE_MS": "120000",
        "SHOPSEARCH_SERVER__MAX_QUEUE": "64",
        "HF_HUB_OFFLINE": "1",
    }


def query_feed(queries: Sequence[str]) -> Callable[[int], list[str]]:
    """take(n): the next n distinct query texts (past the list's end, numbered, so no cache answers)."""
    cursor = 0

    def take(n: int) -> list[str]:
        nonlocal cursor
        chunk = [queries[(cursor + i) % len(queries)] + ("" if cursor + i < len(queries) else f" {cursor + i}")
                 for i in range(n)]  # fmt: skip
        cursor += n
        return chunk

    return take


def stop_process(proc: subprocess.Popen[Any], timeout_s: float) -> None:
    """Terminate a served process, killing it if it has not exited within `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
