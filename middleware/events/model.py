"""The two record types of the learning loop and the one interface that stores them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, Literal, Protocol, get_args

from pydantic import BaseModel, ConfigDict, Field

Action = Literal["impression", "click", "add_to_cart", "purchase"]
ACTIONS: tuple[str, ...] = get_args(Action)


class QueryRecord(BaseModel):
    """One search as served: its id (returned to the client as `query_id`), what was asked and the
    page of hits shown, in order. `experiment`/`variant` record an A/B exposure; `None` outside one."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    query_id: str = Field(min_length=1, max_length=128)
    timestamp: datetime  # timezone-aware, UTC
    query: str = Field("", max_length=10_000)  # "" for a browse (category) page
    filters: dict[str, Any] | None = None
    hit_ids: list[str] = Field(default_factory=list)  # the served page, position 1 first
    from_: int = Field(0, ge=0, alias="from")
    total: int = Field(0, ge=0)
    user_id: str | None = Field(None, max_length=256)
    session_id: str | None = Field(None, max_length=256)
    experiment: str | None = Field(None, max_length=128)
    variant: str | None = Field(None, max_length=128)


class Event(BaseModel):
    """One shopper action on a served search. `position` is 1-based over the whole result list
    (a hit at index i of a page that starts at `from` has position from + i + 1)."""

    model_config = ConfigDict(extra="forbid")

    query_id: str = Field(min_length=1, max_length=128)
    action: Action
    object_id: str = Field(min_length=1, max_length=512)
    position: int | None = Field(None, ge=1)
    timestamp: datetime
    user_id: str | None = Field(None, max_length=256)
    session_id: str | None = Field(None, max_length=256)
    value: float | None = None  # e.g. a purchase's amount; analytics sum it when present


class EventLog(Protocol):
    """Durable, append-only storage of query records and events. Writes are all-or-nothing per call."""

    def log_queries(self, records: Sequence[QueryRecord]) -> None:
        """Append served searches."""
        ...

    def append_events(self, events: Sequence[Event]) -> None:
        """Append actions; raise without storing any of them if one cannot be stored."""
        ...

    def queries(self, since: datetime | None = None, until: datetime | None = None) -> Iterator[QueryRecord]:
        """Query records with since <= timestamp < until, oldest first."""
        ...

    def events(self, since: datetime | None = None, until: datetime | None = None) -> Iterator[Event]:
        """Events with since <= timestamp < until, oldest first."""
        ...

    def close(self) -> None:
        """Release files and connections."""
        ...


def by_query(events: Iterable[Event]) -> dict[str, list[Event]]:
    """Events grouped by their query_id, each group in the order given."""
    grouped: dict[str, list[Event]] = {}
    for event in events:
        grouped.setdefault(event.query_id, []).append(event)
    return grouped
