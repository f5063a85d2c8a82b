"""Fault injection in serving: the real store, models and caches wrapped so one method raises or sleeps.
Each fault answers within the deadline with the right `degraded` list or a clear 503, and the service
recovers when the fault clears. OpenSearch: a closed port, and osmem-server stopped and restarted."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from benchmarks.reliability import faults
from benchmarks.reliability.common import make_app, service_settings
from middleware.backends.base import BackendError
from tests.test_server_support import server_models, server_store

__all__ = ["server_models", "server_store"]

DEADLINE_MS = 1500.0  # roomy: on a shared 2-core machine a healthy stage must not miss it
MARGIN_MS = 1500.0  # thread hops; the bound itself is the deadline


def test_fault_table(server_models, tmp_path: Path) -> None:
    with faults.embedded_fault_service(tmp_path, server_models, deadline_ms=DEADLINE_MS) as (
        client,
        state,
        backend,
        embedder,
        reranker,
    ):
        faults.observe(client)  # lazy loads are not faults
        scenarios = faults.embedded_scenarios(state, backend, embedder, reranker, slow_s=2.5)
        rows = faults.run_scenarios(client, scenarios, deadline_ms=DEADLINE_MS, repeats=1)
    by_fault = {r["fault"]: r for r in rows}
    assert [r["fault"] for r in rows if not r["as_expected"]] == [], rows
    assert [r["fault"] for r in rows if not r["recovered"]] == []
    assert all(r["latency_ms_max"] <= DEADLINE_MS + MARGIN_MS for r in rows), rows
    # a cache outage costs hits, never a model stage (regression: it degraded embed, knn and rerank)
    assert by_fault["caches failing (embedding + rerank)"]["degraded"] == []
    unreachable = by_fault["backend unreachable"]
    assert unreachable["status"] == [503] and "backend unavailable" in unreachable["message"]
    assert "hunter2" not in unreachable["message"]  # credentials in the backend's message are redacted


def test_unreachable_backend_is_503_on_every_route(server_store, server_models) -> None:
    """Regression: _count, _doc, _mget, _cat and /v1/products answered a bare 500 when the backend was down."""
    backend = faults.FaultyBackend(server_store)
    down = BackendError("connection refused: http://admin:hunter2@10.0.0.9:9200")
    for method in ("bm25", "knn", "get", "count", "stats"):
        backend.fault.methods[method] = ("raise", down)
    settings = service_settings()
    with TestClient(make_app(backend, *server_models, settings)) as client:
        answers = {
            "v1 search": client.post("/v1/search", json={"query": "手表"}),
            "v1 product": client.get("/v1/products/w01"),
            "proxy search": client.post("/products/_search", json={"query": {"match": {"title": "手表"}}}),
            "count": client.get("/products/_count"),
            "doc": client.get("/products/_doc/w01"),
            "source": client.get("/products/_source/w01"),
            "mget": client.post("/products/_mget", json={"ids": ["w01"]}),
            "cat": client.get("/_cat/indices"),
        }
        backend.fault.clear()
        recovered = client.get("/products/_count")
    assert {name: r.status_code for name, r in answers.items()} == dict.fromkeys(answers, 503)
    assert all("hunter2" not in r.text and r.headers.get("retry-after") == "1" for r in answers.values())
    assert recovered.status_code == 200 and recovered.json()["count"] == 28


def test_opensearch_closed_port_and_osmem_restart(tmp_path: Path) -> None:
    rows = faults.opensearch_scenarios(tmp_path, deadline_ms=DEADLINE_MS)
    assert [r["fault"] for r in rows if not r["as_expected"]] == [], rows
    restart = rows[-1]
    assert restart["before"] == {"status": 200, "degraded": []}
    assert restart["readyz_down"] == 503 and restart["proxy_pass_through_down"] == 503
    assert restart["recovered"], restart
    assert all(r["latency_ms_max"] <= DEADLINE_MS + MARGIN_MS for r in rows), rows
