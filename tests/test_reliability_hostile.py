"""Hostile input against the live service (uvicorn on loopback): the fixed nasty list, a few hundred
schemathesis cases over the OpenAPI schema and hypothesis-built proxy requests. No response ≥ 500, no
unhandled error, the server alive afterwards. (The long run sends ≥ 10,000: python -m benchmarks.reliability.)"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from benchmarks.reliability import hostile
from benchmarks.reliability.common import free_port, live_server, make_app, service_settings
from tests.test_server_support import fill_store, server_models

__all__ = ["server_models"]


@pytest.fixture(scope="module")
def service(server_models, tmp_path_factory: pytest.TempPathFactory):
    """A writable demo store (writes enabled: upserts and deletes are fuzzed too) behind uvicorn."""
    store = fill_store(tmp_path_factory.mktemp("hostile-store"), server_models[0])
    settings = service_settings(enable_writes=True, max_queue=256)
    app = make_app(store, *server_models, settings)
    errors = hostile.ErrorLog()
    logging.getLogger().addHandler(errors)
    try:
        with live_server(app) as url, httpx.Client(base_url=url, timeout=30.0) as client:
            yield client, app, settings, errors
    finally:
        logging.getLogger().removeHandler(errors)
        store.close()


def _unhandled(errors: hostile.ErrorLog) -> list[str]:
    return [r for r in errors.records if "unhandled" in r]


def test_nasty_requests_are_refused_or_handled(service) -> None:
    client, _, settings, errors = service
    tally = hostile.Tally()
    rows = {r["case"]: r["status"] for r in hostile.run_nasty(client, tally, settings.server.max_body_bytes)}
    assert tally.server_errors == [] and _unhandled(errors) == []
    assert rows["oversized body (declared)"] == 413 and rows["oversized body (chunked, no length)"] == 413
    assert rows["huge size"] in (400, 422) and rows["proxy huge size"] == 400
    assert rows["deep JSON object (proxy)"] == 400 and rows["invalid UTF-8 (proxy)"] == 400
    assert rows["10k-char query (v1)"] == 200 and rows["100k-char query (v1)"] == 200  # cut, never refused
    assert rows["control characters"] == 200
    scripts = [name for name in rows if "script" in name]
    assert len(scripts) >= 10 and all(rows[name] in (400, 403) for name in scripts)
    # regressions: each of these answered 500 before its fix
    assert rows["timeout 20m (proxy)"] == 200 and rows["timeout huge (proxy)"] == 200
    assert rows["sales 10**30 in an upsert"] == 422
    assert rows["deadline_ms 5e-324 (v1)"] == 400 and rows["timeout 1nanos (proxy)"] == 400
    assert client.get("/healthz").status_code == 200


def test_schemathesis_and_proxy_fuzzing(service) -> None:
    client, app, _, errors = service
    tally = hostile.Tally()
    hostile.run_schemathesis(client, app.openapi(), tally, per_operation=8, seed_=1)
    hostile.run_proxy_fuzz(client, tally, examples=120, seed_=1)
    summary = tally.summary()
    assert summary["requests"] >= 200
    assert summary["responses_5xx"] == 0, summary["server_error_examples"]
    assert _unhandled(errors) == []
    assert [e for e in tally.transport_errors if e.get("source") != "schemathesis"] == []
    assert client.get("/healthz").status_code == 200


def test_scripts_are_refused_before_reaching_the_upstream(server_models, tmp_path: Path) -> None:
    """With an upstream configured (a closed port: forwarding would answer 503), scripts get 400."""
    store = fill_store(tmp_path / "store", server_models[0])
    settings = service_settings(upstream_url=f"http://127.0.0.1:{free_port()}")
    try:
        with TestClient(make_app(store, *server_models, settings)) as client:
            for name, method, path, kwargs in hostile.nasty_requests(settings.server.max_body_bytes):
                if "script" in name:
                    r = client.request(method, path, **kwargs)
                    assert r.status_code in (400, 403), (name, r.status_code, r.text)
                    assert r.headers.get("x-shopsearch-passthrough") is None
    finally:
        store.close()
