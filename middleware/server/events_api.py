"""The learning loop's routes: POST /v1/events, GET /v1/analytics/…

Both are behind the service's API key like every /v1 route. Events are rate-limited per key (per
client address when no keys are configured), in events per second with a burst
(`events.rate_limit_events_per_s`, `events.rate_limit_burst`; per process).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Body, Query, Request

from middleware import analytics
from middleware.backends.base import BackendError
from middleware.events.ingest import EventInputError, check_events, parse_events
from middleware.events.sqlite import utc
from middleware.events.store import QueryLogger
from middleware.server.auth import presented_key
from middleware.server.errors import ApiError, redact
from middleware.server.state import ServiceState, get_state

router = APIRouter()


def _query_log(state: ServiceState) -> QueryLogger:
    if not state.settings.events.enabled or state.query_log is None:
        raise ApiError(403, "the event log is disabled (events.enabled)", os_type="security_exception")
    return state.query_log


def _rate_key(request: Request) -> str:
    key = presented_key(dict(request.headers))
    if key:
        return "key:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    return "addr:" + (request.client.host if request.client is not None else "unknown")


def _unavailable(err: BackendError) -> ApiError:
    return ApiError(
        503, f"event log unavailable: {redact(str(err))}", os_type="unavailable_exception", headers={"Retry-After": "1"}
    )


@router.post("/v1/events", tags=["events"])
async def post_events(request: Request, body: Any = Body(...)) -> dict[str, Any]:  # noqa: B008
    """Shoppers' actions on served searches, up to `events.max_events_per_request` a request, in our
    field names or UBI's. A malformed event is a 400 naming it (`events[3].action`) and nothing is
    stored. Events that cannot be trusted (unknown query_id, object not served…) are stored apart,
    counted by reason in the answer and in analytics, and never read as clean signal."""
    state = get_state(request)
    log = _query_log(state)
    cfg = state.settings.events
    try:
        events = parse_events(body, cfg.max_events_per_request)
    except EventInputError as err:
        raise ApiError(400, err.message, param=err.param) from None
    wait_s = state.event_limiter.take(_rate_key(request), len(events))
    if wait_s > 0:
        state.metrics.rejected.labels("rate_limited").inc()
        raise ApiError(
            429,
            f"too many events for this key (events.rate_limit_events_per_s={cfg.rate_limit_events_per_s:g}, "
            f"burst {cfg.rate_limit_burst}); retry in {wait_s:.1f} s",
            headers={"Retry-After": str(max(1, int(wait_s + 0.999)))},
        )
    backend = state.base.backend

    def in_catalog(ids: Sequence[str]) -> set[str]:
        return {p.id for p in backend.get(list(ids))}

    def store() -> dict[str, Any]:
        records = log.lookup([e.query_id for e in events])
        checked = check_events(events, records, in_catalog, cfg.query_log_sample_rate)
        # a library caller's own EventLog may not keep untrusted events apart: only clean ones are stored there
        append_checked = getattr(log.store, "append_checked", None)
        try:
            if append_checked is not None:
                append_checked(checked.trusted, checked.untrusted)
            else:
                log.store.append_events(checked.trusted)
        except BackendError as err:
            raise _unavailable(err) from None
        state.metrics.events.labels("trusted").inc(len(checked.trusted))
        for reason, n in checked.counts().items():
            if n:
                state.metrics.events.labels(reason).inc(n)
        return {
            "received": len(events),
            "stored": len(checked.trusted) + (len(checked.untrusted) if append_checked is not None else 0),
            "trusted": len(checked.trusted),
            "untrusted": len(checked.untrusted),
            "untrusted_by_reason": checked.counts(),
        }

    return await state.admitted(store, bounded=False)


# ------------------------------------------------------------------------------------------ analytics

Report = Literal["top-queries", "zero-results", "ctr", "conversion", "deep-clicks"]


@router.get("/v1/analytics/{report}", tags=["events"])
async def get_analytics(
    report: Report,
    request: Request,
    since: datetime | None = Query(None, description="ISO 8601; searches at or after it"),  # noqa: B008
    until: datetime | None = Query(None, description="ISO 8601; searches before it"),  # noqa: B008
    limit: int = Query(analytics.DEFAULT_LIMIT, ge=1, le=10_000),
    min_position: float = Query(analytics.DEFAULT_DEEP_POSITION, gt=0, description="deep-clicks: mean click position"),
    min_clicks: int = Query(analytics.DEFAULT_DEEP_MIN_CLICKS, ge=1, description="deep-clicks: clicks a query needs"),
    max_position: int = Query(analytics.DEFAULT_MAX_POSITION, ge=1, le=1000, description="ctr: positions reported"),
) -> dict[str, Any]:
    """Reports over the event log: top queries, zero-result queries, CTR by position and by query,
    conversion, and queries whose clicks land deep. Only trusted events count; the untrusted ones
    are reported by reason beside them."""
    state = get_state(request)
    log = _query_log(state)
    since = utc(since) if since is not None else None  # no zone: UTC
    until = utc(until) if until is not None else None
    if since is not None and until is not None and since >= until:
        raise ApiError(400, "must be later than since", param="until", location="query")

    def run() -> dict[str, Any]:
        store: Any = log.store
        try:
            queries = list(store.queries(since, until))
            events = list(store.events(since, None))  # the window's searches' events, whenever they came
            untrusted = list(store.untrusted(since, until)) if hasattr(store, "untrusted") else []
        except BackendError as err:
            raise _unavailable(err) from None
        window = {"since": since.isoformat() if since else None, "until": until.isoformat() if until else None}
        out: dict[str, Any] = {"report": report, "window": window, "searches": len(queries)}
        if report == "top-queries":
            out["queries"] = analytics.top_queries(queries, limit)
        elif report == "zero-results":
            out["queries"] = analytics.zero_result_queries(queries, limit)
        elif report == "ctr":
            out["by_position"] = analytics.ctr_by_position(queries, events, max_position)
            out["by_query"] = analytics.ctr_by_query(queries, events, limit)
        elif report == "conversion":
            out["conversion"] = analytics.conversion(queries, events)
        else:
            out["queries"] = analytics.deep_click_queries(queries, events, min_position, min_clicks, limit)
        out["untrusted_events"] = analytics.untrusted_counts(untrusted)
        return out

    return await state.admitted(run, bounded=False)
