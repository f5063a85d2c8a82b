"""The event log on both backends (round trip, order, windows, all-or-nothing), the events' parsing
and trust rules, the analytics figures on hand-computed inputs, and the CLI (analytics, export, import).

"opensearch" runs when OPENSEARCH_URL is set (`tests/opensearch/with-node python -m pytest -q
tests/test_events*.py`); each test uses its own index names and deletes them.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from middleware import analytics
from middleware.backends.base import BackendError
from middleware.cli import main
from middleware.config import EventSettings, OpenSearchSettings, Settings
from middleware.events.ingest import REASONS, EventInputError, check_events, parse_events
from middleware.events.model import Event, QueryRecord
from middleware.events.sqlite import SqliteEventLog
from middleware.events.store import open_event_log, sampled

OPENSEARCH_URL = os.environ.get("OPENSEARCH_URL")
SKIP_REASON = os.environ.get("SHOPSEARCH_TEST_OPENSEARCH_UNAVAILABLE") or (
    "OPENSEARCH_URL is not set: run through tests/opensearch/with-node, or point it at a cluster"
)
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def opensearch_event_settings(prefix: str) -> EventSettings:
    return EventSettings(queries_index=f"{prefix}-ubi_queries", events_index=f"{prefix}-ubi_events")


def drop_indexes(cfg: EventSettings) -> None:
    import opensearchpy

    client = opensearchpy.OpenSearch(hosts=[OPENSEARCH_URL])
    from middleware.events.opensearch import index_bodies

    client.indices.delete(index=",".join(index_bodies(cfg)), ignore=[404], ignore_unavailable=True)
    client.close()


@pytest.fixture(params=["embedded", "opensearch"])
def store(request, tmp_path) -> Iterator[Any]:
    if request.param == "embedded":
        log = SqliteEventLog(tmp_path / "events.sqlite")
        yield log
        log.close()
        return
    if not OPENSEARCH_URL:
        pytest.skip(SKIP_REASON)
    from middleware.events.opensearch import OpenSearchEventLog

    cfg = opensearch_event_settings(f"evtest-{uuid.uuid4().hex[:8]}")
    log = OpenSearchEventLog(OpenSearchSettings(url=OPENSEARCH_URL, write_refresh="wait_for"), cfg)
    try:
        yield log
    finally:
        log.close()
        drop_indexes(cfg)


def record(qid: str, seconds: float, query: str = "drill", hits: list[str] | None = None, **extra: Any) -> QueryRecord:
    return QueryRecord(query_id=qid, timestamp=at(seconds), query=query, hit_ids=hits or [], **extra)


def event(qid: str, seconds: float, action: str = "click", obj: str = "a", **extra: Any) -> Event:
    return Event(query_id=qid, timestamp=at(seconds), action=action, object_id=obj, **extra)


# ------------------------------------------------------------------------------------------ storage


def test_round_trip_keeps_every_field_and_reads_oldest_first(store) -> None:
    full = QueryRecord(
        query_id="q-full",
        timestamp=at(5),
        query="cordless drill 电钻",
        filters={"brand": ["Makita"], "price_min": 10.0},
        hit_ids=["p3", "p1", "p2"],
        **{"from": 10},
        total=42,
        user_id="u1",
        session_id="s1",
        experiment="exp",
        variant="b",
    )
    bare = record("q-bare", 1, query="", hits=[])
    store.log_queries([full, bare])
    clicks = [
        event("q-full", 7, obj="p1", position=12, user_id="u1", session_id="s1"),
        event("q-full", 6, action="impression", obj="p3", position=11),
        event("q-full", 8, action="purchase", obj="p1", value=19.99),
    ]
    store.append_events(clicks)
    assert list(store.queries()) == [bare, full]  # oldest first, every field as written
    assert list(store.events()) == sorted(clicks, key=lambda e: e.timestamp)
    assert store.get_queries(["q-full", "missing"]) == {"q-full": full}


def test_windows_are_since_inclusive_until_exclusive(store) -> None:
    store.log_queries([record(f"q{i}", i) for i in range(5)])
    store.append_events([event(f"q{i}", i + 0.5) for i in range(5)])
    assert [q.query_id for q in store.queries(since=at(1), until=at(3))] == ["q1", "q2"]
    assert [e.query_id for e in store.events(since=at(1.5))] == ["q1", "q2", "q3", "q4"]
    assert [e.query_id for e in store.events(until=at(0.5))] == []


def test_reads_page_through_more_than_one_page(store) -> None:
    from middleware.events import opensearch as os_log
    from middleware.events import sqlite as sq

    n = max(sq.PAGE, os_log.PAGE) + 7
    store.append_events([event("q", i / 1000) for i in range(n)])
    read = list(store.events())
    assert len(read) == n and [e.timestamp for e in read] == sorted(e.timestamp for e in read)


def test_a_repeated_query_id_stores_none_of_the_call(store) -> None:
    store.log_queries([record("q1", 1)])
    with pytest.raises(Exception):  # noqa: B017 - SQLite's IntegrityError or the cluster's conflict
        store.log_queries([record("q2", 2), record("q1", 3), record("q3", 4)])
    assert [q.query_id for q in store.queries()] == ["q1"]


def test_events_that_cannot_be_stored_store_none_of_the_call(store) -> None:
    # Built without validation, as a library caller could: an action the SQLite table's CHECK
    # refuses, a position beyond the OpenSearch mapping's integer. Either store refuses it mid-call.
    refused = Event.model_construct(query_id="q", action="hover", object_id="b", position=2**40, timestamp=at(2))
    with pytest.raises(Exception):  # noqa: B017 - SQLite's IntegrityError or the cluster's refusal
        store.append_checked([event("q", 1), refused, event("q", 3)], [(event("q", 4), "unknown_query")])
    if hasattr(store, "refresh"):
        store.refresh()
    assert list(store.events()) == [] and list(store.untrusted()) == []


@pytest.mark.skipif(not OPENSEARCH_URL, reason=SKIP_REASON)
def test_opensearch_undoes_a_bulk_write_the_cluster_refuses_in_part(tmp_path) -> None:
    from middleware.events.opensearch import OpenSearchEventLog

    cfg = opensearch_event_settings(f"evtest-{uuid.uuid4().hex[:8]}")
    log = OpenSearchEventLog(OpenSearchSettings(url=OPENSEARCH_URL, write_refresh="wait_for"), cfg)
    try:
        too_far = event("q", 2, position=2**40)  # valid for the model, beyond the mapping's integer
        with pytest.raises(BackendError, match="refused 1 of 3"):
            log.append_events([event("q", 1), too_far, event("q", 3)])
        log.refresh()
        assert list(log.events()) == []
    finally:
        log.close()
        drop_indexes(cfg)


def test_untrusted_events_are_kept_apart_with_their_reason(store) -> None:
    store.append_checked([event("q", 1)], [(event("x", 2, obj="b"), "unknown_query")])
    assert [e.object_id for e in store.events()] == ["a"]
    assert [(e.object_id, reason) for e, reason in store.untrusted()] == [("b", "unknown_query")]


@pytest.mark.skipif(not OPENSEARCH_URL, reason=SKIP_REASON)
def test_opensearch_documents_carry_ubi_field_names() -> None:
    import opensearchpy

    from middleware.events.opensearch import OpenSearchEventLog

    cfg = opensearch_event_settings(f"evtest-{uuid.uuid4().hex[:8]}")
    log = OpenSearchEventLog(OpenSearchSettings(url=OPENSEARCH_URL, write_refresh="wait_for"), cfg)
    client = opensearchpy.OpenSearch(hosts=[OPENSEARCH_URL])
    try:
        log.log_queries([record("q1", 1, query="saw", hits=["a", "b"], user_id="u", total=2)])
        log.append_events([event("q1", 2, obj="b", position=2)])
        q = client.get(index=cfg.queries_index, id="q1")["_source"]
        assert (q["user_query"], q["query_response_hit_ids"], q["client_id"]) == ("saw", ["a", "b"], "u")
        hits = client.search(index=cfg.events_index, body={"query": {"term": {"action_name": "click"}}})
        doc = hits["hits"]["hits"][0]["_source"]
        assert doc["event_attributes"]["object"]["object_id"] == "b"
        assert doc["event_attributes"]["position"]["ordinal"] == 2
        assert doc["query_id"] == "q1"
    finally:
        client.close()
        log.close()
        drop_indexes(cfg)


def test_the_factory_follows_the_backend(tmp_path) -> None:
    log = open_event_log(Settings(data_dir=tmp_path))
    try:
        assert isinstance(log, SqliteEventLog) and log.path == tmp_path / "events.sqlite"
    finally:
        log.close()
    from middleware.events.opensearch import OpenSearchEventLog

    remote = open_event_log(Settings(backend="opensearch", events={"events_index": "shop_events"}))
    assert isinstance(remote, OpenSearchEventLog) and remote.untrusted_index == "shop_events_untrusted"
    remote.close()


def test_event_settings_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("SHOPSEARCH_EVENTS__QUERY_LOG_SAMPLE_RATE", "0.25")
    monkeypatch.setenv("SHOPSEARCH_EVENTS__MAX_EVENTS_PER_REQUEST", "50")
    settings = Settings()
    assert settings.events.query_log_sample_rate == 0.25 and settings.events.max_events_per_request == 50
    with pytest.raises(ValueError, match="query_log_sample_rate"):
        Settings(events={"query_log_sample_rate": 1.5})
    with pytest.raises(ValueError, match="rate_limit_burst"):
        Settings(events={"rate_limit_burst": 10, "max_events_per_request": 100})


# ------------------------------------------------------------------------------------ parse and trust


def test_sampling_is_a_deterministic_share_of_query_ids() -> None:
    ids = [f"query-{i}" for i in range(20_000)]
    share = sum(sampled(q, 0.3) for q in ids) / len(ids)
    assert 0.28 < share < 0.32
    assert [sampled(q, 0.3) for q in ids[:50]] == [sampled(q, 0.3) for q in ids[:50]]
    assert all(sampled(q, 1.0) for q in ids[:50]) and not any(sampled(q, 0.0) for q in ids[:50])


def test_parse_names_the_faulty_field_by_its_index() -> None:
    ok = {"query_id": "q", "action": "click", "object_id": "a", "timestamp": "2026-03-01T12:00:00Z"}
    cases = [
        ({"events": [ok, {**ok, "action": "hover"}]}, "events[1].action"),
        ({"events": [ok, ok, {**ok, "position": 0}]}, "events[2].position"),
        ({"events": [{k: v for k, v in ok.items() if k != "object_id"}]}, "events[0].object_id"),
        ({"events": [{**ok, "colour": "red"}]}, "events[0].colour"),
        ({"events": [ok, "click"]}, "events[1]"),
        ({"events": [{**ok, "object_id": "x\ud800"}]}, "events[0].object_id"),  # a lone surrogate
        ({"events": [{**ok, "value": float("inf")}]}, "events[0].value"),
        ({"events": [{**ok, "position": 2**31}]}, "events[0].position"),
        ({"events": []}, "events"),
        ({"events": [ok] * 4}, "events"),
        ({"evnts": [ok]}, "evnts"),
        ([ok], "body"),
    ]
    for body, param in cases:
        with pytest.raises(EventInputError) as err:
            parse_events(body, max_events=3)
        assert err.value.param == param, body


def test_parse_takes_ubi_field_names() -> None:
    ubi = {
        "application": "shop",
        "query_id": "q",
        "action_name": "add_to_cart",
        "client_id": "c1",
        "timestamp": "2026-03-01T12:00:00.123Z",
        "message_type": "INFO",
        "event_attributes": {
            "object": {"object_id": "p9", "object_id_field": "sku"},
            "position": {"ordinal": 4, "x": 10},
            "value": 3.5,
        },
    }
    (parsed,) = parse_events({"events": [ubi]}, max_events=10)
    assert (parsed.action, parsed.object_id, parsed.position, parsed.user_id, parsed.value) == (
        "add_to_cart",
        "p9",
        4,
        "c1",
        3.5,
    )
    bad = {**ubi, "event_attributes": {"object": {"object_id": "p9"}, "position": {"ordinal": -1}}}
    with pytest.raises(EventInputError) as err:
        parse_events({"events": [bad]}, max_events=10)
    assert err.value.param == "events[0].event_attributes.position.ordinal"


def test_check_sorts_events_by_the_first_reason_they_fail() -> None:
    records = {"q1": record("q1", 0, hits=["a", "b", "c"], **{"from": 10})}
    sampled_in = next(q for q in (f"qid-{i}" for i in range(1000)) if sampled(q, 0.5))
    sampled_out = next(q for q in (f"qid-{i}" for i in range(1000)) if not sampled(q, 0.5))
    events = [
        event("q1", 1, obj="b"),  # clean, its position taken from the served page: 12
        event("q1", 2, obj="c", position=13),  # clean
        event("q1", 3, obj="a", position=2),  # served at 11
        event("q1", 4, obj="z"),  # in the catalog, not served
        event("q1", 5, obj="nope"),  # nowhere
        event(sampled_in, 6),
        event(sampled_out, 7),
    ]
    asked: list[list[str]] = []

    def in_catalog(ids):
        asked.append(list(ids))
        return {i for i in ids if i in {"a", "b", "c", "z"}}

    checked = check_events(events, records, in_catalog, sample_rate=0.5)
    assert [(e.object_id, e.position) for e in checked.trusted] == [("b", 12), ("c", 13)]
    assert [reason for _, reason in checked.untrusted] == [
        "position_mismatch",
        "object_not_served",
        "unknown_object",
        "unknown_query",
        "query_not_sampled",
    ]
    assert checked.counts() == {reason: 1 for reason in REASONS}
    assert asked == [["z", "nope"]]  # the catalog is asked only about objects not served


# ---------------------------------------------------------------------------------------- analytics


def sample_log() -> tuple[list[QueryRecord], list[Event]]:
    queries = [
        record("q1", 1, "Drill", ["a", "b", "c"], total=3),
        record("q2", 2, "drill ", ["a", "b", "c"], total=3),
        record("q3", 3, "saw", ["d", "e"], total=2),
        record("q4", 4, "nothing", [], total=0),
        record("q5", 5, "Nothing", [], total=0),
        record("q6", 6, "saw", ["f", "g"], total=4, **{"from": 2}),
        record("q7", 7, "", ["h"], total=1),  # a browse page
    ]
    events = [
        event("q1", 10, obj="a", position=1),
        event("q1", 11, obj="a", position=1),  # the same click again: counted once
        event("q1", 12, obj="c", position=3),
        event("q1", 13, "add_to_cart", obj="c", position=3),
        event("q1", 14, "purchase", obj="c", value=20.0),
        event("q2", 15, obj="b", position=2),
        event("q6", 16, obj="g", position=4),
        event("q6", 17, "purchase", obj="g", value=5.5),
        event("elsewhere", 18, obj="a", position=1),  # not among the searches: ignored
    ]
    return queries, events


def test_top_and_zero_result_queries() -> None:
    queries, _ = sample_log()
    assert analytics.top_queries(queries) == [
        {"query": "drill", "searches": 2, "zero_results": 0},
        {"query": "nothing", "searches": 2, "zero_results": 2},
        {"query": "saw", "searches": 2, "zero_results": 0},
    ]
    assert analytics.top_queries(queries, limit=1) == [{"query": "drill", "searches": 2, "zero_results": 0}]
    assert analytics.zero_result_queries(queries) == [{"query": "nothing", "searches": 2, "zero_results": 2}]


def test_ctr_by_position() -> None:
    queries, events = sample_log()
    rows = analytics.ctr_by_position(queries, events, max_position=5)
    # shown: 1: q1 q2 q3 q7; 2: q1 q2 q3; 3: q1 q2 q6; 4: q6; clicks: a@1 (q1), b@2 (q2), c@3 (q1), g@4 (q6)
    assert [(r["position"], r["impressions"], r["clicks"]) for r in rows] == [
        (1, 4, 1),
        (2, 3, 1),
        (3, 3, 1),
        (4, 1, 1),
        (5, 0, 0),
    ]
    assert [r["ctr"] for r in rows] == [0.25, 1 / 3, 1 / 3, 1.0, 0.0]


def test_ctr_by_query_and_deep_clicks() -> None:
    queries, events = sample_log()
    rows = {r["query"]: r for r in analytics.ctr_by_query(queries, events)}
    assert rows["drill"] == {
        "query": "drill",
        "searches": 2,
        "searches_with_click": 2,
        "clicks": 3,
        "ctr": 1.0,
        "mean_click_position": 2.0,  # (1 + 3 + 2) / 3
    }
    assert (rows["saw"]["ctr"], rows["saw"]["mean_click_position"]) == (0.5, 4.0)
    assert (rows["nothing"]["ctr"], rows["nothing"]["mean_click_position"]) == (0.0, None)
    deep = analytics.deep_click_queries(queries, events, min_position=3, min_clicks=1)
    assert [r["query"] for r in deep] == ["saw"]
    assert analytics.deep_click_queries(queries, events, min_position=3, min_clicks=2) == []
    assert [r["query"] for r in analytics.deep_click_queries(queries, events, min_position=2, min_clicks=1)] == [
        "saw",
        "drill",
    ]


def test_conversion() -> None:
    queries, events = sample_log()
    assert analytics.conversion(queries, events) == {
        "searches": 7,
        "searches_with_click": 3,
        "searches_with_add_to_cart": 1,
        "searches_with_purchase": 2,
        "click_rate": 3 / 7,
        "add_to_cart_rate": 1 / 7,
        "purchase_rate": 2 / 7,
        "purchases": 2,
        "value_sum": 25.5,
    }
    assert analytics.conversion([], [])["purchase_rate"] == 0.0


# --------------------------------------------------------------------------------------------- CLI


def write_log(data_dir: Path) -> None:
    queries, events = sample_log()
    log = SqliteEventLog(data_dir / "events.sqlite")
    log.log_queries(queries)
    log.append_checked(events, [(event("ghost", 20), "unknown_query")])
    log.close()


def test_cli_analytics_json_text_and_png(tmp_path, capsys) -> None:
    write_log(tmp_path)
    assert main(["analytics", "--data-dir", str(tmp_path), "--json", "--png", str(tmp_path / "ctr.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["conversion"]["value_sum"] == 25.5 and out["untrusted_events"] == {"unknown_query": 1, "total": 1}
    assert out["ctr_by_position"][0] == {"position": 1, "impressions": 4, "clicks": 1, "ctr": 0.25}
    assert (tmp_path / "ctr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    window = [
        "analytics",
        "--data-dir",
        str(tmp_path),
        "--json",
        "--since",
        at(3).isoformat(),
        "--until",
        at(7).isoformat(),
    ]
    assert main(window) == 0
    windowed = json.loads(capsys.readouterr().out)
    assert windowed["searches"] == 4  # q3 .. q6
    # q6's purchase came after `until`: the window selects searches, and their events count
    assert windowed["conversion"]["searches_with_purchase"] == 1
    assert main(["analytics", "--data-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "untrusted events 1 (unknown_query 1)" in text and "purchase 0.286" in text
    assert (
        main(["analytics", "--data-dir", str(tmp_path), "--since", at(5).isoformat(), "--until", at(1).isoformat()])
        == 2
    )


def test_cli_reads_need_an_event_log(tmp_path, capsys) -> None:
    assert main(["analytics", "--data-dir", str(tmp_path / "none")]) == 2
    assert "no event log at" in capsys.readouterr().err
    assert main(["events", "export", "--data-dir", str(tmp_path / "none"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "none").exists() and not (tmp_path / "out").exists()


def test_cli_export_then_import_round_trips(tmp_path, capsys) -> None:
    write_log(tmp_path / "a")
    assert main(["events", "export", "--data-dir", str(tmp_path / "a"), str(tmp_path / "out")]) == 0
    lines = (tmp_path / "out" / "queries.jsonl").read_text().splitlines()
    assert [QueryRecord.model_validate_json(x) for x in lines] == sample_log()[0]
    events = [Event.model_validate_json(x) for x in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert events == sample_log()[1]  # the trusted events only
    for name in ("queries.jsonl", "events.jsonl"):
        assert main(["events", "import", "--data-dir", str(tmp_path / "b"), str(tmp_path / "out" / name)]) == 0
    copy = SqliteEventLog(tmp_path / "b" / "events.sqlite")
    assert list(copy.queries()) == sample_log()[0] and list(copy.events()) == sample_log()[1]
    copy.close()


def test_cli_import_sends_bad_lines_to_the_dead_letter_file(tmp_path, capsys) -> None:
    good_q = record("q1", 1).model_dump_json(by_alias=True)
    good_e = event("q1", 2).model_dump_json()
    lines = [
        good_q,
        "{not json",
        json.dumps({**json.loads(good_e), "action": "hover"}),
        good_e,
        record("q1", 3).model_dump_json(by_alias=True),  # the query_id again
        "[1, 2]",
        json.dumps({**json.loads(good_e), "value": 1e400}),  # parses as infinity
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    dead = tmp_path / "dead.jsonl"
    assert main(["events", "import", "--data-dir", str(tmp_path), str(src), "--dead-letter", str(dead)]) == 3
    rejected = [json.loads(x) for x in dead.read_text().splitlines()]
    assert [r["line"] for r in rejected] == [2, 3, 5, 6, 7]
    assert rejected[4]["reason"] == "value: must be a finite number"
    assert rejected[1]["reason"].startswith("action:") and "not stored" in rejected[2]["reason"]
    log = SqliteEventLog(tmp_path / "events.sqlite")
    assert [q.query_id for q in log.queries()] == ["q1"] and len(list(log.events())) == 1
    log.close()


def test_the_rate_limiter_refills_per_key() -> None:
    from middleware.server.limits import RateLimiter

    now = [100.0]
    limiter = RateLimiter(rate=2.0, burst=5, clock=lambda: now[0])
    assert limiter.take("a", 5) == 0.0
    assert limiter.take("a", 1) == 0.5  # one token comes in half a second
    assert limiter.take("b", 5) == 0.0  # another key has its own bucket
    now[0] += 0.5
    assert limiter.take("a", 1) == 0.0
    now[0] += 100
    assert limiter.take("a", 6) == 0.5  # never more than the burst saved up


def test_the_query_logger_keeps_the_batch_when_one_record_is_refused(tmp_path) -> None:
    from middleware.events.store import QueryLogger

    log = SqliteEventLog(tmp_path / "events.sqlite")
    logger = QueryLogger(log, EventSettings(writer_flush_ms=50), owns_store=False)
    logger.submit(record("q1", 1))
    assert logger.flush()
    for r in (record("q2", 2), record("q1", 3), record("q3", 4)):  # q1 again: refused by the store
        logger.submit(r)
    logger.close()
    assert [q.query_id for q in log.queries()] == ["q1", "q2", "q3"]
    assert (logger.logged, logger.failed, logger.dropped) == (3, 1, 0)
    assert logger.lookup(["q3", "nope"]) == {"q3": record("q3", 4)}
    log.close()
