"""One factory for the configured event log, the query-log sampling rule, and the background writer
that logs searches off the request path."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from middleware.events.model import Event, EventLog, QueryRecord
from middleware.paging import cursor_position
from middleware.redaction import redact

if TYPE_CHECKING:
    from middleware.config import EventSettings, Settings
    from middleware.schema import SearchRequest, SearchResponse

log = logging.getLogger(__name__)

MAX_LOGGED_IDS_FILTER = 100  # an ids filter longer than this is logged as its count only


class EventStore(EventLog, Protocol):
    """An EventLog that also keeps events it does not trust apart, and looks records up by query_id."""

    def append_checked(self, trusted: Sequence[Event], untrusted: Sequence[tuple[Event, str]]) -> None:
        """Clean events, and untrusted ones stored apart with their reason: all of them, or none."""
        ...

    def untrusted(self, since: datetime | None = None, until: datetime | None = None) -> Iterator[tuple[Event, str]]:
        """The events stored apart, with the reason each is not trusted, oldest first."""
        ...

    def get_queries(self, query_ids: Sequence[str]) -> dict[str, QueryRecord]:
        """The stored records among these query_ids."""
        ...


def open_event_log(settings: Settings) -> EventStore:
    """The configured backend's event log: `<data_dir>/events.sqlite`, or the OpenSearch indexes."""
    if settings.backend == "embedded":
        from middleware.events.sqlite import FILE_NAME, SqliteEventLog

        return SqliteEventLog(settings.data_dir / FILE_NAME)
    from middleware.events.opensearch import OpenSearchEventLog

    return OpenSearchEventLog(settings.opensearch, settings.events)


def sampled(query_id: str, rate: float) -> bool:
    """Whether a search is logged: a hash of its query_id under the rate. Deterministic, so whoever
    holds a query_id can tell a sampled-out search from one that was never served."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(query_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


def query_record(req: SearchRequest, resp: SearchResponse, now: datetime | None = None) -> QueryRecord | None:
    """The record of a search as served; None when the response carries no query_id."""
    if not resp.query_id:
        return None
    filters: dict[str, Any] | None = None
    if req.filters is not None and not req.filters.is_empty():
        filters = req.filters.model_dump(mode="json", exclude_none=True)
        ids = filters.get("ids")
        if ids is not None and len(ids) > MAX_LOGGED_IDS_FILTER:
            del filters["ids"]
            filters["ids_count"] = len(ids)
    start = req.from_
    if req.search_after is not None:  # a cursor's page starts where the cursor says
        start = cursor_position(req.search_after) or 0
    return QueryRecord(
        query_id=resp.query_id,
        timestamp=now or datetime.now(UTC),
        query=(req.query or "").strip(),
        filters=filters,
        hit_ids=[h.id for h in resp.hits],
        from_=start,
        total=resp.total,
        user_id=req.user_id,
        session_id=req.session_id,
        experiment=resp.experiment,
        variant=resp.variant,
    )


class QueryLogger:
    """Logs served searches through one background thread: records queue up and are written in
    batches (at most `writer_batch_size` per write, none waiting longer than `writer_flush_ms`).
    A full queue drops new records (counted in `dropped`), never slows a search. `close` flushes.

    The records of recent searches stay in memory too (bounded), so an event that follows its search
    within the flush delay still finds the search it belongs to."""

    RECENT = 50_000

    def __init__(self, store: EventLog, cfg: EventSettings, *, owns_store: bool = True) -> None:
        self.store = store
        self.cfg = cfg
        self.owns_store = owns_store
        self.logged = 0
        self.dropped = 0
        self.failed = 0
        self._queue: queue.Queue[QueryRecord | None] = queue.Queue(maxsize=cfg.writer_queue_size)
        self._recent: OrderedDict[str, QueryRecord] = OrderedDict()
        self._recent_lock = threading.Lock()
        self._idle = threading.Condition()
        self._pending = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="shopsearch-query-log", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, settings: Settings) -> QueryLogger:
        return cls(open_event_log(settings), settings.events)

    def record(self, req: SearchRequest, resp: SearchResponse) -> bool:
        """Queue the record of this search if the sample takes it; True when queued."""
        if self._closed or not resp.query_id or not sampled(resp.query_id, self.cfg.query_log_sample_rate):
            return False
        record = query_record(req, resp)
        return record is not None and self.submit(record)

    def submit(self, record: QueryRecord) -> bool:
        with self._recent_lock:
            self._recent[record.query_id] = record
            if len(self._recent) > self.RECENT:
                self._recent.popitem(last=False)
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            self._done(1)
            return False
        return True

    def lookup(self, query_ids: Sequence[str]) -> dict[str, QueryRecord]:
        """Records of these query_ids: recent ones from memory, the rest from the store."""
        found: dict[str, QueryRecord] = {}
        with self._recent_lock:
            for qid in query_ids:
                record = self._recent.get(qid)
                if record is not None:
                    found[qid] = record
        rest = [q for q in dict.fromkeys(query_ids) if q not in found]
        get_queries = getattr(self.store, "get_queries", None)
        if rest and get_queries is not None:
            found.update(get_queries(rest))
        return found

    def _done(self, n: int) -> None:
        with self._idle:
            self._pending -= n
            if self._pending <= 0:
                self._idle.notify_all()

    def _run(self) -> None:
        wait_s = self.cfg.writer_flush_ms / 1000.0
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            ends = time.monotonic() + wait_s
            stop = False
            while len(batch) < self.cfg.writer_batch_size:
                left = ends - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._write(batch)
            self._done(len(batch))
            if stop:
                return

    def _write(self, batch: list[QueryRecord]) -> None:
        try:
            self.store.log_queries(batch)
            self.logged += len(batch)
            return
        except Exception as err:  # one bad record (a repeated query_id) must not lose the batch
            log.warning("query log: a batch of %d failed (%s); writing one by one", len(batch), redact(str(err))[:300])
        for record in batch:
            try:
                self.store.log_queries([record])
                self.logged += 1
            except Exception as err:
                self.failed += 1
                log.warning("query log: record %s not stored: %s", record.query_id[:64], redact(str(err))[:300])

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued record is written; False if that takes longer than the timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending <= 0, timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, stop the writer, and close the store when this logger opened it."""
        if self._closed:
            return
        self.flush(timeout_s)
        self._closed = True
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            log.warning("query log: the writer did not drain its queue within %.0f s", timeout_s)
        self._thread.join(timeout_s)
        if self.owns_store:
            self.store.close()
