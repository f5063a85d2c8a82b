"""The OpenSearch client from the settings, and its errors translated into `BackendError`.

Credentials come from `middleware.credentials` (one rule, shared with the proxy). Messages name the
action and the hosts with any `user:password@` removed; they never carry a secret.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import opensearchpy

from middleware.backends.base import BackendError
from middleware.config import OpenSearchSettings
from middleware.credentials import CredentialsError, resolve_cluster_credentials


def redact_url(url: str) -> str:
    """The URL without user:password@ (for messages and logs)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def client_kwargs(cfg: OpenSearchSettings) -> dict[str, Any]:
    """Keyword arguments for the OpenSearch client from the settings (credentials by the one rule)."""
    kwargs: dict[str, Any] = {
        "hosts": list(cfg.url),
        "timeout": cfg.timeout_s,
        "max_retries": cfg.max_retries,
        "retry_on_timeout": cfg.max_retries > 0,
        "verify_certs": cfg.verify_certs,
        "ssl_show_warn": cfg.verify_certs,
        "http_compress": True,
    }
    if cfg.ca_certs:
        kwargs["ca_certs"] = str(cfg.ca_certs)
    try:
        creds = resolve_cluster_credentials(cfg)
    except CredentialsError as err:
        raise BackendError(str(err)) from None
    if creds.username is not None:
        kwargs["http_auth"] = (creds.username, creds.password)
    elif creds.api_key is not None:
        kwargs["headers"] = {"Authorization": f"ApiKey {creds.api_key}"}
    return kwargs


def make_client(cfg: OpenSearchSettings) -> opensearchpy.OpenSearch:
    return opensearchpy.OpenSearch(**client_kwargs(cfg))


def error_reason(err: opensearchpy.TransportError) -> str:
    """The cluster's own reason for a failed request ("type: reason (caused by: ...)")."""
    info = err.info if isinstance(err.info, dict) else {}
    error = info.get("error")
    if isinstance(error, dict):
        kind = error.get("type", "")
        reason = error.get("reason", "")
        caused = error.get("caused_by") or {}
        if isinstance(caused, dict) and caused.get("reason"):
            reason = f"{reason} (caused by: {caused['reason']})"
        return f"{kind}: {reason}".strip(": ")
    if isinstance(error, str):
        return error
    return str(err.error)


@contextlib.contextmanager
def translate_errors(cfg: OpenSearchSettings, action: str) -> Iterator[None]:
    """Client exceptions → BackendError naming the action and the (redacted) hosts."""
    hosts = ", ".join(redact_url(u) for u in cfg.url)
    try:
        yield
    except BackendError:
        raise
    except opensearchpy.ConnectionTimeout:
        raise BackendError(
            f"OpenSearch at {hosts} timed out during {action} (opensearch.timeout_s={cfg.timeout_s})"
        ) from None
    except opensearchpy.SSLError:
        raise BackendError(
            f"TLS error talking to OpenSearch at {hosts} during {action}: check opensearch.ca_certs "
            "(or verify_certs=false for a local test cluster only)"
        ) from None
    except opensearchpy.ConnectionError:
        raise BackendError(
            f"OpenSearch unreachable at {hosts} ({action}): is it running? set SHOPSEARCH_OPENSEARCH__URL"
        ) from None
    except opensearchpy.AuthenticationException:
        raise BackendError(
            f"OpenSearch at {hosts} refused the credentials ({action}): check opensearch.username/password "
            "or opensearch.api_key"
        ) from None
    except opensearchpy.AuthorizationException as err:
        raise BackendError(f"OpenSearch denied {action}: {error_reason(err)}") from None
    except opensearchpy.TransportError as err:
        raise BackendError(f"OpenSearch {action} failed ({err.status_code}): {error_reason(err)}") from None
