"""Security as behaviour: every route behind the API key, the dangerous-endpoint table, index-name
escapes (against a real upstream: osmem-server), secrets in logs and error bodies, TLS on by default."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from benchmarks.reliability import security
from benchmarks.reliability.common import free_port
from benchmarks.reliability.faults import FaultyBackend
from middleware.backends.base import BackendError
from middleware.server.auth import ApiKeyChecker
from tests.test_server_support import server_models

__all__ = ["server_models"]

MARKER = "SECRET-MARKER-9d2f"


@pytest.fixture
def upstream(osmem_clone):
    """An upstream OpenSearch holding an index outside the allowed set, with a marker document."""
    from osmem_server import _request

    _request("PUT", f"{osmem_clone.url}/secret", {})
    _request("PUT", f"{osmem_clone.url}/secret/_doc/s1?refresh=true", {"title": MARKER})
    return osmem_clone


@pytest.fixture
def secured(server_models, upstream, tmp_path: Path):
    app, store = security.secured_app(tmp_path, server_models, upstream_url=upstream.url)
    with TestClient(app) as client:
        yield client, app
    store.close()


def _secret_count(upstream) -> int:
    from osmem_server import _request

    return _request("GET", f"{upstream.url}/secret/_count")["count"]


def test_every_route_but_health_needs_the_key(secured) -> None:
    client, app = secured
    rows = security.auth_rows(client, app)
    assert len(rows) >= 40  # enumerated from the app: /v1, proxy, docs, metrics
    assert [r for r in rows if not r["ok"]] == []
    assert {r["path"] for r in rows if r["no_key"] != 401} == {"/healthz", "/readyz"}


def test_credential_forms(secured) -> None:
    forms = security.credential_forms(secured[0])
    accepted = {name for name, status in forms.items() if status != 401}
    assert accepted == {
        "x-api-key",
        "Authorization: ApiKey",
        "Authorization: Bearer",
        "Authorization: Basic (key as password)",
    }


def test_every_configured_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behaviour: each check runs hmac.compare_digest against every key, whether or where it matches."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = [b"first-key-aaaa", b"second-key-bbb", b"third-key-cccc"]
    checker = ApiKeyChecker(keys)
    for candidate, expected in [("first-key-aaaa", True), ("third-key-cccc", True), ("first-key-aaab", False)]:
        calls.clear()
        assert checker.allows({"x-api-key": candidate}) is expected
        assert [b for _, b in calls] == keys  # no early exit on a match, none on a mismatch


def test_dangerous_endpoints_are_refused_and_never_forwarded(secured, upstream) -> None:
    rows = security.dangerous_rows(secured[0])
    assert len(rows) >= 50
    assert [r for r in rows if not r["ok"]] == []
    assert _secret_count(upstream) == 1  # nothing reached the cluster


def test_writes_pass_only_when_enabled(server_models, upstream, tmp_path: Path) -> None:
    from benchmarks.reliability.common import make_app, service_settings

    store = security.secured_app(tmp_path, server_models, upstream_url=None)[1]
    try:
        settings = service_settings(tmp_path, upstream_url=upstream.url, enable_writes=True)
        with TestClient(make_app(store, *server_models, settings)) as client:
            r = client.put("/products-extra", json={})
            assert r.status_code == 200 and r.headers["x-shopsearch-passthrough"] == "1"
            # enabled writes still never reach an index outside the allowed set, nor run scripts
            assert client.delete("/secret").status_code == 403
            assert client.post("/_scripts/x", json={"script": {"source": "1"}}).status_code == 400
    finally:
        store.close()
    assert _secret_count(upstream) == 1


def test_index_names_cannot_escape_the_allowed_set(secured, upstream) -> None:
    rows = security.escape_rows(secured[0], MARKER)
    assert len(rows) == len(security.ESCAPES) * 16
    assert [r for r in rows if r["leaked"] or r["status"] >= 500] == []
    # only "." reaches the upstream: clients drop it from the path (`/_cat/count/.` → `/_cat/count`), which the
    # proxy scopes to the allowed set
    assert {r["index"] for r in rows if r["forwarded"]} <= {"."}
    assert _secret_count(upstream) == 1


def test_secrets_never_reach_logs_or_error_bodies(server_models, tmp_path: Path) -> None:
    app, store = security.secured_app(
        tmp_path, server_models, upstream_url=f"http://admin:{security.URL_PASSWORD}@127.0.0.1:{free_port()}"
    )
    state = app.state.service
    failing = FaultyBackend(state.base.backend)
    down = BackendError(f"connection refused: http://admin:{security.OS_PASSWORD}@10.0.0.9:9200")
    failing.fault.methods.update(bm25=("raise", down), knn=("raise", down), count=("raise", down))
    state.pipeline.backend = state.base.backend = failing
    try:
        with TestClient(app) as client:
            result = security.secrets_check(client)
    finally:
        store.close()
    assert 503 in result["statuses"] and 401 in result["statuses"] and result["log_records"] > 0
    assert max(result["statuses"]) < 500 or 503 in result["statuses"]
    assert 500 not in result["statuses"]
    assert result["secrets_in_error_bodies"] == []
    assert result["secrets_in_logs"] == []
    # redacted where they are logged, so a service embedded without serve's log filter leaks nothing either
    assert result["secrets_in_logs_without_the_serve_filter"] == []


def test_tls_verification_is_on_by_default(tmp_path: Path) -> None:
    result = security.tls_check(tmp_path)
    assert result["ok"], result
    assert result["opensearch_client_default"].startswith("refused: TLS error")


def test_upstream_url_credentials_become_basic_auth_and_stay_out_of_logs(server_models, tmp_path: Path, caplog) -> None:
    """user:password@ in server.upstream_url reach the cluster as Basic auth, never as part of a URL that
    httpx writes into its request log lines (regression: they did)."""
    import base64
    import http.server
    import logging
    import threading

    seen: list[str | None] = []

    class Cluster(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            seen.append(self.headers.get("authorization"))
            body = b'{"took":1,"timed_out":false,"hits":{"total":{"value":0,"relation":"eq"},"hits":[]}}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Cluster)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://admin:{security.URL_PASSWORD}@127.0.0.1:{server.server_address[1]}"
    from benchmarks.reliability.common import demo_store, make_app, service_settings

    store = demo_store(tmp_path / "store", server_models[0])
    settings = service_settings(tmp_path / "store", api_keys=[security.API_KEY], upstream_url=url)
    app = make_app(store, *server_models, settings)  # no opensearch credentials configured: the URL's count
    try:
        with caplog.at_level(logging.DEBUG), TestClient(app) as client:
            answer = client.get("/_cluster/settings", headers={"x-api-key": security.API_KEY})
            match_all = {"query": {"match_all": {}}}  # not a text query: passed through to the cluster
            forwarded = client.post("/products/_search", json=match_all, headers={"x-api-key": security.API_KEY})
    finally:
        server.shutdown()
        store.close()
    assert answer.status_code == 403  # a dangerous route: refused, not forwarded
    assert forwarded.status_code == 200 and forwarded.json()["hits"]["hits"] == []
    expected = "Basic " + base64.b64encode(f"admin:{security.URL_PASSWORD}".encode()).decode()
    assert seen == [expected]
    assert any("HTTP Request" in r.getMessage() for r in caplog.records)  # httpx did log the request line
    assert security.URL_PASSWORD not in caplog.text
