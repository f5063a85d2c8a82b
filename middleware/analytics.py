"""Search analytics over query records and events: pure functions over iterables, no I/O.

Definitions (every report uses them):
- a query's text is compared trimmed, case-folded, with runs of spaces as one; browse pages
  (no text) are left out of the per-query reports;
- an impression is a served hit: position p of a search was shown when its served page holds p
  (positions are 1-based over the whole list: from + index + 1);
- a click is counted once per (search, object), however many times it was sent; its position is the
  event's, which the event log has checked against (or filled from) the served page;
- a search converts when it has an add_to_cart (purchase) event for one of its hits;
- only events of the given searches count: an event whose query_id is not among them is ignored
  (a window of time selects searches; their events count whenever they came).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

from middleware.events.model import Event, QueryRecord

DEFAULT_LIMIT = 20
DEFAULT_MAX_POSITION = 20
DEFAULT_DEEP_POSITION = 5.0
DEFAULT_DEEP_MIN_CLICKS = 2


def normalize_query(text: str) -> str:
    return " ".join(text.split()).casefold()


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


@dataclass
class _Search:
    record: QueryRecord
    clicks: dict[str, int | None] = field(default_factory=dict)  # object_id -> position of its first click
    carts: set[str] = field(default_factory=set)
    purchases: set[str] = field(default_factory=set)
    value: float = 0.0


def _join(queries: Iterable[QueryRecord], events: Iterable[Event]) -> dict[str, _Search]:
    searches = {q.query_id: _Search(q) for q in queries}
    for e in events:
        s = searches.get(e.query_id)
        if s is None:
            continue
        if e.action == "click":
            s.clicks.setdefault(e.object_id, e.position)
        elif e.action == "add_to_cart":
            s.carts.add(e.object_id)
        elif e.action == "purchase":
            s.purchases.add(e.object_id)
            if e.value is not None:
                s.value += e.value
    return searches


def top_queries(queries: Iterable[QueryRecord], limit: int = DEFAULT_LIMIT) -> list[dict[str, Any]]:
    """The most searched texts: searches, and how many found nothing. Ties in text order."""
    counts: Counter[str] = Counter()
    zero: Counter[str] = Counter()
    for q in queries:
        text = normalize_query(q.query)
        if not text:
            continue
        counts[text] += 1
        if q.total == 0:
            zero[text] += 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return [{"query": t, "searches": n, "zero_results": zero[t]} for t, n in ranked]


def zero_result_queries(queries: Iterable[QueryRecord], limit: int = DEFAULT_LIMIT) -> list[dict[str, Any]]:
    """Texts whose searches found nothing (total 0), most frequent first."""
    return [row for row in top_queries((q for q in queries if q.total == 0), limit)]


def ctr_by_position(
    queries: Iterable[QueryRecord], events: Iterable[Event], max_position: int = DEFAULT_MAX_POSITION
) -> list[dict[str, Any]]:
    """Impressions, clicks and click-through rate at each position 1..max_position."""
    searches = _join(queries, events)
    shown: Counter[int] = Counter()
    clicked: Counter[int] = Counter()
    for s in searches.values():
        r = s.record
        for i in range(len(r.hit_ids)):
            shown[r.from_ + i + 1] += 1
        for position in s.clicks.values():
            if position is not None:
                clicked[position] += 1
    return [
        {"position": p, "impressions": shown[p], "clicks": clicked[p], "ctr": _rate(clicked[p], shown[p])}
        for p in range(1, max_position + 1)
    ]


def ctr_by_query(
    queries: Iterable[QueryRecord], events: Iterable[Event], limit: int = DEFAULT_LIMIT
) -> list[dict[str, Any]]:
    """Per text, most searched first: searches, searches with a click, clicks, CTR (the share of
    searches with a click) and the mean click position."""
    groups: dict[str, list[_Search]] = defaultdict(list)
    for s in _join(queries, events).values():
        text = normalize_query(s.record.query)
        if text:
            groups[text].append(s)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:limit]
    out = []
    for text, group in ranked:
        positions = [p for s in group for p in s.clicks.values() if p is not None]
        clicked = sum(1 for s in group if s.clicks)
        out.append(
            {
                "query": text,
                "searches": len(group),
                "searches_with_click": clicked,
                "clicks": sum(len(s.clicks) for s in group),
                "ctr": _rate(clicked, len(group)),
                "mean_click_position": fmean(positions) if positions else None,
            }
        )
    return out


def conversion(queries: Iterable[QueryRecord], events: Iterable[Event]) -> dict[str, Any]:
    """Searches, the shares with a click, an add_to_cart and a purchase, purchases and their value."""
    searches = list(_join(queries, events).values())
    n = len(searches)
    clicked = sum(1 for s in searches if s.clicks)
    carted = sum(1 for s in searches if s.carts)
    bought = sum(1 for s in searches if s.purchases)
    return {
        "searches": n,
        "searches_with_click": clicked,
        "searches_with_add_to_cart": carted,
        "searches_with_purchase": bought,
        "click_rate": _rate(clicked, n),
        "add_to_cart_rate": _rate(carted, n),
        "purchase_rate": _rate(bought, n),
        "purchases": sum(len(s.purchases) for s in searches),
        "value_sum": sum(s.value for s in searches),
    }


def deep_click_queries(
    queries: Iterable[QueryRecord],
    events: Iterable[Event],
    min_position: float = DEFAULT_DEEP_POSITION,
    min_clicks: int = DEFAULT_DEEP_MIN_CLICKS,
    limit: int = DEFAULT_LIMIT,
) -> list[dict[str, Any]]:
    """Texts whose clicks land deep: at least `min_clicks` clicks with a mean position of at least
    `min_position` (the ranking puts what shoppers want low). Deepest first."""
    rows = [
        row
        for row in ctr_by_query(queries, events, limit=2**31)
        if row["clicks"] >= min_clicks
        and row["mean_click_position"] is not None
        and row["mean_click_position"] >= min_position
    ]
    rows.sort(key=lambda r: (-r["mean_click_position"], -r["clicks"], r["query"]))
    return rows[:limit]


def untrusted_counts(untrusted: Iterable[tuple[Event, str]]) -> dict[str, int]:
    """Untrusted events by reason, and their total."""
    counts = Counter(reason for _, reason in untrusted)
    return {**dict(sorted(counts.items())), "total": sum(counts.values())}


def report(
    queries: Iterable[QueryRecord],
    events: Iterable[Event],
    untrusted: Iterable[tuple[Event, str]] = (),
    *,
    limit: int = DEFAULT_LIMIT,
    max_position: int = DEFAULT_MAX_POSITION,
    min_position: float = DEFAULT_DEEP_POSITION,
    min_clicks: int = DEFAULT_DEEP_MIN_CLICKS,
) -> dict[str, Any]:
    """Every report at once."""
    queries = list(queries)
    events = list(events)
    return {
        "searches": len(queries),
        "events": len(events),
        "events_by_action": dict(sorted(Counter(e.action for e in events).items())),
        "top_queries": top_queries(queries, limit),
        "zero_results": zero_result_queries(queries, limit),
        "ctr_by_position": ctr_by_position(queries, events, max_position),
        "ctr_by_query": ctr_by_query(queries, events, limit),
        "conversion": conversion(queries, events),
        "deep_clicks": deep_click_queries(queries, events, min_position, min_clicks, limit),
        "untrusted_events": untrusted_counts(untrusted),
    }
