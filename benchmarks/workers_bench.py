"""`shopsearch serve --workers N`: searches per second at concurrency 16 for 1, 2 and 4 workers.

The service runs as the real command in a subprocess over one embedded store (real qbqtc product
titles when the data folder is there), with the same catalog, models and settings as
`benchmarks.service_bench`, so the one-worker row sits beside its single-process figures. Load
comes from a closed loop of aiohttp clients (one connection each), every request a distinct real
query so no cache answers. Two workloads per worker count:

- hybrid: BM25 + kNN, fused, reranked (rerank_k 20): model-bound;
- bm25: BM25 only, no models in the request path: store- and service-bound.

Workers are processes: on a machine with C cores, more than C workers only share the same cores
(and each holds its own models in memory). Random-weight models: timings are real, rankings not.

    python -m benchmarks.workers_bench [--quick] [--models tiny|full] [--workers 1,2,4] [--repeat 3] [--output DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from benchmarks import common
from benchmarks.service_bench import (
    _build_store,
    _catalog,
    _free_port,
    _percentile,
    query_feed,
    service_env,
    stop_process,
)

CONCURRENCY = 16
WORKLOADS = {
    "hybrid": {"retrieval": "hybrid", "rerank": True},
    "bm25": {"retrieval": "bm25", "rerank": False},
}
CLI = "import sys; from middleware.cli import main; sys.exit(main(sys.argv[1:]))"


class WorkersProcess:
    """`shopsearch serve --workers N` in a subprocess; ready once `N` distinct workers answer /readyz."""

    def __init__(self, env: dict[str, str], workers: int, log_path: Path) -> None:
        self.workers = workers
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: set[str] = set()

    def __enter__(self) -> WorkersProcess:
        argv = ["serve", "--port", str(self.port), "--workers", str(self.workers), "--log-level", "warning"]
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLI, *argv], env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 900  # full-size models export to ONNX on first use
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"shopsearch serve exited ({self.proc.returncode}); see {self.log_path}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2)  # a new connection: any worker may answer
                if r.status_code == 200:
                    self.pids.add(r.headers["x-shopsearch-worker"])
                    if len(self.pids) == self.workers:
                        return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"not every worker became ready; see {self.log_path}")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout_s=30)
        self.log.close()


async def closed_loop(
    url: str, queries: list[str], body: dict[str, Any], concurrency: int, timeout_s: float
) -> dict[str, Any]:
    """`concurrency` clients, each on its own connection, sending the next query as soon as one answers."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    workers: Counter[str] = Counter()
    pending = iter(queries)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout) as session:

        async def client() -> None:
            for query in pending:
                started = time.perf_counter()
                async with session.post("/v1/search", json={"query": query, "size": 10, **body}) as r:
                    await r.read()
                    statuses[r.status] += 1
                    workers[r.headers.get("x-shopsearch-worker", "?")] += 1
                    if r.status == 200:
                        latencies.append((time.perf_counter() - started) * 1000.0)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "requests": len(queries),
        "ok": len(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "answers_per_worker": sorted(workers.values(), reverse=True),
        "seconds": round(wall, 2),
        "qps": len(latencies) / wall if wall > 0 else float("nan"),
        "p50_ms": _percentile(latencies, 0.50),
        "p95_ms": _percentile(latencies, 0.95),
        "p99_ms": _percentile(latencies, 0.99),
    }


def _single_process_reference(models: str) -> list[dict[str, Any]]:
    """The c=16 rows of service_bench's recorded single-process run with the same models, if any."""
    import json

    name = {"tiny": "quick/service.json", "full": "service-full.json"}[models]
    path = common.DEFAULT_RESULTS / name
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return [
        {
            "file": f"benchmarks/results/{name}",
            "products": data.get("products"),
            "rerank": r["rerank"],
            "qps": r["qps"],
            "p50_ms": r["p50_ms"],
        }
        for r in data.get("scenarios", [])
        if r.get("route") == "/v1/search" and r.get("concurrency") == CONCURRENCY and r.get("batching")
    ]


def run(
    quick: bool, output_dir: Path, *, models: str = "tiny", worker_counts: tuple[int, ...] = (1, 2, 4), repeat: int = 3
) -> dict[str, Any]:
    full = models == "full"
    work = Path(os.environ.get("SHOPSEARCH_BENCH_WORK", common.BENCH_MODELS.parent / "service-bench-work"))
    work.mkdir(parents=True, exist_ok=True)
    bench_models = common.prepare_models(quick=not full)
    from middleware.config import default_model_cache

    cache = Path(os.environ.get("SHOPSEARCH_MODEL_CACHE_DIR") or default_model_cache())
    n_products = 300 if full else (500 if quick else 3000)
    products, queries = _catalog(n_products)
    data_dir = work / f"store-{models}-{n_products}"  # the store service_bench builds, shared with it
    if not (data_dir / "done").exists():
        _build_store(data_dir, products, bench_models.embedder, cache)
        (data_dir / "done").write_text("ok")
    env = service_env(data_dir, bench_models.embedder, bench_models.reranker, cache)
    per_run = {"hybrid": 32 if full else (80 if quick else 400), "bm25": 200 if quick else 1500}
    timeout_s = 600.0 if full else 60.0
    take = query_feed(queries)

    rows: list[dict[str, Any]] = []
    for round_ in range(1, repeat + 1):  # rounds interleave the worker counts: a shared machine's noise spreads
        for workers in worker_counts:
            with WorkersProcess(env, workers, work / "workers-serve.log") as server:
                warm_up = take(2 * CONCURRENCY)
                asyncio.run(closed_loop(server.url, warm_up, WORKLOADS["hybrid"], CONCURRENCY, timeout_s))
                for name, body in WORKLOADS.items():
                    load = os.getloadavg()[0]
                    result = asyncio.run(closed_loop(server.url, take(per_run[name]), body, CONCURRENCY, timeout_s))
                    rows.append({"round": round_, "workers": workers, "workload": name, "concurrency": CONCURRENCY,
                                 "load_avg_1m_before": round(load, 2), **result})  # fmt: skip
                    r = rows[-1]
                    print(
                        f"round {round_} workers={workers} {name:<6} c={CONCURRENCY} qps={r['qps']:.1f} "
                        f"p50={r['p50_ms']:.0f} p95={r['p95_ms']:.0f} p99={r['p99_ms']:.0f} ms "
                        f"ok={r['ok']}/{r['requests']} per worker={r['answers_per_worker']} load={load:.1f}",
                        flush=True,
                    )
    summary = []
    for name in WORKLOADS:
        for workers in worker_counts:
            runs = sorted(
                (r for r in rows if r["workload"] == name and r["workers"] == workers), key=lambda r: r["qps"]
            )
            mid = runs[len(runs) // 2]
            summary.append({"workload": name, "workers": workers, "qps_median": mid["qps"],
                            "qps_min": runs[0]["qps"], "qps_max": runs[-1]["qps"], "p50_ms": mid["p50_ms"],
                            "p99_ms": mid["p99_ms"], "answers_per_worker": mid["answers_per_worker"]})  # fmt: skip
    table = common.markdown_table(
        ["workload", "workers", "QPS (median)", "QPS min–max", "p50 ms", "p99 ms", "answers per worker"],
        [[r["workload"], r["workers"], r["qps_median"], f"{r['qps_min']:.1f}–{r['qps_max']:.1f}", r["p50_ms"],
          r["p99_ms"], "/".join(str(n) for n in r["answers_per_worker"])] for r in summary],
    )  # fmt: skip
    print(table)
    payload = {
        "models": models,
        "embedder": str(bench_models.embedder),
        "reranker": str(bench_models.reranker),
        "products": n_products,
        "rerank_k": 20,
        "concurrency": CONCURRENCY,
        "workloads": WORKLOADS,
        "machine": common.machine_info(),
        "repeat": repeat,
        "summary": summary,
        "scenarios": rows,
        "single_process_reference": _single_process_reference(models),
        "table_markdown": table,
    }
    name = "workers" if models == "tiny" else "workers-full"
    path = common.write_json(output_dir / "quick" if quick else output_dir, name, payload)
    print(f"wrote {path}")
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and a smaller store")
    parser.add_argument("--models", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the worker counts (median reported)")
    parser.add_argument("--output", type=Path, default=common.DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: expected at least 1")
    try:
        counts = tuple(int(n) for n in args.workers.split(","))
    except ValueError:
        parser.error(f"--workers {args.workers!r}: expected comma-separated integers, e.g. 1,2,4")
    if not counts or any(n < 1 for n in counts):
        parser.error(f"--workers {args.workers!r}: every count must be at least 1")
    run(args.quick, args.output, models=args.models, worker_counts=counts, repeat=args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
