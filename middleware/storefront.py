"""The storefront response stage: facet counts, highlighted fragments, and the autocomplete source
of popular past queries.

Facets are counted over the set the response's total counts (the pipeline's match set): the lexical
matches after filters plus the vector hits above the similarity floor. Faceting is disjunctive unless the request turns
it off: a facet's own filter (brand for the brand facet, category for category, the price bounds for
price) is left out of its counts, so a shopper who picked one brand still sees the other brands'
counts. The vector part of a relaxed count is the hits retrieved under the full filters (the other
brands' vector hits were never retrieved); the lexical part is exact. Exclusions (`Filters.exclude`)
apply to every facet: a product the request leaves out is counted nowhere.
"""

from __future__ import annotations

import bisect
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from middleware.backends.base import (
    HIGHLIGHT_FIELDS,
    NUMERIC_FACET_FIELDS,
    TERM_FACET_FIELDS,
    Backend,
    Facet,
    FacetSpec,
    HighlightTags,
    MatchSet,
    TermCount,
)
from middleware.budget import Deadline, DeadlineExceeded
from middleware.products import Filters
from middleware.schema import (
    FacetRequest,
    HighlightRequest,
    RangeBucket,
    SearchRequest,
    StatsResult,
    Suggestion,
    ValueBucket,
)

FACET_FIELDS = TERM_FACET_FIELDS + NUMERIC_FACET_FIELDS
MAX_FACETS = 20  # facet specs in one request
MAX_RANGES = 50  # buckets in one range facet
# the filter fields a facet on each field leaves out of its own counts (disjunctive faceting)
OWN_FILTERS: dict[str, tuple[str, ...]] = {"brand": ("brand",), "category": ("category",),
                                           "price": ("price_min", "price_max")}  # fmt: skip

# Highlight tags: a fixed set of inline elements, or a span with plain class names. Anything else
# (attributes, event handlers, other elements, text) is refused: the tags are the only unescaped
# markup in a fragment.
_SIMPLE_TAGS = ("em", "mark", "b", "strong", "i", "u")
_SPAN = re.compile(r'<span class="([A-Za-z0-9_\- ]{1,64})">')


class StorefrontError(ValueError):
    """A bad facet or highlight parameter; `param` names it (the API answers 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


# ------------------------------------------------------------------------------------------ facets


@dataclass(frozen=True)
class NamedFacet:
    name: str  # the key in the response's `facets`
    spec: FacetSpec


def facet_plan(facets: Sequence[str | FacetRequest] | None) -> list[NamedFacet]:
    """The request's facets as specs with response names, or StorefrontError naming the bad one.

    A bare field name is a value facet (brand, category). A range facet is named after its field, a
    stats facet after its field plus "_stats"; `name` overrides either. Two facets may not share a name.
    """
    if not facets:
        return []
    if len(facets) > MAX_FACETS:
        raise StorefrontError("facets", f"at most {MAX_FACETS} facets per request")
    plan: list[NamedFacet] = []
    seen: set[str] = set()
    for i, item in enumerate(facets):
        where = f"facets[{i}]"
        request = FacetRequest(field=item) if isinstance(item, str) else item
        if request.field not in FACET_FIELDS:
            raise StorefrontError(
                f"{where}.field",
                f"unknown facet field {request.field[:100]!r}; facets are on {', '.join(FACET_FIELDS)}",
            )
        if request.field in NUMERIC_FACET_FIELDS and request.ranges is None and not request.stats:
            raise StorefrontError(where, f"a facet on {request.field!r} needs ranges or stats: true")
        if request.ranges is not None and len(request.ranges) > MAX_RANGES:
            raise StorefrontError(f"{where}.ranges", f"at most {MAX_RANGES} ranges")
        for j, (start, end) in enumerate(request.ranges or ()):
            if start is not None and end is not None and start > end:
                raise StorefrontError(f"{where}.ranges[{j}]", "a range's start must not exceed its end")
        try:
            spec = FacetSpec(
                field=request.field,
                size=request.size,
                ranges=tuple((a, b) for a, b in request.ranges) if request.ranges is not None else None,
                stats=request.stats,
            )
        except ValueError as err:
            raise StorefrontError(where, str(err)) from None
        name = request.name or (f"{request.field}_stats" if request.stats else request.field)
        if name in seen:
            raise StorefrontError(f"{where}.name", f"two facets are named {name!r}: give one a distinct name")
        seen.add(name)
        plan.append(NamedFacet(name, spec))
    return plan


def _relaxed(filters: Filters | None, field: str) -> Filters | None:
    own = OWN_FILTERS.get(field, ())
    if filters is None or not any(getattr(filters, f) is not None for f in own):
        return filters
    relaxed = filters.model_copy(update={f: None for f in own})
    return None if relaxed.is_empty() else relaxed


def compute_facets(
    backend: Backend,
    match: MatchSet,
    plan: Sequence[NamedFacet],
    *,
    disjunctive: bool = True,
    deadline: Deadline | None = None,
) -> dict[str, list[ValueBucket] | list[RangeBucket] | StatsResult]:
    """Each facet counted over `match`, or (disjunctive) over `match` without the facet's own filter.
    Facets that share a match set are asked for in one backend call. DeadlineExceeded when the
    deadline passes before the last call starts: the counts are all there or none are."""
    groups: dict[str, tuple[MatchSet, list[NamedFacet]]] = {}
    for item in plan:
        filters = _relaxed(match.filters, item.spec.field) if disjunctive else match.filters
        key = filters.model_dump_json() if filters is not None else ""
        groups.setdefault(key, (MatchSet(match.text, filters, match.ids), []))[1].append(item)
    answers: dict[str, Facet] = {}
    for group_match, items in groups.values():
        if deadline is not None and deadline.remaining_s() <= 0:
            raise DeadlineExceeded("facets ran out of the request's time budget")
        for item, facet in zip(items, backend.facets(group_match, [i.spec for i in items]), strict=True):
            answers[item.name] = facet
    return {item.name: _facet_result(answers[item.name]) for item in plan}


def _facet_result(facet: Facet) -> list[ValueBucket] | list[RangeBucket] | StatsResult:
    if facet.values is not None:
        return [ValueBucket(value=v.value, count=v.count) for v in facet.values]
    if facet.ranges is not None:
        return [RangeBucket(from_=r.start, to=r.end, count=r.count) for r in facet.ranges]
    assert facet.stats is not None
    s = facet.stats
    return StatsResult(count=s.count, min=s.min, max=s.max, sum=s.sum, avg=s.avg)


# --------------------------------------------------------------------------------------- highlight


def check_tags(pre: str, post: str | None, where: str = "highlight") -> tuple[str, str]:
    """(pre, post) when `pre` is an allowed opening tag and `post` closes it (None: derived)."""
    element: str | None = None
    if pre in {f"<{t}>" for t in _SIMPLE_TAGS}:
        element = pre[1:-1]
    elif _SPAN.fullmatch(pre):
        element = "span"
    if element is None:
        allowed = ", ".join(f"<{t}>" for t in _SIMPLE_TAGS)
        raise StorefrontError(
            f"{where}.pre_tag", f'must be one of {allowed} or <span class="names">, got {pre[:100]!r}'
        )
    closing = f"</{element}>"
    if post is not None and post != closing:
        raise StorefrontError(f"{where}.post_tag", f"must be {closing!r} to close {pre[:100]!r}, got {post[:100]!r}")
    return pre, closing


def highlight_plan(highlight: bool | HighlightRequest) -> tuple[HighlightTags, list[str]] | None:
    """The tags and fields a request's `highlight` asks for (None: none), or StorefrontError."""
    if highlight is False:
        return None
    request = HighlightRequest() if highlight is True else highlight
    pre, post = check_tags(request.pre_tag, request.post_tag)
    for i, name in enumerate(request.fields):
        if name not in HIGHLIGHT_FIELDS:
            raise StorefrontError(f"highlight.fields[{i}]", f"must be one of {HIGHLIGHT_FIELDS}, got {name[:100]!r}")
    tags = HighlightTags(
        pre=pre, post=post, fragment_chars=request.fragment_size, fragments=request.number_of_fragments
    )
    return tags, list(dict.fromkeys(request.fields))


def check_request(req: SearchRequest) -> None:
    """StorefrontError naming the first bad facet or highlight parameter, before any search runs."""
    facet_plan(req.facets)
    highlight_plan(req.highlight)


# ----------------------------------------------------------------------------------------- suggest


def normalize_query(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


MAX_PREFIX_MATCHES = 2000  # recorded queries ranked per lookup (a one-letter prefix may match thousands)


class PopularQueries:
    """A bounded count of successful queries in this process (not shared between processes or kept
    across restarts). When it holds twice `capacity` queries, the least frequent are dropped down to
    `capacity`, so a burst of one-off queries cannot grow it without bound. A query is offered to
    other shoppers only once it has been searched `min_count` times: one shopper's one-off text (a
    name, an order number) is not shown to everyone."""

    def __init__(self, capacity: int = 5000, max_chars: int = 64, min_count: int = 2) -> None:
        self.capacity = capacity
        self.max_chars = max_chars
        self.min_count = min_count
        self._counts: dict[str, int] = {}
        self._keys: list[str] = []  # the same queries, sorted: a prefix is one bisect away
        self._lock = threading.Lock()

    def record(self, query: str) -> None:
        key = normalize_query(query)
        if not key or len(key) > self.max_chars:
            return
        with self._lock:
            count = self._counts.get(key)
            self._counts[key] = 1 if count is None else count + 1
            if count is None:
                bisect.insort(self._keys, key)
            if len(self._counts) >= 2 * self.capacity:
                kept = sorted(self._counts.items(), key=lambda kv: -kv[1])[: self.capacity]
                self._counts = dict(kept)
                self._keys = sorted(self._counts)

    def __len__(self) -> int:
        return len(self._counts)

    def with_prefix(self, prefix: str, n: int) -> list[tuple[str, int]]:
        """Up to n recorded queries starting with `prefix` (normalised), most frequent first."""
        key = normalize_query(prefix)
        if not key or n <= 0:
            return []
        found: list[tuple[str, int]] = []
        with self._lock:
            i = bisect.bisect_left(self._keys, key)
            while i < len(self._keys) and self._keys[i].startswith(key) and len(found) < MAX_PREFIX_MATCHES:
                count = self._counts[self._keys[i]]
                if self._keys[i] != key and count >= self.min_count:
                    found.append((self._keys[i], count))
                i += 1
        found.sort(key=lambda qc: (-qc[1], qc[0]))
        return found[:n]


MAX_SUGGEST_CHARS = 64


def suggest(backend: Backend, popular: PopularQueries | None, prefix: str, size: int) -> list[Suggestion]:
    """Completions of `prefix`: popular past queries first (at most half of `size` while the catalog has
    enough), then catalog prefixes (title words, brands, categories) by the number of products holding them."""
    if not prefix.strip() or size <= 0:
        return []
    past = popular.with_prefix(prefix, size) if popular is not None else []
    terms: list[TermCount] = backend.prefix_terms(prefix.strip(), size)
    out: list[Suggestion] = []
    seen: set[str] = set()

    def add(text: str, kind: str, count: int) -> None:
        key = normalize_query(text)
        if key not in seen and len(out) < size:
            seen.add(key)
            out.append(Suggestion(text=text, kind=kind, count=count))  # type: ignore[arg-type]

    share = max(size - len(terms), (size + 1) // 2)
    for text, count in past[:share]:
        add(text, "query", count)
    for term in terms:
        add(term.term, term.kind, term.doc_freq)
    for text, count in past[share:]:
        add(text, "query", count)
    return out
