"""Events as clients send them: validated (an error names the field by its index, e.g.
`events[3].action`), then sorted into clean signal and events that cannot be trusted.

Clients may send our field names or UBI's: `action_name` for `action`, `client_id` for `user_id`,
`event_attributes.object.object_id` for `object_id`, `event_attributes.position.ordinal` for
`position`, `event_attributes.value` for `value`; UBI's `application`, `message`, `message_type`
and other `event_attributes` keys are accepted and not stored.

An event is untrusted, for the first of these reasons:
- `query_not_sampled`: no record of its query_id, and the sampling rule says that search was not logged;
- `unknown_query`: no record of its query_id, though the search would have been logged;
- `unknown_object`: its object is not among the search's served hits, nor in the catalog;
- `object_not_served`: its object is in the catalog but was not among the search's served hits;
- `position_mismatch`: it names a position other than the one its object was served at.
Untrusted events are stored apart and counted in analytics, never read as clean signal. A clean
event without a position takes the position its object was served at.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from middleware.events.model import Event, QueryRecord
from middleware.events.store import sampled

REASONS: tuple[str, ...] = (
    "query_not_sampled",
    "unknown_query",
    "unknown_object",
    "object_not_served",
    "position_mismatch",
)

MAX_POSITION = 2**31 - 1  # the integer of UBI's `event_attributes.position.ordinal` mapping
UBI_IGNORED = frozenset({"application", "message", "message_type", "event_id", "page_id"})


class EventInputError(ValueError):
    """A malformed event: `param` names the field, e.g. `events[3].action`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


def _from_ubi(item: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Our field names for a UBI-shaped event, and where each of our fields came from."""
    out = {k: v for k, v in item.items() if k not in UBI_IGNORED}
    paths = {k: f"{where}.{k}" for k in out}
    for ubi, ours in (("action_name", "action"), ("client_id", "user_id")):
        if ubi in out:
            value = out.pop(ubi)
            paths.pop(ubi, None)
            if ours in out:
                if ubi == "client_id":
                    continue  # user_id given too: it wins
                raise EventInputError(f"{where}.{ubi}", f"give {ours} or {ubi}, not both")
            out[ours] = value
            paths[ours] = f"{where}.{ubi}"
    attributes = out.pop("event_attributes", None)
    paths.pop("event_attributes", None)
    if attributes is None:
        return out, paths
    here = f"{where}.event_attributes"
    if not isinstance(attributes, dict):
        raise EventInputError(here, "must be an object")
    obj = attributes.get("object")
    if obj is not None:
        if not isinstance(obj, dict):
            raise EventInputError(f"{here}.object", "must be an object")
        if "object_id" in obj:
            _take(out, paths, "object_id", obj["object_id"], f"{here}.object.object_id")
    position = attributes.get("position")
    if position is not None:
        if not isinstance(position, dict):
            raise EventInputError(f"{here}.position", "must be an object")
        if "ordinal" in position:
            _take(out, paths, "position", position["ordinal"], f"{here}.position.ordinal")
    if "value" in attributes:
        _take(out, paths, "value", attributes["value"], f"{here}.value")
    if "session_id" in attributes and "session_id" not in out:
        _take(out, paths, "session_id", attributes["session_id"], f"{here}.session_id")
    return out, paths


def _take(out: dict[str, Any], paths: dict[str, str], name: str, value: Any, path: str) -> None:
    if name in out:
        raise EventInputError(path, f"{name} is given twice ({paths[name]} too)")
    out[name] = value
    paths[name] = path


def parse_events(body: Any, max_events: int) -> list[Event]:
    """The events of a `{"events": [...]}` body, every one valid, or EventInputError for the first fault."""
    if not isinstance(body, dict):
        raise EventInputError("body", 'must be a JSON object {"events": [...]}')
    extra = sorted(set(body) - {"events"})
    if extra:
        raise EventInputError(extra[0], "unknown field (the body holds only events)")
    items = body.get("events")
    if not isinstance(items, list):
        raise EventInputError("events", "must be a list of events")
    if not items:
        raise EventInputError("events", "must hold at least one event")
    if len(items) > max_events:
        raise EventInputError("events", f"at most {max_events} events per request (events.max_events_per_request)")
    parsed: list[Event] = []
    for i, item in enumerate(items):
        where = f"events[{i}]"
        if not isinstance(item, dict):
            raise EventInputError(where, "must be an object")
        fields, paths = _from_ubi(item, where)
        try:
            parsed.append(Event.model_validate(fields))
        except ValidationError as err:
            first = err.errors()[0]
            loc = [str(p) for p in first.get("loc", ())]
            name = loc[0] if loc else ""
            path = paths.get(name, f"{where}.{name}" if name else where)
            if len(loc) > 1:
                path += "." + ".".join(loc[1:])
            message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
            if first.get("type") == "extra_forbidden":
                message = "unknown field"
            raise EventInputError(path, message) from None
        fault = event_fault(parsed[-1])
        if fault is not None:
            raise EventInputError(paths.get(fault[0], f"{where}.{fault[0]}"), fault[1])
    return parsed


def event_fault(e: Event) -> tuple[str, str] | None:
    """What a valid Event may still hold that the logs cannot store or report: (field, message)."""
    if e.value is not None and not math.isfinite(e.value):
        return "value", "must be a finite number"
    if e.position is not None and e.position > MAX_POSITION:
        return "position", f"must be at most {MAX_POSITION}"
    return None


@dataclass
class Checked:
    trusted: list[Event] = field(default_factory=list)
    untrusted: list[tuple[Event, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Untrusted events by reason (every reason named, zero included)."""
        found = Counter(reason for _, reason in self.untrusted)
        return {reason: found.get(reason, 0) for reason in REASONS}


def check_events(
    events: Iterable[Event],
    records: Mapping[str, QueryRecord],
    in_catalog: Callable[[Sequence[str]], set[str]],
    sample_rate: float,
) -> Checked:
    """Sort events into clean and untrusted ones (see the module's reasons). `records`: the logged
    searches of these events' query_ids; `in_catalog`: which of some product ids the catalog holds."""
    events = list(events)
    served: dict[str, dict[str, int]] = {
        qid: {oid: r.from_ + i + 1 for i, oid in enumerate(r.hit_ids)} for qid, r in records.items()
    }
    stray = [e.object_id for e in events if e.query_id in served and e.object_id not in served[e.query_id]]
    known = in_catalog(list(dict.fromkeys(stray))) if stray else set()
    out = Checked()
    for e in events:
        positions = served.get(e.query_id)
        if positions is None:
            reason = "unknown_query" if sampled(e.query_id, sample_rate) else "query_not_sampled"
            out.untrusted.append((e, reason))
            continue
        at = positions.get(e.object_id)
        if at is None:
            out.untrusted.append((e, "object_not_served" if e.object_id in known else "unknown_object"))
        elif e.position is not None and e.position != at:
            out.untrusted.append((e, "position_mismatch"))
        else:
            out.trusted.append(e if e.position is not None else e.model_copy(update={"position": at}))
    return out
