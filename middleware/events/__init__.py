"""What shoppers did with the results: the searches served (query records) and their actions on
them (events), in field names compatible with OpenSearch UBI's `ubi_queries` / `ubi_events`.

Every consumer (analytics, A/B reports, click-to-training-pairs) reads these two record types and
nothing engine-specific: an `EventLog` stores them durably, in SQLite on the embedded backend and
in the `ubi_queries` / `ubi_events` indexes on OpenSearch.
"""

from middleware.events.model import ACTIONS, Action, Event, EventLog, QueryRecord

__all__ = ["ACTIONS", "Action", "Event", "EventLog", "QueryRecord"]
