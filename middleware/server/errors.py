"""Error bodies: OpenSearch's shape on proxy routes, a JSON detail naming the parameter on /v1 routes."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from middleware.redaction import RedactingFilter, redact

__all__ = ["RedactingFilter", "redact"]  # re-exported: the server's modules import them from here

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # answer without an API key (load balancers, probes)


def route_group(path: str) -> str:
    """ "v1", "health", "metrics" or "proxy" (everything OpenSearch-shaped)."""
    if path == "/v1" or path.startswith("/v1/"):
        return "v1"
    if path in OPEN_PATHS:
        return "health"
    if path == "/metrics":
        return "metrics"
    return "proxy"


class ApiError(Exception):
    """An expected failure with a status, rendered in the shape of the route it happened on.

    `param` names the request parameter at fault; `os_type` is the OpenSearch error type.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        os_type: str | None = None,
        headers: dict[str, str] | None = None,
        location: str = "body",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.os_type = os_type or _default_type(status)
        self.headers = headers
        self.location = location


def _default_type(status: int) -> str:
    return {
        400: "illegal_argument_exception",
        401: "security_exception",
        403: "security_exception",
        404: "resource_not_found_exception",
        405: "illegal_argument_exception",
        413: "content_too_long_exception",
        429: "rejected_execution_exception",
        500: "internal_server_error",
        503: "unavailable_exception",
        504: "timeout_exception",
    }.get(status, "exception")


def opensearch_error(status: int, error_type: str, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    cause = {"type": error_type, "reason": reason}
    return JSONResponse(
        {"error": {"root_cause": [cause], **cause}, "status": status}, status_code=status, headers=headers
    )


def v1_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    location: str = "body",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"message": f"{param}: {message}" if param else message}
    if param:
        body["param"] = param
        body["detail"] = [{"loc": [location, *param.split(".")], "msg": message, "type": "value_error"}]
    else:
        body["detail"] = message
    return JSONResponse(body, status_code=status, headers=headers)


def render(path: str, err: ApiError) -> JSONResponse:
    if route_group(path) == "proxy":
        reason = f"[{err.param}] {err.message}" if err.param else err.message
        return opensearch_error(err.status, err.os_type, reason, err.headers)
    return v1_error(err.status, err.message, param=err.param, location=err.location, headers=err.headers)
