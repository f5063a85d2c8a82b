"""The embedded event log: an append-only SQLite file of its own, `<data_dir>/events.sqlite`.

Its own file, in WAL mode, so its writes never wait on the product store's writer (nor it on them);
several processes (`serve --workers`) append to it, each write waiting up to the busy timeout.
Every call is one transaction: all of its rows are stored, or none.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from middleware.events.model import Event, QueryRecord

FILE_NAME = "events.sqlite"
PAGE = 1000  # rows read per query while iterating
BUSY_TIMEOUT_MS = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    seq INTEGER PRIMARY KEY,
    query_id TEXT NOT NULL UNIQUE CHECK (query_id <> ''),
    ts TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS queries_ts ON queries (ts, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    query_id TEXT NOT NULL CHECK (query_id <> ''),
    ts TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('impression', 'click', 'add_to_cart', 'purchase')),
    object_id TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts, seq);
CREATE INDEX IF NOT EXISTS events_query ON events (query_id);
CREATE TABLE IF NOT EXISTS untrusted_events (
    seq INTEGER PRIMARY KEY,
    query_id TEXT NOT NULL,
    ts TEXT NOT NULL,
    reason TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS untrusted_ts ON untrusted_events (ts, seq);
"""


def utc(ts: datetime) -> datetime:
    """The instant in UTC; a timestamp without a zone is taken as UTC."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def sort_key(ts: datetime) -> str:
    """Fixed-width UTC text: its string order is time order."""
    return utc(ts).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _record_json(record: QueryRecord | Event) -> str:
    data = record.model_dump(mode="json", by_alias=True)
    data["timestamp"] = sort_key(record.timestamp)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


class SqliteEventLog:
    """Query records and events in one SQLite file (`open_event_log` names `<data_dir>/events.sqlite`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = self._connect()
        with self._lock, self._db:
            self._db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a call that returned survives a power cut too
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return db

    # ------------------------------------------------------------------ writes (one transaction each)

    def log_queries(self, records: Sequence[QueryRecord]) -> None:
        rows = [(r.query_id, sort_key(r.timestamp), _record_json(r)) for r in records]
        self._write("INSERT INTO queries (query_id, ts, record) VALUES (?, ?, ?)", rows)

    def append_events(self, events: Sequence[Event]) -> None:
        self.append_checked(events, ())

    def append_checked(self, trusted: Sequence[Event], untrusted: Sequence[tuple[Event, str]]) -> None:
        """Clean events, and events stored apart with the reason they are not trusted: all, or none."""
        good = [(e.query_id, sort_key(e.timestamp), e.action, e.object_id, _record_json(e)) for e in trusted]
        bad = [(e.query_id, sort_key(e.timestamp), reason, _record_json(e)) for e, reason in untrusted]
        if not good and not bad:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if good:
                    self._db.executemany(
                        "INSERT INTO events (query_id, ts, action, object_id, record) VALUES (?, ?, ?, ?, ?)", good
                    )
                if bad:
                    self._db.executemany(
                        "INSERT INTO untrusted_events (query_id, ts, reason, record) VALUES (?, ?, ?, ?)", bad
                    )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _write(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(sql, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ reads (oldest first)

    def queries(self, since: datetime | None = None, until: datetime | None = None) -> Iterator[QueryRecord]:
        for record in self._scan("queries", "record", since, until):
            yield QueryRecord.model_validate_json(record[0])

    def events(self, since: datetime | None = None, until: datetime | None = None) -> Iterator[Event]:
        for record in self._scan("events", "record", since, until):
            yield Event.model_validate_json(record[0])

    def untrusted(self, since: datetime | None = None, until: datetime | None = None) -> Iterator[tuple[Event, str]]:
        """Events stored apart, with the reason each is not trusted."""
        for record, reason in self._scan("untrusted_events", "record, reason", since, until):
            yield Event.model_validate_json(record), reason

    def get_queries(self, query_ids: Sequence[str]) -> dict[str, QueryRecord]:
        """The stored records among these query_ids."""
        found: dict[str, QueryRecord] = {}
        ids = list(dict.fromkeys(query_ids))
        db = self._connect()
        try:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for (record,) in db.execute(f"SELECT record FROM queries WHERE query_id IN ({marks})", chunk):
                    parsed = QueryRecord.model_validate_json(record)
                    found[parsed.query_id] = parsed
        finally:
            db.close()
        return found

    def _scan(
        self, table: str, columns: str, since: datetime | None, until: datetime | None
    ) -> Iterator[tuple[str, ...]]:
        low = sort_key(since) if since is not None else ""
        high = sort_key(until) if until is not None else "\uffff"
        db = self._connect()  # a connection of the iterator's own: the writer's is never held across yields
        try:
            after: tuple[str, int] = (low, -1)
            while True:
                rows = db.execute(
                    f"SELECT {columns}, ts, seq FROM {table} WHERE ts >= ? AND ts < ? AND (ts, seq) > (?, ?) "
                    "ORDER BY ts, seq LIMIT ?",
                    (low, high, after[0], after[1], PAGE),
                ).fetchall()
                for row in rows:
                    yield row[:-2]
                if len(rows) < PAGE:
                    return
                after = (rows[-1][-2], rows[-1][-1])
        finally:
            db.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()
