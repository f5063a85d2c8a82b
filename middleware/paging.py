"""What a search matches, how it is counted, and how its pages continue.

A product matches a query when it matches lexically under the filters, or when its vector similarity
clears the kNN floor: max(absolute, relative × the query's best similarity). The ranked order is the
reranked and business-scored head, then the remaining lexical matches by BM25 and id, so every depth
of one query over an unchanged store is one deterministic order. A cursor is an opaque token holding
the position reached, the query's hash and the store's mark; another query or a changed store makes
it stale.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from middleware.backends.base import SORT_FIELDS, Backend, MatchSet, SortKey, StoreStats
from middleware.config import KnnFloorSettings
from middleware.products import Candidate

# Measured by benchmarks/knn_floor.py on ../shared/data/homedepot (benchmarks/results/knn_floor.json):
# (relative, absolute) per embedder, keyed by the lower-cased model name. relative: 2% of the relevant
# products lie below it (relative to the query's best hit); absolute: above the best similarity any
# gibberish query reaches, so such a query has no vector matches.
CALIBRATED_FLOORS: dict[str, tuple[float, float]] = {
    "sentence-transformers/all-minilm-l6-v2": (0.38, 0.49),
}
UNCALIBRATED_FLOOR = (0.38, 0.0)  # another embedder: the relative floor only, until it is measured

SCORE_ORDER = (SortKey("_score", descending=True),)
WALK_CHUNK = 200  # listing rows fetched per call while walking a tail


class InvalidRequest(ValueError):
    """The request cannot be answered as given; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Floor:
    relative: float
    absolute: float

    def threshold(self, best: float) -> float:
        return max(self.absolute, self.relative * best)


def knn_floor(cfg: KnnFloorSettings, embedder: str) -> Floor:
    """The configured floor; unset parts take the values calibrated for `embedder`."""
    relative, absolute = CALIBRATED_FLOORS.get(_model_key(embedder), UNCALIBRATED_FLOOR)
    return Floor(
        relative=relative if cfg.relative is None else cfg.relative,
        absolute=absolute if cfg.absolute is None else cfg.absolute,
    )


def _model_key(embedder: str) -> str:
    name = embedder.strip().lower().rstrip("/")
    if name.startswith("all-minilm-l6-v2") or name.endswith("/all-minilm-l6-v2"):
        return "sentence-transformers/all-minilm-l6-v2"
    return name


# How a backend's kNN score relates to the inner product of the vectors: "similarity" (the score is it),
# or "opensearch_innerproduct" (OpenSearch's innerproduct space: 1 + d for d >= 0, 1 / (1 - d) below).
SIMILARITY = "similarity"
OPENSEARCH_INNERPRODUCT = "opensearch_innerproduct"


def knn_score_scale(backend: object) -> str:
    return str(getattr(backend, "knn_score_scale", SIMILARITY))


def to_similarity(score: float, scale: str) -> float:
    if scale == OPENSEARCH_INNERPRODUCT:
        return score - 1.0 if score >= 1.0 else 1.0 - 1.0 / score if score > 0 else -1.0
    return score


def from_similarity(similarity: float, scale: str) -> float:
    if scale == OPENSEARCH_INNERPRODUCT:
        return 1.0 + similarity if similarity >= 0 else 1.0 / (1.0 - similarity)
    return similarity


def score_threshold(best_score: float, floor: Floor, scale: str) -> float:
    """The kNN score (in the backend's scale) a hit must reach, given the query's best score."""
    return from_similarity(floor.threshold(to_similarity(best_score, scale)), scale)


def above_floor(hits: Sequence[Candidate], floor: Floor, scale: str) -> tuple[list[Candidate], float | None]:
    """The kNN hits that clear the floor (in their order) and the score they had to reach."""
    scores = [c.knn for c in hits if c.knn is not None]
    if not scores:
        return [], None
    threshold = score_threshold(max(scores), floor, scale)
    return [c for c in hits if c.knn is not None and c.knn >= threshold], threshold


# ---------------------------------------------------------------------------------------- sort


def parse_sort(sort: Sequence[Any] | None) -> list[SortKey]:
    """`[{"price": "asc"}, "_score", {"sales": {"order": "desc"}}]` → SortKeys (InvalidRequest naming the field)."""
    if sort is None:
        return []
    keys: list[SortKey] = []
    for i, item in enumerate(sort):
        if isinstance(item, str):
            field, order = item, "desc" if item == "_score" else "asc"
        elif isinstance(item, dict) and len(item) == 1:
            field, order = next(iter(item.items()))
            if isinstance(order, dict) and set(order) <= {"order"}:
                order = order.get("order", "desc" if field == "_score" else "asc")
        else:
            raise InvalidRequest(f"each entry is a field name or {{field: 'asc' | 'desc'}}, got {item!r:.80}", "sort")
        if field != "_score" and field not in SORT_FIELDS:
            raise InvalidRequest(
                f"cannot sort on {str(field)[:80]!r}: sortable fields are {', '.join(('_score', *SORT_FIELDS))}",
                f"sort.{i}.{str(field)[:80]}",
            )
        if order not in ("asc", "desc"):
            raise InvalidRequest(f"order must be 'asc' or 'desc', got {order!r:.40}", f"sort.{i}.{field}")
        keys.append(SortKey(field, descending=order == "desc"))
    return keys


# ---------------------------------------------------------------------------------------- cursors


@dataclass(frozen=True)
class Cursor:
    position: int  # ranked position of the next hit
    listing_offset: int  # where the lexical tail's walk resumes


def store_mark(stats: StoreStats) -> str:
    """Changes whenever the store's content may have: generation, product and vector counts, indexes."""
    parts = [stats.backend, stats.generation, stats.products, stats.vectors, stats.details.get("indexes")]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def query_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_cursor(key: str, mark: str, cursor: Cursor) -> str:
    raw = json.dumps({"q": key, "s": mark, "p": cursor.position, "l": cursor.listing_offset}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def cursor_position(token: str) -> int | None:
    """The ranked position a cursor's page starts at, unchecked (for a search already answered with
    it); None when it is not a cursor."""
    try:
        position = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))["p"]
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        return None
    return position if isinstance(position, int) and not isinstance(position, bool) and position >= 0 else None


def decode_cursor(token: str, key: str, mark: str) -> Cursor:
    """The cursor, or InvalidRequest("stale cursor ...") when it is from another query, store state, or garbled."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        position, offset = raw["p"], raw["l"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (position, offset)):
            raise ValueError("bad positions")
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest("stale cursor: not a cursor this service issued", "search_after") from None
    if raw.get("q") != key:
        raise InvalidRequest(
            "stale cursor: it belongs to another query (query, filters, sort or ranking)", "search_after"
        )
    if raw.get("s") != mark:
        raise InvalidRequest("stale cursor: the store changed since it was issued; start again", "search_after")
    return Cursor(position=position, listing_offset=offset)


# ---------------------------------------------------------------------------------------- walks


def walk(
    backend: Backend, match: MatchSet, sort: Sequence[SortKey], offset: int = 0, skip_ids: frozenset[str] = frozenset()
) -> Iterator[tuple[int, Candidate]]:
    """The listing from `offset` on, lazily, as (offset after the row, candidate), rows in `skip_ids` left out."""
    while True:
        rows = backend.listing(match, list(sort), offset, WALK_CHUNK)
        for cand in rows:
            offset += 1
            if cand.id not in skip_ids:
                yield offset, cand
        if len(rows) < WALK_CHUNK:
            return


def capped_total(count: int, track: bool | int) -> tuple[int, str]:
    """(total, relation) for an exact `count` under track_total_hits: True exact, N: capped at N."""
    if track is True or count <= int(track):
        return count, "eq"
    return int(track), "gte"
