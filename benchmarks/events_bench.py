"""The event log's costs: what logging adds to a search, how fast events are taken in, and how long
the analytics take over a sizeable log. Embedded (SQLite) by default; `--opensearch URL` runs the
storage figures against a cluster too.

    python -m benchmarks.events_bench [--queries 100000] [--events-per-query 3] [--opensearch URL]

Writes benchmarks/results/events.json (figures plus the machine's load average next to each).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from middleware import analytics
from middleware.config import EventSettings, OpenSearchSettings
from middleware.events.ingest import check_events, parse_events
from middleware.events.model import Event, QueryRecord
from middleware.events.sqlite import SqliteEventLog
from middleware.events.store import QueryLogger
from middleware.schema import Hit, SearchRequest, SearchResponse

RESULTS = Path(__file__).resolve().parent / "results" / "events.json"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
WORDS = ["drill", "saw", "hammer", "paint", "ladder", "lamp", "tile", "pipe", "valve", "shelf", "fan", "rug"]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def synthetic_log(n_queries: int, per_query: int, seed: int = 0) -> tuple[list[QueryRecord], list[Event]]:
    """Searches of 1-3 words with ten served hits each; clicks fall off with position (a cascade)."""
    rng = random.Random(seed)
    queries: list[QueryRecord] = []
    events: list[Event] = []
    for i in range(n_queries):
        qid = f"q{i:08d}"
        hits = [f"p{rng.randrange(50_000)}" for _ in range(10)]
        at = T0 + timedelta(seconds=i)
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        queries.append(QueryRecord(query_id=qid, timestamp=at, query=text, hit_ids=hits, total=rng.randint(0, 500)))
        for k in range(per_query):
            position = min(10, int(rng.expovariate(0.4)) + 1)
            action = "click" if k < per_query - 1 or rng.random() < 0.8 else "purchase"
            events.append(
                Event(
                    query_id=qid,
                    action=action,
                    object_id=hits[position - 1],
                    position=position,
                    timestamp=at + timedelta(seconds=k + 1),
                    value=19.9 if action == "purchase" else None,
                )
            )
    return queries, events


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def storage(log: Any, queries: list[QueryRecord], events: list[Event], batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {"load_before": load()}
    t = sum(timed(lambda s=s: log.log_queries(queries[s : s + batch])) for s in range(0, len(queries), batch))
    out["log_queries_per_s"] = round(len(queries) / t)
    t = sum(timed(lambda s=s: log.append_events(events[s : s + 1000])) for s in range(0, len(events), 1000))
    out["append_events_per_s"] = round(len(events) / t)
    if hasattr(log, "refresh"):
        log.refresh()
    t = timed(lambda: sum(1 for _ in log.queries()))
    out["read_queries_per_s"] = round(len(queries) / t)
    t = timed(lambda: sum(1 for _ in log.events()))
    out["read_events_per_s"] = round(len(events) / t)
    out["load_after"] = load()
    return out


def ingest(log: SqliteEventLog, queries: list[QueryRecord], rounds: int = 20) -> dict[str, Any]:
    """POST /v1/events' work without HTTP: parse 1000 events, check them against their searches, store."""
    rng = random.Random(1)
    bodies = []
    for _ in range(rounds):
        items = []
        for _ in range(1000):
            q = rng.choice(queries)
            p = rng.randrange(len(q.hit_ids))
            items.append(
                {
                    "query_id": q.query_id,
                    "action": "click",
                    "object_id": q.hit_ids[p],
                    "position": p + 1,
                    "timestamp": "2026-01-02T00:00:00Z",
                }
            )
        bodies.append({"events": items})
    seconds = []
    for body in bodies:
        started = time.perf_counter()
        events = parse_events(body, 1000)
        records = log.get_queries([e.query_id for e in events])
        checked = check_events(events, records, lambda ids: set(), 1.0)
        log.append_checked(checked.trusted, checked.untrusted)
        seconds.append(time.perf_counter() - started)
    return {
        "batch": 1000,
        "median_ms_per_batch": round(statistics.median(seconds) * 1000, 1),
        "events_per_s": round(1000 / statistics.median(seconds)),
        "load": load(),
    }


def request_path(tmp: Path, n: int = 20_000) -> dict[str, Any]:
    """What a search pays to be logged: QueryLogger.record (build the record, queue it)."""
    log = SqliteEventLog(tmp / "request-path.sqlite")
    logger = QueryLogger(log, EventSettings())
    hits = [Hit(id=f"p{i}", score=1.0, product={}) for i in range(10)]
    req = SearchRequest(query="cordless drill", user_id="u1")
    responses = [
        SearchResponse(hits=hits, total=10, took_ms=1, timings_ms={}, query_id=uuid.uuid4().hex) for _ in range(n)
    ]
    started = time.perf_counter()
    for resp in responses:
        logger.record(req, resp)
    per_call_us = (time.perf_counter() - started) / n * 1e6
    flush_s = timed(logger.flush)
    logger.close()
    stored = sum(1 for _ in log.queries())
    log.close()
    return {
        "record_us_per_search": round(per_call_us, 1),
        "flush_s_after": round(flush_s, 3),
        "stored": stored,
        "load": load(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--events-per-query", type=int, default=3)
    parser.add_argument("--opensearch", metavar="URL", help="also measure the OpenSearch event log")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    queries, events = synthetic_log(args.queries, args.events_per_query)
    results: dict[str, Any] = {
        "queries": len(queries),
        "events": len(events),
        "cpu_count": os.cpu_count(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        log = SqliteEventLog(Path(tmp) / "events.sqlite")
        results["sqlite"] = storage(log, queries, events, batch=500)
        results["sqlite_ingest"] = ingest(log, queries)
        log.close()
        results["request_path"] = request_path(Path(tmp))
    t = timed(lambda: analytics.report(queries, events))
    results["analytics_report_s"] = {"seconds": round(t, 2), "load": load()}
    if args.opensearch:
        from middleware.events.opensearch import OpenSearchEventLog, index_bodies

        cfg = EventSettings(
            queries_index=f"bench-{uuid.uuid4().hex[:6]}-q", events_index=f"bench-{uuid.uuid4().hex[:6]}-e"
        )
        remote = OpenSearchEventLog(OpenSearchSettings(url=args.opensearch), cfg)
        try:
            results["opensearch"] = storage(remote, queries, events, batch=500)
        finally:
            remote.client.indices.delete(index=",".join(index_bodies(cfg)), ignore_unavailable=True)
            remote.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
