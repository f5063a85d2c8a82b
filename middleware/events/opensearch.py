"""The OpenSearch event log: UBI's `ubi_queries` / `ubi_events` indexes, in UBI's field names.

A query record is a `ubi_queries` document whose id is its query_id (so a lookup by query_id is a
real-time get, visible before the next refresh):

    query_id, query_response_id (= query_id), timestamp, user_query (the shopper's text),
    query_response_hit_ids (the served page, in order), client_id (user_id, else session_id),
    user_id, session_id, application ("shopsearch"),
    query_attributes: {filters, from, total, experiment, variant}

An event is a `ubi_events` document:

    query_id, action_name, timestamp, client_id, user_id, session_id, application,
    event_attributes: {object: {object_id, object_id_field: "id"}, position: {ordinal}, value}

Events that cannot be trusted go to `<events_index>_untrusted`, with `untrusted_reason`, so UBI's
dashboards and the Search Relevance Workbench, which read `ubi_events`, see clean signal only.

Writes go through `opensearchpy.helpers.bulk` with `create`: a call whose documents do not all
land deletes the ones that did, then raises (a compensating delete: for a moment, before it runs,
a search could see them). Reads walk a point in time with `search_after`, oldest first.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from opensearchpy import helpers

from middleware.backends.base import BackendError
from middleware.backends.opensearch_client import make_client, translate_errors
from middleware.config import EventSettings, OpenSearchSettings
from middleware.events.model import Event, QueryRecord
from middleware.events.sqlite import sort_key

APPLICATION = "shopsearch"
OBJECT_ID_FIELD = "id"
PAGE = 1000
KEEP_ALIVE = "2m"
UNTRUSTED_SUFFIX = "_untrusted"

_DATE = {"type": "date", "format": "strict_date_optional_time||epoch_millis"}
_KEYWORD = {"type": "keyword"}


def index_settings() -> dict[str, Any]:
    return {"index": {"number_of_shards": 1, "auto_expand_replicas": "0-1"}}


def queries_mappings() -> dict[str, Any]:
    return {
        "dynamic": False,
        "properties": {
            "application": _KEYWORD,
            "query_id": _KEYWORD,
            "query_response_id": _KEYWORD,
            "timestamp": _DATE,
            "user_query": _KEYWORD,
            "query_response_hit_ids": _KEYWORD,
            "client_id": _KEYWORD,
            "user_id": _KEYWORD,
            "session_id": _KEYWORD,
            "query_attributes": {
                "properties": {
                    "filters": {"type": "flat_object"},
                    "from": {"type": "integer"},
                    "total": {"type": "long"},
                    "experiment": _KEYWORD,
                    "variant": _KEYWORD,
                }
            },
        },
    }


def events_mappings(*, untrusted: bool = False) -> dict[str, Any]:
    props: dict[str, Any] = {
        "application": _KEYWORD,
        "action_name": _KEYWORD,
        "query_id": _KEYWORD,
        "event_id": _KEYWORD,  # the tie-break of the read order (documents carrying equal timestamps)
        "timestamp": _DATE,
        "client_id": _KEYWORD,
        "user_id": _KEYWORD,
        "session_id": _KEYWORD,
        "event_attributes": {
            "properties": {
                "object": {"properties": {"object_id": _KEYWORD, "object_id_field": _KEYWORD}},
                "position": {"properties": {"ordinal": {"type": "integer"}}},
                "value": {"type": "double"},
            }
        },
    }
    if untrusted:
        props["untrusted_reason"] = _KEYWORD
    return {"dynamic": False, "properties": props}


def index_bodies(cfg: EventSettings) -> dict[str, dict[str, Any]]:
    """index name -> its create-index body (settings and mappings)."""
    return {
        cfg.queries_index: {"settings": index_settings(), "mappings": queries_mappings()},
        cfg.events_index: {"settings": index_settings(), "mappings": events_mappings()},
        cfg.events_index + UNTRUSTED_SUFFIX: {
            "settings": index_settings(),
            "mappings": events_mappings(untrusted=True),
        },
    }


def index_templates(cfg: EventSettings) -> dict[str, dict[str, Any]]:
    """Index templates of the three indexes, as `index_templates/` holds them."""
    return {
        name: {
            "index_patterns": [name],
            "template": body,
            "priority": 200,
            "version": 1,
            "_meta": {"owner": "shopsearch", "template_version": 1},
        }
        for name, body in index_bodies(cfg).items()
    }


# ---------------------------------------------------------------------- our records <-> UBI documents


def query_document(r: QueryRecord) -> dict[str, Any]:
    attributes: dict[str, Any] = {"from": r.from_, "total": r.total}
    for name in ("filters", "experiment", "variant"):
        value = getattr(r, name)
        if value is not None:
            attributes[name] = value
    return {
        "application": APPLICATION,
        "query_id": r.query_id,
        "query_response_id": r.query_id,
        "timestamp": sort_key(r.timestamp),
        "user_query": r.query,
        "query_response_hit_ids": list(r.hit_ids),
        "client_id": r.user_id or r.session_id,
        "user_id": r.user_id,
        "session_id": r.session_id,
        "query_attributes": attributes,
    }


def query_record(doc: dict[str, Any]) -> QueryRecord:
    attributes = doc.get("query_attributes") or {}
    return QueryRecord(
        query_id=doc["query_id"],
        timestamp=doc["timestamp"],
        query=doc.get("user_query") or "",
        filters=attributes.get("filters"),
        hit_ids=doc.get("query_response_hit_ids") or [],
        from_=attributes.get("from", 0),
        total=attributes.get("total", 0),
        user_id=doc.get("user_id"),
        session_id=doc.get("session_id"),
        experiment=attributes.get("experiment"),
        variant=attributes.get("variant"),
    )


def event_document(e: Event, event_id: str, reason: str | None = None) -> dict[str, Any]:
    attributes: dict[str, Any] = {"object": {"object_id": e.object_id, "object_id_field": OBJECT_ID_FIELD}}
    if e.position is not None:
        attributes["position"] = {"ordinal": e.position}
    if e.value is not None:
        attributes["value"] = e.value
    doc: dict[str, Any] = {
        "application": APPLICATION,
        "action_name": e.action,
        "query_id": e.query_id,
        "event_id": event_id,
        "timestamp": sort_key(e.timestamp),
        "client_id": e.user_id or e.session_id,
        "user_id": e.user_id,
        "session_id": e.session_id,
        "event_attributes": attributes,
    }
    if reason is not None:
        doc["untrusted_reason"] = reason
    return doc


def event_record(doc: dict[str, Any]) -> Event:
    attributes = doc.get("event_attributes") or {}
    return Event(
        query_id=doc["query_id"],
        action=doc["action_name"],
        object_id=(attributes.get("object") or {})["object_id"],
        position=(attributes.get("position") or {}).get("ordinal"),
        timestamp=doc["timestamp"],
        user_id=doc.get("user_id"),
        session_id=doc.get("session_id"),
        value=attributes.get("value"),
    )


class OpenSearchEventLog:
    """Query records and events in the configured indexes, created (with their mappings) on first use."""

    def __init__(self, cluster: OpenSearchSettings, cfg: EventSettings, client: Any | None = None) -> None:
        self.cluster = cluster
        self.cfg = cfg
        self.client = client if client is not None else make_client(cluster)
        self.untrusted_index = cfg.events_index + UNTRUSTED_SUFFIX
        self._ready = False
        self._ids = 0
        self._ids_lock = threading.Lock()
        self._id_suffix = uuid.uuid4().hex[:12]

    def _event_id(self) -> str:
        """Unique, and in write order within a process: events of equal timestamps read back in the
        order they were appended."""
        with self._ids_lock:
            self._ids += 1
            return f"{time.time_ns():020d}-{self._ids:012d}-{self._id_suffix}"

    def ensure_indexes(self) -> None:
        """Create the indexes that do not exist yet (an existing one, e.g. UBI's own, is left as it is)."""
        if self._ready:
            return
        with translate_errors(self.cluster, "creating the event indexes"):
            for name, body in index_bodies(self.cfg).items():
                if not self.client.indices.exists(index=name):
                    self.client.indices.create(index=name, body=body, ignore=[400])  # 400: created meanwhile
        self._ready = True

    # ------------------------------------------------------------------ writes

    def log_queries(self, records: Sequence[QueryRecord]) -> None:
        actions = [(self.cfg.queries_index, r.query_id, query_document(r)) for r in records]
        self._bulk_all_or_nothing(actions, "logging queries")

    def append_events(self, events: Sequence[Event]) -> None:
        self.append_checked(events, ())

    def append_checked(self, trusted: Sequence[Event], untrusted: Sequence[tuple[Event, str]]) -> None:
        actions = []
        for e in trusted:
            event_id = self._event_id()
            actions.append((self.cfg.events_index, event_id, event_document(e, event_id)))
        for e, reason in untrusted:
            event_id = self._event_id()
            actions.append((self.untrusted_index, event_id, event_document(e, event_id, reason)))
        self._bulk_all_or_nothing(actions, "storing events")

    def _bulk_all_or_nothing(self, actions: list[tuple[str, str, dict[str, Any]]], what: str) -> None:
        if not actions:
            return
        self.ensure_indexes()
        ops = [{"_op_type": "create", "_index": index, "_id": doc_id, "_source": doc} for index, doc_id, doc in actions]
        with translate_errors(self.cluster, what):
            _, errors = helpers.bulk(
                self.client,
                ops,
                raise_on_error=False,
                raise_on_exception=False,
                refresh=self.cluster.write_refresh,
                chunk_size=self.cluster.bulk_chunk_size,
            )
        if not errors:
            return
        failed = {(item.get("create") or {}).get("_id") for item in errors}
        landed = [{"_op_type": "delete", "_index": i, "_id": d} for i, d, _ in actions if d not in failed]
        with translate_errors(self.cluster, f"undoing a partial write ({what})"):
            if landed:
                helpers.bulk(self.client, landed, raise_on_error=False, refresh=self.cluster.write_refresh)
        first = (errors[0].get("create") or {}).get("error")
        reason = first.get("reason") if isinstance(first, dict) else str(first)
        raise BackendError(f"OpenSearch refused {len(errors)} of {len(actions)} documents ({what}): {reason}")

    # ------------------------------------------------------------------ reads

    def queries(self, since: datetime | None = None, until: datetime | None = None) -> Iterator[QueryRecord]:
        for doc in self._scan(self.cfg.queries_index, "query_id", since, until):
            yield query_record(doc)

    def events(self, since: datetime | None = None, until: datetime | None = None) -> Iterator[Event]:
        for doc in self._scan(self.cfg.events_index, "event_id", since, until):
            yield event_record(doc)

    def untrusted(self, since: datetime | None = None, until: datetime | None = None) -> Iterator[tuple[Event, str]]:
        for doc in self._scan(self.untrusted_index, "event_id", since, until):
            yield event_record(doc), doc.get("untrusted_reason", "unknown")

    def get_queries(self, query_ids: Sequence[str]) -> dict[str, QueryRecord]:
        ids = list(dict.fromkeys(query_ids))
        if not ids:
            return {}
        with translate_errors(self.cluster, "looking up query records"):
            if not self.client.indices.exists(index=self.cfg.queries_index):
                return {}
            found = self.client.mget(index=self.cfg.queries_index, body={"ids": ids})
        return {d["_id"]: query_record(d["_source"]) for d in found["docs"] if d.get("found")}

    def _scan(self, index: str, tiebreak: str, since: datetime | None, until: datetime | None) -> Iterator[dict]:
        bounds: dict[str, str] = {}
        if since is not None:
            bounds["gte"] = sort_key(since)
        if until is not None:
            bounds["lt"] = sort_key(until)
        query = {"range": {"timestamp": bounds}} if bounds else {"match_all": {}}
        with translate_errors(self.cluster, f"reading {index}"):
            if not self.client.indices.exists(index=index):
                return
            pit = self.client.create_pit(index=index, params={"keep_alive": KEEP_ALIVE})["pit_id"]
        try:
            after: list[Any] | None = None
            while True:
                body: dict[str, Any] = {
                    "size": PAGE,
                    "query": query,
                    "sort": [{"timestamp": "asc"}, {tiebreak: "asc"}],
                    "pit": {"id": pit, "keep_alive": KEEP_ALIVE},
                    "track_total_hits": False,
                }
                if after is not None:
                    body["search_after"] = after
                with translate_errors(self.cluster, f"reading {index}"):
                    hits = self.client.search(body=body)["hits"]["hits"]
                for hit in hits:
                    yield hit["_source"]
                if len(hits) < PAGE:
                    return
                after = hits[-1]["sort"]
        finally:
            with translate_errors(self.cluster, f"closing the point in time on {index}"):
                self.client.delete_pit(body={"pit_id": [pit]})

    def refresh(self) -> None:
        """Make every write visible to searches now (tests, and exports right after a write)."""
        with translate_errors(self.cluster, "refreshing the event indexes"):
            self.client.indices.refresh(index=",".join(index_bodies(self.cfg)), ignore_unavailable=True)

    def close(self) -> None:
        self.client.close()
