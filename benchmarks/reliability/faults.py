"""Fault injection in serving: the real objects wrapped so that one method raises or sleeps, toggled live.

Each scenario sends searches through the service while a fault is on, records status, latency and the
`degraded` list (or the 503 body), then turns the fault off and checks the service recovered. Nothing is
mocked: the wrappers delegate to the real embedded store / OpenSearch backend, ONNX models and caches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from middleware.backends.base import BackendError

QUERY = "适合送女友的轻奢小众手表"


@dataclass
class Fault:
    """What a wrapped method does instead of (or before) the real call: raise, or sleep first."""

    methods: dict[str, tuple[str, Any]] = field(default_factory=dict)  # name -> ("raise", exc) | ("sleep", s)

    def apply(self, name: str) -> None:
        spec = self.methods.get(name)
        if spec is None:
            return
        kind, arg = spec
        if kind == "sleep":
            time.sleep(arg)
        else:
            raise arg

    def clear(self) -> None:
        self.methods.clear()


class FaultyBackend:
    """A Backend that delegates to the real one, with `fault` applied before each read/write call."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.fault = Fault()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if not callable(attr) or name not in {"bm25", "knn", "get", "count", "stats", "update_signals", "upsert"}:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.fault.apply(name)
            return attr(*args, **kwargs)

        return call


class FaultyEmbedder:
    """The real embedder; `encode_queries` subject to the fault."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.fault = Fault()
        self.model_id = real.model_id
        self.dim = real.dim

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        self.fault.apply("encode_queries")
        return self.real.encode_queries(texts)

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        return self.real.encode_documents(texts)


class FaultyReranker:
    """The real reranker; scoring subject to the fault (also the service's shared-batch entry point)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.fault = Fault()
        self.model_id = real.model_id

    def score(self, query: str, docs: list[str]) -> np.ndarray:
        self.fault.apply("score")
        return self.real.score(query, docs)

    def score_pairs(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        self.fault.apply("score")
        out = np.zeros(len(pairs), dtype=np.float32)
        by_query: dict[str, list[int]] = {}
        for i, (q, _) in enumerate(pairs):
            by_query.setdefault(q, []).append(i)
        for q, idx in by_query.items():
            out[idx] = self.real.score(q, [pairs[i][1] for i in idx])
        return out


class FaultyCache:
    """A service cache (LruTtlCache) whose lookups and stores are subject to the fault."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.fault = Fault()

    def get(self, key: Any) -> Any:
        self.fault.apply("get")
        return self.real.get(key)

    def put(self, key: Any, value: Any) -> None:
        self.fault.apply("put")
        self.real.put(key, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


# --------------------------------------------------------------------------------------- scenarios


@dataclass
class Observation:
    status: int
    latency_ms: float
    degraded: list[str] | None
    message: str | None


def observe(client: Any, body: dict[str, Any] | None = None, path: str = "/v1/search") -> Observation:
    body = body or {"query": QUERY, "size": 5}
    t0 = time.perf_counter()
    r = client.post(path, json=body)
    latency = (time.perf_counter() - t0) * 1000.0
    data = r.json()
    degraded = data.get("degraded") if r.status_code == 200 and path == "/v1/search" else None
    if r.status_code == 200 and path != "/v1/search":
        degraded = (
            r.headers.get("x-shopsearch-degraded", "").split(",") if r.headers.get("x-shopsearch-degraded") else []
        )
    message = None
    if r.status_code != 200:
        message = data.get("message") or (data.get("error") or {}).get("reason")
    return Observation(r.status_code, round(latency, 1), degraded, message)


@dataclass
class Scenario:
    name: str
    turn_on: Callable[[], None]
    turn_off: Callable[[], None]
    expect_status: int
    expect_degraded: list[str] | None  # None: an error answer


def run_scenarios(
    client: Any, scenarios: list[Scenario], *, deadline_ms: float, repeats: int = 3, recovery_limit_s: float = 15.0
) -> list[dict]:
    """Each scenario: `repeats` searches with the fault on (distinct queries: no cache hits), then recovery."""
    rows = []
    for i, sc in enumerate(scenarios):
        sc.turn_on()
        try:
            during = [
                observe(client, {"query": f"{QUERY} {sc.name} {i}-{k}", "size": 5, "deadline_ms": deadline_ms})
                for k in range(repeats)
            ]
        finally:
            sc.turn_off()
        # a model call already sleeping holds the model's one batch worker until it returns: recovery is
        # measured as the time until a search answers whole again (bounded)
        cleared = time.perf_counter()
        for attempt in range(100):
            body = {"query": f"{QUERY} recovered {sc.name} {attempt}", "size": 5, "deadline_ms": deadline_ms}
            after = observe(client, body)
            if (after.status == 200 and after.degraded == []) or time.perf_counter() - cleared > recovery_limit_s:
                break
            time.sleep(0.1)
        recovery_ms = round((time.perf_counter() - cleared) * 1000.0, 1)
        ok = all(o.status == sc.expect_status for o in during) and all(
            (o.degraded is None and sc.expect_degraded is None)
            or sorted(o.degraded or []) == sorted(sc.expect_degraded or [])
            for o in during
        )
        rows.append(
            {
                "fault": sc.name,
                "status": sorted({o.status for o in during}),
                "degraded": during[0].degraded,
                "message": during[0].message,
                "latency_ms_max": max(o.latency_ms for o in during),
                "deadline_ms": deadline_ms,
                "as_expected": ok,
                "recovered": after.status == 200 and after.degraded == [],
                "recovered_latency_ms": after.latency_ms,
                "recovery_ms": recovery_ms,
            }
        )
    return rows


def embedded_scenarios(state: Any, backend: FaultyBackend, embedder: FaultyEmbedder, reranker: FaultyReranker,
                       *, slow_s: float) -> list[Scenario]:  # fmt: skip
    """The fault table for the embedded backend. `state` is the app's ServiceState (its caches)."""
    unreachable = BackendError("connection refused: http://admin:hunter2@10.0.0.9:9200")

    def on(target: Fault, **methods: tuple[str, Any]) -> Callable[[], None]:
        return lambda: target.methods.update(methods)

    emb_cache = FaultyCache(state.embedder.cache)
    rer_cache = FaultyCache(state.reranker.cache)
    real_caches = (state.embedder.cache, state.reranker.cache)

    def caches_on() -> None:
        emb_cache.fault.methods.update(
            get=("raise", RuntimeError("cache down")), put=("raise", RuntimeError("cache down"))
        )
        rer_cache.fault.methods.update(
            get=("raise", RuntimeError("cache down")), put=("raise", RuntimeError("cache down"))
        )
        state.embedder.cache, state.reranker.cache = emb_cache, rer_cache

    def caches_off() -> None:
        state.embedder.cache, state.reranker.cache = real_caches

    def slow_caches_on() -> None:
        emb_cache.fault.methods.update(get=("sleep", slow_s))
        rer_cache.fault.methods.update(get=("sleep", slow_s))
        state.embedder.cache, state.reranker.cache = emb_cache, rer_cache

    def slow_caches_off() -> None:
        emb_cache.fault.clear()
        rer_cache.fault.clear()
        caches_off()

    return [
        Scenario("none (baseline)", lambda: None, lambda: None, 200, []),
        Scenario("kNN failing", on(backend.fault, knn=("raise", RuntimeError("injected kNN failure"))),
                 backend.fault.clear, 200, ["knn"]),
        Scenario("kNN slow", on(backend.fault, knn=("sleep", slow_s)), backend.fault.clear, 200, ["knn", "rerank"]),
        Scenario("BM25 failing", on(backend.fault, bm25=("raise", BackendError("injected BM25 failure"))),
                 backend.fault.clear, 200, ["bm25"]),
        Scenario("backend slow (BM25 + kNN)", on(backend.fault, bm25=("sleep", slow_s), knn=("sleep", slow_s)),
                 backend.fault.clear, 503, None),
        Scenario("backend unreachable", on(backend.fault, bm25=("raise", unreachable), knn=("raise", unreachable)),
                 backend.fault.clear, 503, None),
        Scenario("embedder failing", on(embedder.fault, encode_queries=("raise", RuntimeError("injected"))),
                 embedder.fault.clear, 200, ["embed", "knn"]),
        Scenario("embedder slow", on(embedder.fault, encode_queries=("sleep", slow_s)), embedder.fault.clear,
                 200, ["embed", "knn", "rerank"]),
        Scenario("reranker failing", on(reranker.fault, score=("raise", RuntimeError("injected reranker failure"))),
                 reranker.fault.clear, 200, ["rerank"]),
        Scenario("reranker slow", on(reranker.fault, score=("sleep", slow_s)), reranker.fault.clear, 200, ["rerank"]),
        Scenario("caches failing (embedding + rerank)", caches_on, caches_off, 200, []),
        Scenario("caches slow", slow_caches_on, slow_caches_off, 200, ["embed", "knn", "rerank"]),
    ]  # fmt: skip


@contextmanager
def embedded_fault_service(work: Path, models: tuple[Any, Any], *, deadline_ms: float) -> Iterator[tuple]:
    """(TestClient, state, backend, embedder, reranker) over the demo store, every part wrapped."""
    from fastapi.testclient import TestClient

    from benchmarks.reliability.common import demo_store, make_app, service_settings

    store = demo_store(work / "fault-store", models[0])
    backend, embedder, reranker = FaultyBackend(store), FaultyEmbedder(models[0]), FaultyReranker(models[1])
    settings = service_settings(work / "fault-store")
    settings.deadline_ms = deadline_ms
    app = make_app(backend, embedder, reranker, settings)
    try:
        with TestClient(app) as client:
            yield client, app.state.service, backend, embedder, reranker
    finally:
        store.close()


# ------------------------------------------------------------------------------------------- OpenSearch


def opensearch_scenarios(work: Path, *, deadline_ms: float = 1000.0) -> list[dict[str, Any]]:
    """OpenSearch backend: a closed port, then osmem-server stopped and restarted mid-test."""
    from fastapi.testclient import TestClient
    from osmem_server import OsmemServer

    from benchmarks.reliability.common import free_port, make_app
    from middleware.backends.opensearch import OpenSearchBackend
    from middleware.cli.search import load_demo_catalog
    from middleware.config import Settings

    rows: list[dict[str, Any]] = []

    def settings_for(url: str, timeout_s: float = 2.0) -> Settings:
        return Settings(
            _env_file=None,
            backend="opensearch",
            embedder="none",
            reranker="none",
            deadline_ms=deadline_ms,
            opensearch={"url": url, "timeout_s": timeout_s, "max_retries": 0, "write_refresh": "true", "replicas": 0},
            server={"warm_up": False},
        )

    # 1. nothing listens on the port
    closed = f"http://127.0.0.1:{free_port()}"
    settings = settings_for(closed)
    backend = OpenSearchBackend.from_settings(settings)
    with TestClient(make_app(backend, None, None, settings)) as client:
        o = observe(client, {"query": QUERY, "size": 5})
        p = observe(client, {"query": {"match_all": {}}}, path="/products/_search")  # passed upstream
        rows.append({"fault": "OpenSearch: closed port (v1 search)", "status": [o.status], "degraded": o.degraded,
                     "message": o.message, "latency_ms_max": o.latency_ms, "deadline_ms": deadline_ms,
                     "as_expected": o.status == 503, "recovered": None, "recovered_latency_ms": None})  # fmt: skip
        rows.append({"fault": "OpenSearch: closed port (proxy pass-through)", "status": [p.status],
                     "degraded": None, "message": p.message, "latency_ms_max": p.latency_ms,
                     "deadline_ms": deadline_ms, "as_expected": p.status == 503, "recovered": None,
                     "recovered_latency_ms": None})  # fmt: skip
    backend.client.close()

    # 2. osmem-server up, stopped, restarted on the same address
    addr = f"127.0.0.1:{free_port()}"
    server = OsmemServer.start(addr=addr)
    url = server.url
    settings = settings_for(url)
    backend = OpenSearchBackend.from_settings(settings)
    # loading (templates, index creation) gets a generous timeout: only serving is under test
    loader = OpenSearchBackend.from_settings(settings_for(url, timeout_s=60.0))
    catalog = load_demo_catalog(None)
    loader.upsert(catalog, None)
    try:
        with TestClient(make_app(backend, None, None, settings)) as client:
            up = observe(client, {"query": QUERY, "size": 5})
            server.close(grace=0.5)
            down = [observe(client, {"query": f"{QUERY} {k}", "size": 5}) for k in range(3)]
            down_proxy = observe(client, {"query": {"match_all": {}}}, path="/products/_search")
            ready_down = client.get("/readyz").status_code
            server = OsmemServer.start(addr=addr)
            loader.client.close()
            loader = OpenSearchBackend.from_settings(settings_for(url, timeout_s=60.0))
            loader.upsert(catalog, None)  # osmem keeps its data in memory: the restarted one is empty
            after = [observe(client, {"query": f"{QUERY} again {k}", "size": 5}) for k in range(2)]
            after_proxy = observe(client, {"query": {"match_all": {}}}, path="/products/_search")
            ready_after = client.get("/readyz").status_code
        rows.append(
            {
                "fault": "OpenSearch: osmem-server stopped mid-test, then restarted",
                "status": sorted({o.status for o in down}),
                "degraded": None,
                "message": down[0].message,
                "latency_ms_max": max(o.latency_ms for o in down),
                "deadline_ms": deadline_ms,
                "before": {"status": up.status, "degraded": up.degraded},
                "proxy_pass_through_down": down_proxy.status,
                "readyz_down": ready_down,
                "as_expected": up.status == 200 and all(o.status == 503 for o in down) and down_proxy.status == 503,
                "recovered": all(o.status == 200 for o in after) and after_proxy.status == 200 and ready_after == 200,
                "recovered_latency_ms": max(o.latency_ms for o in after),
                "after_statuses": [o.status for o in after] + [after_proxy.status],
            }
        )
    finally:
        backend.client.close()
        loader.client.close()
        server.close(grace=0.5)
    return rows


def run(work: Path, *, quick: bool) -> dict[str, Any]:
    from benchmarks.reliability.common import load_models

    deadline_ms = 600.0
    models = load_models(work)
    with embedded_fault_service(work, models, deadline_ms=deadline_ms) as (client, state, backend, emb, rer):
        observe(client)  # warm: lazy loads are not faults
        scenarios = embedded_scenarios(state, backend, emb, rer, slow_s=deadline_ms / 1000.0 * 2.5)
        rows = run_scenarios(client, scenarios, deadline_ms=deadline_ms, repeats=2 if quick else 5)
    rows += opensearch_scenarios(work, deadline_ms=deadline_ms)
    return {"deadline_ms": deadline_ms, "rows": rows, "all_as_expected": all(r["as_expected"] for r in rows),
            "all_recovered": all(r["recovered"] in (True, None) for r in rows)}  # fmt: skip
