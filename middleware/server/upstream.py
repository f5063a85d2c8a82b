"""The OpenSearch cluster behind the proxy, for the requests the pipeline does not answer."""

from __future__ import annotations

import ssl
from collections.abc import Mapping

import httpx
from fastapi import Response

from middleware.config import Settings
from middleware.credentials import resolve_cluster_credentials
from middleware.server.errors import ApiError, redact
from middleware.server.metrics import ServiceMetrics

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length",
               "content-encoding", "proxy-authenticate", "proxy-authorization"}  # fmt: skip


class Upstream:
    """The upstream cluster: requests forwarded as they are, answers returned as they are.

    Client credentials are never forwarded (they are ours); the cluster's own credentials come from
    the `opensearch` settings by the one rule (`resolve_cluster_credentials`), or else from
    user:password@ in the URL. TLS certificates are verified unless server.upstream_verify_certs is off.
    """

    def __init__(self, base_url: str, client: httpx.AsyncClient, metrics: ServiceMetrics) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = client
        self.metrics = metrics

    @classmethod
    def from_settings(cls, settings: Settings, metrics: ServiceMetrics) -> Upstream | None:
        """None without an upstream (no server.upstream_url, and not the OpenSearch backend).
        Raises CredentialsError (a ValueError naming the setting) for unusable credentials."""
        url = settings.server.upstream_url
        if url is None and settings.backend == "opensearch" and settings.opensearch.url:
            url = settings.opensearch.url[0]
        if not url:
            return None
        os_cfg = settings.opensearch
        verify: bool | ssl.SSLContext = settings.server.upstream_verify_certs
        if verify and os_cfg.ca_certs is not None:
            verify = ssl.create_default_context(cafile=str(os_cfg.ca_certs))
        creds = resolve_cluster_credentials(os_cfg)
        headers: dict[str, str] = {}
        auth: httpx.BasicAuth | None = None
        if creds.api_key is not None:
            headers["authorization"] = f"ApiKey {creds.api_key}"
        elif creds.username is not None and creds.password is not None:
            auth = httpx.BasicAuth(creds.username, creds.password)
        # user:password@ in the URL become Basic auth (unless credentials are configured): left in the
        # URL, httpx would write them into every request line it logs
        parsed = httpx.URL(url)
        if parsed.userinfo:
            if auth is None and creds.api_key is None:
                auth = httpx.BasicAuth(parsed.username, parsed.password)
            url = str(parsed.copy_with(username=None, password=None))
        client = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            verify=verify,
            timeout=settings.server.upstream_timeout_s,
            headers=headers,
            auth=auth,
            follow_redirects=False,
        )
        return cls(url, client, metrics)

    async def forward(
        self,
        method: str,
        path: str,
        params: list[tuple[str, str]],
        body: bytes | None,
        headers: Mapping[str, str],
    ) -> Response:
        """The upstream's answer as is, or 503/504 in OpenSearch's error shape."""
        sent = {k: v for k, v in headers.items() if k.lower() in {"content-type", "accept", "x-opaque-id"}}
        try:
            resp = await self.client.request(method, path, params=params, content=body or None, headers=sent)
        except httpx.TimeoutException:
            self.metrics.passthrough.labels("timeout").inc()
            raise ApiError(504, "the upstream OpenSearch did not answer in time", os_type="timeout_exception") from None
        except httpx.HTTPError as err:
            self.metrics.passthrough.labels("unreachable").inc()
            raise ApiError(
                503,
                f"the upstream OpenSearch is unreachable: {redact(type(err).__name__)}",
                os_type="unavailable_exception",
                headers={"Retry-After": "1"},
            ) from None
        self.metrics.passthrough.labels(str(resp.status_code // 100) + "xx").inc()
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
        out_headers["x-shopsearch-passthrough"] = "1"
        return Response(content=resp.content, status_code=resp.status_code, headers=out_headers)

    async def aclose(self) -> None:
        await self.client.aclose()
