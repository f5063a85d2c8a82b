"""POST /v1/events and GET /v1/analytics/… in process, with searches logged by /v1/search, the proxy
and the library Pipeline: on the embedded event log always, on OpenSearch's when OPENSEARCH_URL is set.

The product store is the embedded demo catalog either way (the event log follows `settings.backend`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from middleware.config import Settings
from middleware.events.sqlite import SqliteEventLog
from middleware.events.store import open_event_log, sampled
from middleware.pipeline import Pipeline
from middleware.server.app import create_app
from tests.test_events import OPENSEARCH_URL, SKIP_REASON, drop_indexes, opensearch_event_settings
from tests.test_server_support import server_models, server_store

__all__ = ["server_models", "server_store"]

KEY = "k-events"
AUTH = {"x-api-key": KEY}
QUERY = "手表"


def make_settings(backend: str, tmp, **events: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp,
        "rerank_k": 10,
        "deadline_ms": 5000,
        "server": {"api_keys": [KEY], "warm_up": False},
        "events": {"writer_flush_ms": 20, **events},
    }
    if backend == "opensearch":
        prefix = f"evapi-{uuid.uuid4().hex[:8]}"
        cfg = opensearch_event_settings(prefix)
        values["backend"] = "opensearch"
        values["opensearch"] = {"url": OPENSEARCH_URL, "write_refresh": "wait_for"}
        values["events"] |= {"queries_index": cfg.queries_index, "events_index": cfg.events_index}
    return Settings(**values)


@pytest.fixture(params=["embedded", "opensearch"])
def backend(request) -> str:
    if request.param == "opensearch" and not OPENSEARCH_URL:
        pytest.skip(SKIP_REASON)
    return request.param


class Service:
    def __init__(self, client: TestClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    @property
    def state(self) -> Any:
        return self.client.app.state.service

    def search(self, **body: Any) -> dict[str, Any]:
        r = self.client.post("/v1/search", json={"query": QUERY, "size": 5, **body}, headers=AUTH)
        assert r.status_code == 200, r.text
        return r.json()

    def events(self, events: list[dict[str, Any]], headers: dict[str, str] | None = None) -> Any:
        return self.client.post("/v1/events", json={"events": events}, headers=AUTH if headers is None else headers)

    def stored(self) -> tuple[list[Any], list[Any], list[Any]]:
        """What the log holds now (after the writer's queue is flushed)."""
        self.state.query_log.flush()
        log = self.state.query_log.store
        if hasattr(log, "refresh"):
            log.refresh()
        return list(log.queries()), list(log.events()), list(log.untrusted())


def open_service(store, models, settings: Settings) -> Iterator[Service]:
    app = create_app(settings, Pipeline(settings, store, *models))
    try:
        with TestClient(app) as client:
            yield Service(client, settings)
    finally:
        if settings.backend == "opensearch":
            drop_indexes(settings.events)


@pytest.fixture
def service(backend, server_store, server_models, tmp_path) -> Iterator[Service]:
    yield from open_service(server_store, server_models, make_settings(backend, tmp_path))


def click(resp: dict[str, Any], index: int, action: str = "click", **extra: Any) -> dict[str, Any]:
    hit = resp["hits"][index]
    return {
        "query_id": resp["query_id"],
        "action": action,
        "object_id": hit["id"],
        "timestamp": "2026-03-01T12:00:00Z",
        **extra,
    }


def test_searches_are_logged_and_events_on_them_trusted(service) -> None:
    resp = service.search(user_id="u1", session_id="s1", filters={"category": ["手表"]})
    assert resp["query_id"] and len(resp["hits"]) == 5
    r = service.events(
        [
            click(resp, 0, position=1),
            click(resp, 2),  # no position: it takes the served one, 3
            click(resp, 2, "purchase", value=99.5),
            {**click(resp, 1), "object_id": "not-a-product"},
            {**click(resp, 0), "query_id": "never-served"},
            click(resp, 1, position=4),  # served at 2
        ]
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["received"], body["stored"], body["trusted"], body["untrusted"]) == (6, 6, 3, 3)
    assert body["untrusted_by_reason"] == {
        "query_not_sampled": 0,
        "unknown_query": 1,
        "unknown_object": 1,
        "object_not_served": 0,
        "position_mismatch": 1,
    }
    queries, events, untrusted = service.stored()
    (logged,) = queries
    assert logged.query_id == resp["query_id"] and logged.query == QUERY
    assert logged.hit_ids == [h["id"] for h in resp["hits"]] and logged.total == resp["total"]
    assert (logged.user_id, logged.session_id, logged.filters) == ("u1", "s1", {"category": ["手表"]})
    assert [(e.action, e.position) for e in events] == [("click", 1), ("click", 3), ("purchase", 3)]
    assert sorted(reason for _, reason in untrusted) == ["position_mismatch", "unknown_object", "unknown_query"]

    ctr = service.client.get("/v1/analytics/ctr", params={"max_position": 5}, headers=AUTH).json()
    assert [(r["impressions"], r["clicks"]) for r in ctr["by_position"]] == [(1, 1), (1, 0), (1, 1), (1, 0), (1, 0)]
    assert ctr["untrusted_events"]["total"] == 3
    conv = service.client.get("/v1/analytics/conversion", headers=AUTH).json()["conversion"]
    assert (conv["searches"], conv["purchase_rate"], conv["value_sum"]) == (1, 1.0, 99.5)
    top = service.client.get("/v1/analytics/top-queries", headers=AUTH).json()["queries"]
    assert top == [{"query": QUERY, "searches": 1, "zero_results": 0}]
    deep = service.client.get("/v1/analytics/deep-clicks", params={"min_position": 2}, headers=AUTH).json()
    assert [(q["query"], q["mean_click_position"]) for q in deep["queries"]] == [(QUERY, 2.0)]
    zero = service.client.get("/v1/analytics/zero-results", headers=AUTH)
    assert zero.status_code == 200 and zero.json()["queries"] == []
    mixed = {"since": "2020-01-01T00:00:00", "until": "2099-01-01T00:00:00+08:00"}  # no zone: UTC
    assert service.client.get("/v1/analytics/top-queries", params=mixed, headers=AUTH).json()["searches"] == 1
    backwards = service.client.get(
        "/v1/analytics/ctr", params={"since": "2099-01-01", "until": "2020-01-01"}, headers=AUTH
    )
    assert backwards.status_code == 400 and backwards.json()["param"] == "until"
    metrics = service.client.get("/metrics", headers=AUTH).text
    assert 'shopsearch_events_total{trust="trusted"} 3.0' in metrics
    assert 'shopsearch_events_total{trust="position_mismatch"} 1.0' in metrics
    assert 'shopsearch_query_log_records{outcome="logged"} 1.0' in metrics


def test_a_malformed_event_is_a_400_naming_it_and_nothing_is_stored(service) -> None:
    resp = service.search()
    bad = service.events([click(resp, 0), click(resp, 1), {**click(resp, 2), "action": "hover"}])
    assert bad.status_code == 400
    assert bad.json()["param"] == "events[2].action" and "events[2].action" in bad.json()["message"]
    ubi = {"query_id": resp["query_id"], "action_name": "click", "timestamp": "2026-03-01T12:00:00Z"}
    missing = service.events([click(resp, 0), {**ubi, "event_attributes": {"object": {}}}])
    assert missing.status_code == 400 and missing.json()["param"] == "events[1].object_id"
    too_many = service.events([click(resp, 0)] * (service.settings.events.max_events_per_request + 1))
    assert too_many.status_code == 400 and too_many.json()["param"] == "events"
    not_json = service.client.post("/v1/events", content=b"{", headers={**AUTH, "content-type": "application/json"})
    assert not_json.status_code in (400, 422)
    _, events, untrusted = service.stored()
    assert events == [] and untrusted == []


def test_events_need_the_api_key(service) -> None:
    resp = service.search()
    assert service.events([click(resp, 0)], headers={}).status_code == 401
    assert service.events([click(resp, 0)], headers={"x-api-key": "wrong"}).status_code == 401
    assert service.client.get("/v1/analytics/ctr").status_code == 401
    assert service.stored()[1] == []


def test_a_flood_is_rate_limited_per_key(backend, server_store, server_models, tmp_path) -> None:
    settings = make_settings(
        backend, tmp_path, max_events_per_request=3, rate_limit_burst=5, rate_limit_events_per_s=0.01
    )
    for svc in open_service(server_store, server_models, settings):
        resp = svc.search()
        assert svc.events([click(resp, 0)] * 3).status_code == 200
        flood = svc.events([click(resp, 1)] * 3)  # 3 more than the 2 left
        assert flood.status_code == 429 and int(flood.headers["retry-after"]) >= 1
        assert svc.events([click(resp, 1)] * 2).status_code == 200  # what is left still passes
        assert svc.events([click(resp, 1)]).status_code == 429
        _, events, _ = svc.stored()
        assert len(events) == 5


def test_sampled_out_searches_are_told_apart_from_unknown_ones(backend, server_store, server_models, tmp_path) -> None:
    for svc in open_service(server_store, server_models, make_settings(backend, tmp_path, query_log_sample_rate=0.5)):
        responses = [svc.search(query=q) for q in (QUERY, "耳机", "手机", "连衣裙", "口红", "运动鞋", "手表 男")]
        logged = [r for r in responses if sampled(r["query_id"], 0.5)]
        skipped = [r for r in responses if not sampled(r["query_id"], 0.5)]
        assert logged and skipped  # seven searches: both kinds (else pick other queries)
        body = svc.events([click(r, 0) for r in responses]).json()
        assert body["trusted"] == len(logged)
        assert body["untrusted_by_reason"]["query_not_sampled"] == len(skipped)
        queries, _, _ = svc.stored()
        assert sorted(q.query_id for q in queries) == sorted(r["query_id"] for r in logged)


def test_events_disabled_is_a_403_and_nothing_is_logged(server_store, server_models, tmp_path) -> None:
    settings = make_settings("embedded", tmp_path, enabled=False)
    for svc in open_service(server_store, server_models, settings):
        resp = svc.search()
        assert svc.events([click(resp, 0)]).status_code == 403
        assert svc.client.get("/v1/analytics/ctr", headers=AUTH).status_code == 403
    assert not (tmp_path / "events.sqlite").exists()


def test_the_proxy_logs_the_searches_it_answers_not_its_counts(service) -> None:
    body = {"query": {"match": {"title": QUERY}}, "size": 3}
    r = service.client.post("/products/_search", json=body, headers=AUTH)
    assert r.status_code == 200
    served = [h["_id"] for h in r.json()["hits"]["hits"]]
    if service.settings.backend == "embedded":  # the proxy answers _count itself over the embedded store only
        count = service.client.post("/products/_count", json={"query": body["query"]}, headers=AUTH)
        assert count.status_code == 200 and count.json()["count"] >= len(served)
    queries, _, _ = service.stored()
    assert [(q.query, q.hit_ids) for q in queries] == [(QUERY, served)]


def test_the_library_pipeline_logs_when_given_an_event_log(server_store, server_models, tmp_path) -> None:
    from middleware.schema import SearchRequest

    settings = Settings(data_dir=tmp_path, rerank_k=5, events={"writer_flush_ms": 10})
    log = open_event_log(settings)
    pipeline = Pipeline(settings, server_store, *server_models, owns_backend=False, event_log=log)
    try:
        resp = pipeline.search(SearchRequest(query=QUERY, size=4, **{"from": 2}, user_id="u9"))
        assert resp.next_cursor is not None
        after = pipeline.search(SearchRequest(query=QUERY, size=4, search_after=resp.next_cursor))
    finally:
        pipeline.close()  # flushes the writer
    first, second = SqliteEventLog(tmp_path / "events.sqlite").queries()
    assert (first.query_id, first.hit_ids, first.from_, first.user_id) == (
        resp.query_id,
        [h.id for h in resp.hits],
        2,
        "u9",
    )
    assert (second.query_id, second.hit_ids, second.from_) == (after.query_id, [h.id for h in after.hits], 6)
    log.close()


def test_the_proxy_takes_opensearch_ubi_ext(service) -> None:
    ubi = {"query_id": "ubi-q-1", "client_id": "browser-7", "user_query": "watch for her"}
    body = {"query": {"match": {"title": QUERY}}, "size": 3, "ext": {"ubi": ubi}}
    r = service.client.post("/products/_search", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["ext"] == {"ubi": {"query_id": "ubi-q-1"}}
    first = r.json()["hits"]["hits"][0]["_id"]
    ubi_event = {
        "query_id": "ubi-q-1",
        "action_name": "click",
        "client_id": "browser-7",
        "timestamp": "2026-03-01T12:00:00Z",
        "event_attributes": {"object": {"object_id": first, "object_id_field": "id"}, "position": {"ordinal": 1}},
    }
    assert service.events([ubi_event]).json()["trusted"] == 1
    queries, events, _ = service.stored()
    assert [(q.query_id, q.query, q.user_id) for q in queries] == [("ubi-q-1", "watch for her", "browser-7")]
    assert [(e.object_id, e.position, e.user_id) for e in events] == [(first, 1, "browser-7")]
    bad = {**body, "ext": {"ubi": {"query_id": 7}}}
    refused = service.client.post("/products/_search", json=bad, headers=AUTH)
    assert refused.status_code == 400 and "ext.ubi.query_id" in refused.json()["error"]["reason"]
