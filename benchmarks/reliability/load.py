"""Bounded loopback load: measure capacity, then offer about twice as much and watch the service shed.

The service runs as its own process (`shopsearch serve`, tiny models, the demo catalog) so that its
peak RSS is its own and the load generator does not share its interpreter. Phase 1 (closed loop, fixed
concurrency and request count) measures capacity in searches per second. Phase 2 (open loop, fixed
rate ≈ 2 × capacity, fixed duration) sends searches on a schedule whatever the answers: refusals must be
429/503 and fast, accepted searches must finish by their deadline, nothing may hang.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

from benchmarks.reliability.common import CLI, demo_store, free_port, load_models, percentile, tiny_models

QUERIES = ["适合送女友的轻奢小众手表", "无线蓝牙耳机 降噪", "夏季 纯棉 连衣裙", "保温杯 316 不锈钢", "复古 真皮 手表"]


class RssSampler:
    """Peak resident memory of a process tree, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        try:
            procs = [self.process, *self.process.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._rss()
            self.samples.append(rss)
            self.peak = max(self.peak, rss)
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def _cpu_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def start_service(work: Path, *, max_queue: int, deadline_ms: float) -> tuple[subprocess.Popen, str]:
    embedder_dir, reranker_dir, cache = tiny_models(work)
    data_dir = work / "load-store"
    if not (data_dir / "catalog.sqlite3").exists():
        demo_store(data_dir, load_models(work)[0]).close()
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "SHOPSEARCH_DATA_DIR": str(data_dir),
            "SHOPSEARCH_EMBEDDER": str(embedder_dir),
            "SHOPSEARCH_RERANKER": str(reranker_dir),
            "SHOPSEARCH_RERANKER_PRECISION": "fp32",
            "SHOPSEARCH_MODEL_CACHE_DIR": str(cache),
            "SHOPSEARCH_DEADLINE_MS": str(deadline_ms),
            "SHOPSEARCH_RERANK_K": "10",
            "SHOPSEARCH_SERVER__MAX_QUEUE": str(max_queue),
            "HF_HUB_OFFLINE": "1",
        }
    )
    log = open(work / "load-service.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [*CLI, "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"shopsearch serve exited ({proc.returncode}); see {work / 'load-service.log'}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("shopsearch serve did not become ready in 300 s")


def _run(coro: Any) -> Any:
    """Run the generator on uvloop when installed: the generator must cost far less CPU than the service
    it loads, or its own lag is what gets measured (httpx cost ~4 ms of CPU per request here)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a server dependency on Linux
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _session(url: str, *, connections: int, timeout_s: float) -> aiohttp.ClientSession:
    async def sent(_session: Any, ctx: Any, _params: Any) -> None:
        ctx.trace_request_ctx["sent_at"] = time.perf_counter()  # the request really left the generator

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(sent)
    return aiohttp.ClientSession(
        base_url=url,
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        trace_configs=[trace],
    )


async def _one(session: aiohttp.ClientSession, i: int, out: list[tuple[int, float, float]], t_start: float) -> None:
    scheduled = time.perf_counter()
    stamp: dict[str, float] = {}
    body = {"query": f"{QUERIES[i % len(QUERIES)]} {i}", "size": 10}
    try:
        async with session.post("/v1/search", json=body, trace_request_ctx=stamp) as r:
            await r.read()
            status = r.status
    except TimeoutError:
        status = -1  # hung past the client's limit
    except aiohttp.ClientError:
        status = -2
    done = time.perf_counter()
    out.append((status, (done - stamp.get("sent_at", scheduled)) * 1000.0, scheduled - t_start))


async def closed_loop(url: str, *, concurrency: int, requests: int, timeout_s: float) -> dict[str, Any]:
    results: list[tuple[int, float, float]] = []
    counter = iter(range(requests))
    async with _session(url, connections=concurrency, timeout_s=timeout_s) as session:
        t0 = time.perf_counter()

        async def worker() -> None:
            for i in counter:
                await _one(session, i, results, t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [lat for s, lat, _ in results if s == 200]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "seconds": round(wall, 2),
        "qps_ok": round(len(ok) / wall, 2),
        "statuses": {str(k): v for k, v in sorted(Counter(s for s, _, _ in results).items())},
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
    }


async def open_loop(url: str, *, rate: float, seconds: float, timeout_s: float, max_outstanding: int) -> dict[str, Any]:
    """`rate` requests per second for `seconds`, on schedule; at most `max_outstanding` open connections
    (beyond that the generator itself would be the bottleneck: such sends are counted as skipped)."""
    results: list[tuple[int, float, float]] = []
    tasks: set[asyncio.Task[None]] = set()
    skipped = 0
    lag: list[float] = []
    async with _session(url, connections=max_outstanding, timeout_s=timeout_s) as client:
        t0 = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            wait = t0 + i / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                lag.append(-wait * 1000.0)  # the generator is behind its schedule
            if len(tasks) >= max_outstanding:
                skipped += 1
                continue
            task = asyncio.create_task(_one(client, i, results, t0))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    statuses = Counter(s for s, _, _ in results)
    ok = [lat for s, lat, _ in results if s == 200]
    refused = [lat for s, lat, _ in results if s in (429, 503)]
    return {
        "offered_rate_per_s": round(rate, 2),
        "seconds": round(wall, 2),
        "sent": len(results),
        "generator_behind_schedule": len(lag),
        "generator_lag_p99_ms": percentile(lag, 99),
        "skipped_by_generator": skipped,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "qps_ok": round(len(ok) / wall, 2),
        "ok_p50_ms": percentile(ok, 50),
        "ok_p99_ms": percentile(ok, 99),
        "ok_max_ms": max(ok) if ok else None,
        "refused": len(refused),
        "refused_p50_ms": percentile(refused, 50),
        "refused_p99_ms": percentile(refused, 99),
        "refused_max_ms": max(refused) if refused else None,
        "hung": statuses.get(-1, 0),
        "transport_errors": statuses.get(-2, 0),
        "other_statuses": {str(k): v for k, v in statuses.items() if k not in (200, 429, 503, -1, -2)},
    }


def run(work: Path, *, quick: bool) -> dict[str, Any]:
    deadline_ms = 1000.0
    max_queue = 8
    proc, url = start_service(work, max_queue=max_queue, deadline_ms=deadline_ms)
    try:
        with RssSampler(proc.pid) as rss:
            idle_rss = rss._rss()
            # warm: the first requests pay for lazy loads
            _run(closed_loop(url, concurrency=2, requests=20, timeout_s=30))
            capacity = _run(closed_loop(url, concurrency=max_queue, requests=100 if quick else 400, timeout_s=30))
            rate = max(2.0, 2.0 * capacity["qps_ok"])
            server_cpu0, own_cpu0, wall0 = _cpu_seconds(proc.pid), _cpu_seconds(os.getpid()), time.monotonic()
            # client limit: deadline + 5 s; a request still open then counts as hung
            overload = _run(
                open_loop(
                    url,
                    rate=rate,
                    seconds=8.0 if quick else 30.0,
                    timeout_s=deadline_ms / 1000.0 + 5.0,
                    max_outstanding=256,
                )
            )
            overload_wall = time.monotonic() - wall0
            cpu = {
                "service_cores_used": round((_cpu_seconds(proc.pid) - server_cpu0) / overload_wall, 2),
                "generator_cores_used": round((_cpu_seconds(os.getpid()) - own_cpu0) / overload_wall, 2),
            }
            after = _run(closed_loop(url, concurrency=2, requests=20, timeout_s=30))
        metrics = httpx.get(url + "/metrics", timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    shed_lines = [line for line in metrics.splitlines() if line.startswith("shopsearch_rejected") and "{" in line]
    return {
        "service": "shopsearch serve (own process), tiny models, demo catalog (28 products)",
        "deadline_ms": deadline_ms,
        "max_queue": max_queue,
        "capacity": capacity,
        "overload": overload,
        "overload_cpu": cpu,
        "after_overload": after,
        "rss_idle_mb": round(idle_rss / 2**20, 1),
        "rss_peak_mb": round(rss.peak / 2**20, 1),
        "rss_samples": len(rss.samples),
        "rejections_metric": shed_lines[:10],
        "refusals_fast": overload["refused_p99_ms"] is None or overload["refused_p99_ms"] <= 50.0,
        "no_hangs": overload["hung"] == 0,
        "accepted_within_deadline": overload["ok_max_ms"] is None or overload["ok_max_ms"] <= deadline_ms + 1000.0,
    }
