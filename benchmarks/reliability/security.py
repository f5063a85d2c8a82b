"""Security checks of the service, as behaviour: every route behind the API key, the dangerous-endpoint
table, index-name escapes, secrets in logs and error bodies, TLS verification by default.

Each check returns rows; the tests assert on them and the harness reports them.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from starlette.routing import Route

API_KEY = "sk-live-7f3a9c0e5b214d6e8a1f"
OS_PASSWORD = "os-pass-Q9vX2mK7"
URL_PASSWORD = "url-pass-H4nT8rW1"

# Write and admin endpoints of OpenSearch, refused by the proxy unless server.enable_writes.
DANGEROUS: list[tuple[str, str]] = [
    ("DELETE", "/products"), ("DELETE", "/products-v1"), ("DELETE", "/products*"), ("DELETE", "/_all"),
    ("DELETE", "/*"), ("PUT", "/products"), ("PUT", "/products-new"), ("PUT", "/products/_mapping"),
    ("PUT", "/products/_settings"), ("POST", "/products/_close"), ("POST", "/products/_open"),
    ("POST", "/_bulk"), ("PUT", "/_bulk"), ("POST", "/products/_bulk"),
    ("POST", "/products/_update_by_query"), ("POST", "/products/_delete_by_query"), ("POST", "/_reindex"),
    ("PUT", "/_cluster/settings"), ("GET", "/_cluster/settings"), ("POST", "/_cluster/reroute"),
    ("PUT", "/_snapshot/repo"), ("GET", "/_snapshot"), ("POST", "/_snapshot/repo/snap/_restore"),
    ("GET", "/_security/user"), ("PUT", "/_plugins/_security/api/internalusers/admin"),
    ("GET", "/_plugins/_security/authinfo"), ("POST", "/_plugins/_ml/models/_register"),
    ("POST", "/_plugins/_sql"), ("PUT", "/_plugins/_ism/policies/p"),
    ("PUT", "/_scripts/evil"), ("POST", "/_scripts/evil"), ("DELETE", "/_scripts/evil"), ("GET", "/_scripts/evil"),
    ("PUT", "/products/_doc/1"), ("POST", "/products/_doc"), ("DELETE", "/products/_doc/w01"),
    ("POST", "/products/_update/w01"), ("PUT", "/products/_create/1"),
    ("POST", "/_aliases"), ("PUT", "/products/_alias/x"), ("DELETE", "/products-v1/_alias/products"),
    ("PUT", "/_ingest/pipeline/x"), ("DELETE", "/_ingest/pipeline/x"), ("POST", "/_ingest/pipeline/_simulate"),
    ("POST", "/_tasks/node:1/_cancel"), ("POST", "/_tasks/_cancel"), ("POST", "/_cache/clear"),
    ("POST", "/products/_forcemerge"), ("POST", "/_nodes/reload_secure_settings"), ("GET", "/_nodes"),
    ("PUT", "/_index_template/x"), ("PUT", "/_component_template/x"), ("PUT", "/_search/pipeline/x"),
    ("POST", "/products/_rollover"), ("PUT", "/_data_stream/x"), ("POST", "/products/_search/template"),
    ("POST", "/_search/scroll"), ("DELETE", "/_search/point_in_time"), ("POST", "/products/_split/x"),
]  # fmt: skip

# Index expressions that must never reach an index outside server.allowed_indices.
ESCAPES = ["..", "%2e%2e", ".", "*", "_all", "secret", "products,secret", "secret,products", "remote:products",
           "products:secret", "products%2C..%2Fsecret", "%2e%2e%2Fsecret", "products%2F..%2Fsecret", "-products",
           "+secret", "products*,-products", "PRODUCTS", "*ecret", "se*"]  # fmt: skip


def _concrete(path: str) -> str:
    """A route template with its parameters filled in."""
    values = {"index": "products", "doc_id": "w01", "product_id": "w01", "path": "_bulk", "what": "indices"}
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: values.get(m.group(1), "x"), path)


def _flat_routes(routes: list[Any]) -> Iterator[Route]:
    for route in routes:
        if isinstance(route, Route):
            yield route
        inner = getattr(route, "original_router", None) or getattr(route, "routes", None)
        if inner is not None:  # an included router (FastAPI ≥ 0.16x wraps them)
            yield from _flat_routes(getattr(inner, "routes", inner))


def enumerate_routes(app: Any) -> list[tuple[str, str]]:
    """(method, concrete path) for every route the app serves, read from the app, not hard-coded."""
    out = []
    for route in _flat_routes(app.routes):
        for method in sorted(route.methods or []):
            out.append((method, _concrete(route.path)))
    return sorted(set(out))


def auth_rows(client: Any, app: Any) -> list[dict[str, Any]]:
    """Every route without a key, with a wrong key (same length, last character changed), with the key."""
    wrong = API_KEY[:-1] + ("0" if API_KEY[-1] != "0" else "1")
    open_paths = {"/healthz", "/readyz"}
    rows = []
    for method, path in [*enumerate_routes(app), ("GET", "/no/such/route"), ("POST", "/v1/nothing")]:
        body = b"{}" if method in {"POST", "PUT", "PATCH"} else None
        none = client.request(method, path, content=body).status_code
        bad = client.request(method, path, content=body, headers={"x-api-key": wrong}).status_code
        good = client.request(method, path, content=body, headers={"x-api-key": API_KEY}).status_code
        expect_open = path in open_paths
        rows.append(
            {
                "method": method,
                "path": path,
                "no_key": none,
                "wrong_key": bad,
                "right_key": good,
                "ok": (none != 401 and bad != 401) if expect_open else (none == 401 and bad == 401 and good != 401),
            }
        )
    return rows


def credential_forms(client: Any) -> dict[str, int]:
    """The key in each accepted form, and near misses."""
    import base64

    basic = base64.b64encode(f"storefront:{API_KEY}".encode()).decode()
    forms = {
        "x-api-key": {"x-api-key": API_KEY},
        "Authorization: ApiKey": {"authorization": f"ApiKey {API_KEY}"},
        "Authorization: Bearer": {"authorization": f"Bearer {API_KEY}"},
        "Authorization: Basic (key as password)": {"authorization": f"Basic {basic}"},
        "key as user name (Basic)": {"authorization": "Basic " + base64.b64encode(f"{API_KEY}:x".encode()).decode()},
        "prefix of the key": {"x-api-key": API_KEY[:-1]},
        "key plus a character": {"x-api-key": API_KEY + "x"},
        "key in the query string": {},
        "empty key": {"x-api-key": ""},
        "invalid base64": {"authorization": "Basic !!!"},
    }
    out = {}
    for name, headers in forms.items():
        params = {"api_key": API_KEY} if name == "key in the query string" else None
        out[name] = client.post("/v1/search", json={"query": "手表"}, headers=headers, params=params).status_code
    return out


def comparison_timing(trials: int = 20_000) -> dict[str, Any]:
    """Median time of ApiKeyChecker.allows for a key sharing no prefix vs all but its last character.

    A figure, not a test (the machine is shared): with a constant-time comparison the two are equal
    within noise; an early-exit `==` on long keys shows a prefix-dependent difference.
    """
    from middleware.server.auth import ApiKeyChecker

    key = "k" * 4096
    checker = ApiKeyChecker([key.encode()])
    cases = {"no common prefix": "x" * 4096, "all but the last byte": "k" * 4095 + "x"}
    medians = {}
    for name, candidate in cases.items():
        headers = {"x-api-key": candidate}
        times = []
        for _ in range(trials):
            t0 = time.perf_counter_ns()
            checker.allows(headers)
            times.append(time.perf_counter_ns() - t0)
        medians[name] = statistics.median(times)
    naive = {}
    for name, candidate in cases.items():  # the same measurement for a plain == (the contrast)
        times = []
        for _ in range(trials):
            t0 = time.perf_counter_ns()
            _ = candidate.encode() == key.encode()
            times.append(time.perf_counter_ns() - t0)
        naive[name] = statistics.median(times)
    return {"trials": trials, "key_bytes": 4096, "allows_median_ns": medians, "plain_equals_median_ns": naive}


def dangerous_rows(client: Any) -> list[dict[str, Any]]:
    rows = []
    for method, path in DANGEROUS:
        body = b'{"script":{"source":"1"}}' if "_scripts" in path else b"{}"
        r = client.request(
            method, path, content=body, headers={"x-api-key": API_KEY, "content-type": "application/json"}
        )
        rows.append(
            {
                "method": method,
                "path": path,
                "status": r.status_code,
                "forwarded": r.headers.get("x-shopsearch-passthrough") == "1",
                "ok": r.status_code == 403 and r.headers.get("x-shopsearch-passthrough") != "1",
            }
        )
    return rows


def escape_rows(client: Any, secret_marker: str) -> list[dict[str, Any]]:
    """Each escape expression in every place an index name goes; nothing may reach `secret`."""
    rows = []
    headers = {"x-api-key": API_KEY, "content-type": "application/json"}
    search = b'{"query":{"match":{"title":"x"}}}'
    for expr in ESCAPES:
        places = [
            ("POST", f"/{expr}/_search", search),
            ("GET", f"/{expr}/_search?q=x", None),
            ("POST", f"/{expr}/_search", b'{"query":{"match_all":{}}}'),
            ("GET", f"/{expr}/_count", None),
            ("GET", f"/{expr}/_doc/s1", None),
            ("GET", f"/{expr}/_source/s1", None),
            ("POST", f"/{expr}/_mget", b'{"ids":["s1"]}'),
            ("POST", "/_mget", json.dumps({"docs": [{"_index": expr, "_id": "s1"}]}).encode()),
            ("POST", "/_msearch", (json.dumps({"index": expr}) + '\n{"query":{"match_all":{}}}\n').encode()),
            ("GET", f"/{expr}", None),
            ("GET", f"/_cluster/health/{expr}", None),
            ("GET", f"/_cat/indices/{expr}", None),
            ("GET", f"/_cat/count/{expr}", None),
            ("GET", f"/_cat/shards/{expr}", None),
            ("GET", f"/_cat/segments/{expr}", None),
            ("GET", f"/_cat/aliases/{expr}", None),
        ]
        for method, path, body in places:
            r = client.request(method, path, content=body, headers=headers)
            forwarded = r.headers.get("x-shopsearch-passthrough") == "1"
            # the marker document, or (in a forwarded answer) the out-of-set index's very name
            leaked = secret_marker in r.text or (forwarded and "secret" in r.text)
            rows.append(
                {
                    "index": expr,
                    "method": method,
                    "path": path,
                    "status": r.status_code,
                    "forwarded": forwarded,
                    "leaked": leaked,
                    "ok": not leaked and r.status_code < 500,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------- secrets


class Capture(logging.Handler):
    """Every log record, formatted as the service's handlers would, with and without the redaction
    filter `shopsearch serve` installs on the root handlers."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.raw: list[str] = []
        self.filtered: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        from middleware.server.errors import RedactingFilter

        text = self.format(record)
        self.raw.append(text)
        RedactingFilter().filter(record)
        record.exc_text = None
        self.filtered.append(self.format(record))


@contextmanager
def captured_logs() -> Iterator[Capture]:
    root = logging.getLogger()
    handler = Capture()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def secret_probe_requests(client: Any) -> list[tuple[int, str]]:
    """Requests that make the service talk about failures: (status, body + headers) of each."""
    out = []
    good = {"x-api-key": API_KEY}
    probes: list[tuple[str, str, dict[str, str], bytes | None]] = [
        ("POST", "/v1/search", {}, b'{"query":"x"}'),
        ("POST", "/v1/search", {"x-api-key": API_KEY[:-1]}, b'{"query":"x"}'),
        ("POST", "/v1/search", {"authorization": f"Bearer {API_KEY}x"}, b'{"query":"x"}'),
        ("POST", "/v1/search", good, b'{"query":"x"}'),  # backend down: 503
        ("POST", "/products/_search", good, b'{"query":{"match_all":{}}}'),  # upstream down: 503
        ("POST", "/products/_search", good, b'{"query":{"match":{"title":"x"}}}'),
        ("GET", "/readyz", {}, None),
        ("GET", "/products/_count", good, None),
        ("GET", "/_cat/nodes", good, None),
        ("POST", "/v1/search", good, b'{"query":'),
        ("GET", "/metrics", good, None),
    ]
    for method, path, headers, body in probes:
        r = client.request(method, path, content=body, headers={**headers, "content-type": "application/json"})
        out.append((r.status_code, r.text + " " + " ".join(f"{k}: {v}" for k, v in r.headers.items())))
    return out


def secrets_check(client: Any) -> dict[str, Any]:
    secrets = [API_KEY, OS_PASSWORD, URL_PASSWORD]
    with captured_logs() as logs:
        answers = secret_probe_requests(client)
    in_bodies = [s for s in secrets for _, text in answers if s in text]
    in_logs = [s for s in secrets for line in logs.filtered if s in line]
    in_raw = [s for s in secrets for line in logs.raw if s in line]
    return {
        "requests": len(answers),
        "statuses": [status for status, _ in answers],
        "log_records": len(logs.raw),
        "secrets_in_error_bodies": sorted(set(in_bodies)),
        "secrets_in_logs": sorted(set(in_logs)),
        "secrets_in_logs_without_the_serve_filter": sorted(set(in_raw)),
    }


# ------------------------------------------------------------------------------------------------ TLS


def self_signed(work: Path) -> tuple[Path, Path]:
    cert, key = work / "tls-cert.pem", work / "tls-key.pem"
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
    return cert, key


@contextmanager
def tls_server(work: Path) -> Iterator[str]:
    """A loopback HTTPS server with a self-signed certificate that answers like OpenSearch's `GET /`."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    cert, key = self_signed(work)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"version":{"distribution":"opensearch","number":"2.19.1"},"hits":{"hits":[]}}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def tls_check(work: Path, models: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Defaults verify certificates: an untrusted certificate is refused by the OpenSearch client and the
    proxy's upstream client; trusting it (ca_certs) or turning verification off are explicit choices."""
    from fastapi.testclient import TestClient

    from benchmarks.reliability.common import make_app, service_settings
    from middleware.backends.base import BackendError
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.backends.opensearch import OpenSearchBackend
    from middleware.config import Settings

    defaults = Settings(_env_file=None)
    out: dict[str, Any] = {
        "default_opensearch_verify_certs": defaults.opensearch.verify_certs,
        "default_upstream_verify_certs": defaults.server.upstream_verify_certs,
    }
    cert, _ = self_signed(work)
    with tls_server(work) as url:

        def os_count(**cfg: Any) -> str:
            s = Settings(_env_file=None, backend="opensearch", opensearch={"url": url, "max_retries": 0, **cfg})
            backend = OpenSearchBackend.from_settings(s)
            try:
                backend.client.info()
                return "connected"
            except Exception as err:
                try:
                    with backend._errors("info"):
                        raise err
                except BackendError as translated:
                    return f"refused: {translated}"
                return f"refused: {type(err).__name__}"
            finally:
                backend.client.close()

        out["opensearch_client_default"] = os_count()
        out["opensearch_client_with_ca_certs"] = os_count(ca_certs=str(cert))
        out["opensearch_client_verify_off"] = os_count(verify_certs=False)

        store = EmbeddedBackend(work / "tls-store")
        try:
            for name, server in (("default", {}), ("ca_certs", None), ("verify off", {"upstream_verify_certs": False})):
                settings = service_settings(work / "tls-store", upstream_url=url, **(server or {}))
                if server is None:
                    settings.opensearch.ca_certs = cert
                with TestClient(make_app(store, None, None, settings)) as client:
                    r = client.post("/products/_search", json={"query": {"match_all": {}}})
                out[f"proxy_upstream_{name}"] = r.status_code
        finally:
            store.close()
    out["ok"] = (
        out["default_opensearch_verify_certs"]
        and out["default_upstream_verify_certs"]
        and out["opensearch_client_default"].startswith("refused")
        and out["opensearch_client_with_ca_certs"] == "connected"
        and out["proxy_upstream_default"] == 503
        and out["proxy_upstream_ca_certs"] == 200
    )
    return out


# ----------------------------------------------------------------------------------------------- all


def secured_app(work: Path, models: tuple[Any, Any], *, upstream_url: str | None, backend: Any = None) -> Any:
    """The demo service with API keys, an OpenSearch password and an upstream with URL credentials."""
    from benchmarks.reliability.common import demo_store, make_app, service_settings

    store = backend or demo_store(work / "security-store", models[0])
    settings = service_settings(work / "security-store", api_keys=[API_KEY], upstream_url=upstream_url)
    settings.opensearch.username = "admin"
    from pydantic import SecretStr

    settings.opensearch.password = SecretStr(OS_PASSWORD)
    return make_app(store, models[0], models[1], settings), store


def run(work: Path, *, quick: bool) -> dict[str, Any]:
    from fastapi.testclient import TestClient
    from osmem_server import OsmemServer

    from benchmarks.reliability.common import free_port, load_models

    models = load_models(work)
    out: dict[str, Any] = {}
    with OsmemServer.start() as osmem:
        # an index outside the allowed set, with a marker document: nothing may ever show it
        osmem.request("PUT", "/secret", {})
        osmem.request("PUT", "/secret/_doc/s1?refresh=true", {"title": "SECRET-MARKER-9d2f"})
        app, store = secured_app(work, models, upstream_url=osmem.url)
        try:
            with TestClient(app) as client:
                out["auth"] = auth_rows(client, app)
                out["credential_forms"] = credential_forms(client)
                out["dangerous"] = dangerous_rows(client)
                out["escapes"] = escape_rows(client, "SECRET-MARKER-9d2f")
            out["secret_index_intact"] = osmem.request("GET", "/secret/_count")["count"] == 1
        finally:
            store.close()
    # secrets: a backend that fails with credentials in its message, an unreachable upstream with URL creds
    from benchmarks.reliability.faults import FaultyBackend

    app, store = secured_app(work, models, upstream_url=f"http://admin:{URL_PASSWORD}@127.0.0.1:{free_port()}")
    failing = FaultyBackend(app.state.service.base.backend)
    from middleware.backends.base import BackendError

    down = BackendError(f"connection refused: http://admin:{OS_PASSWORD}@10.0.0.9:9200")
    failing.fault.methods.update(bm25=("raise", down), knn=("raise", down), count=("raise", down))
    app.state.service.pipeline.backend = failing
    app.state.service.base.backend = failing
    try:
        with TestClient(app) as client:
            out["secrets"] = secrets_check(client)
    finally:
        store.close()
    out["tls"] = tls_check(work)
    out["comparison_timing"] = comparison_timing(5_000 if quick else 50_000)
    out["summary"] = {
        "routes_checked": len(out["auth"]),
        "routes_ok": sum(r["ok"] for r in out["auth"]),
        "dangerous_checked": len(out["dangerous"]),
        "dangerous_refused": sum(r["ok"] for r in out["dangerous"]),
        "escape_requests": len(out["escapes"]),
        "escape_leaks": sum(r["leaked"] for r in out["escapes"]),
        "escape_forwarded": sum(r["forwarded"] for r in out["escapes"]),
        "escape_5xx": sum(r["status"] >= 500 for r in out["escapes"]),
    }
    return out
