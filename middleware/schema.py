"""Request and response models of the query path (library, REST API and CLI share them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from middleware.config import BusinessSettings
from middleware.products import MAX_QUERY_CHARS, Filters

Stage = Literal["embed", "bm25", "knn", "hybrid", "rerank", "business", "facets", "highlight", "rules"]


class FacetRequest(BaseModel):
    """One facet: a field's value counts (brand, category), or a numeric field's `ranges`
    ([start, end), null open) or `stats`. In the response it is keyed by `name`: by default the field,
    and the field plus "_stats" for stats, so a range and a stats facet on one field do not collide."""

    model_config = ConfigDict(extra="forbid")

    field: str = Field(max_length=100)
    name: str | None = Field(None, min_length=1, max_length=100)
    size: int = Field(10, ge=1, le=1000, description="value facets: the most frequent values returned")
    ranges: list[tuple[float | None, float | None]] | None = Field(None, min_length=1)
    stats: bool = False


class HighlightRequest(BaseModel):
    """Highlighted fragments of the hits' title and description. Text is HTML-escaped; the tags are
    the only markup, and only <em>, <mark>, <b>, <strong>, <i>, <u> or <span class="..."> are allowed."""

    model_config = ConfigDict(extra="forbid")

    pre_tag: str = Field("<em>", max_length=200)
    post_tag: str | None = Field(None, max_length=200, description="default: the closing tag of pre_tag")
    fragment_size: int = Field(100, ge=1, le=10_000)
    number_of_fragments: int = Field(3, ge=1, le=100)
    fields: list[str] = Field(default_factory=lambda: ["title", "description"], min_length=1, max_length=10)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    query: str | None = Field(None, max_length=MAX_QUERY_CHARS)  # empty or absent: browse under the filters
    filters: Filters | None = None
    from_: int = Field(0, ge=0, alias="from")
    size: int = Field(10, ge=0, le=10_000)
    retrieval: Literal["hybrid", "bm25", "vector"] = "hybrid"
    fusion: Literal["rrf", "minmax"] | None = None  # None: the configured method
    bm25_weight: float | None = Field(None, ge=0)
    knn_weight: float | None = Field(None, ge=0)
    rrf_k: int | None = Field(None, ge=1, le=10_000)  # None: the configured fusion.rrf_k
    retrieve_n: int | None = Field(None, ge=1, le=10_000)
    rerank: bool = True
    rerank_k: int | None = Field(None, ge=0, le=10_000)
    reranker: str | None = Field(None, min_length=1, max_length=128)  # a name from settings.rerankers; None: reranker
    business: BusinessSettings | None = None  # None: the configured weights; see business_enabled
    business_enabled: bool = True
    explain: bool = False
    deadline_ms: float | None = Field(None, gt=0, le=600_000)
    # paging and order: [{"price": "asc"}] on price, sales, stock or _score; search_after: a response's next_cursor
    sort: list[str | dict[str, Any]] | None = Field(None, max_length=8)
    search_after: str | None = Field(None, max_length=1000)
    track_total_hits: bool | int = Field(10_000, ge=0)  # True: count exactly; N: count up to N (then "gte")
    facets: list[str | FacetRequest] | None = Field(None, max_length=100)
    # False: facets count under every filter (OpenSearch's aggs without post_filter)
    disjunctive_facets: bool = True
    highlight: bool | HighlightRequest = False
    rules: bool = True  # False: merchandising rules off (to compare)
    collapse: Literal["group_id"] | None = None  # one hit per product family (attributes.group_id)
    # who searched: the unit of A/B assignment and of the event log (opaque ids, never shown back)
    user_id: str | None = Field(None, min_length=1, max_length=256)
    session_id: str | None = Field(None, min_length=1, max_length=256)
    # the A/B exposure middleware.experiments assigned (never the client's to claim): the response names it
    _exposure: Any = PrivateAttr(default=None)


class Explanation(BaseModel):
    """Each stage's score; final = relevance + sales_bonus - stock_penalty when business scoring ran."""

    bm25: float | None = None
    knn: float | None = None
    fused: float | None = None
    rerank: float | None = None
    relevance: float | None = Field(None, description="0–1: the reranker's probability or normalised retrieval scores")
    sales_bonus: float | None = Field(None, description="margin · w_sales · smoothed sales term, in [0, margin]")
    stock_penalty: float | None = Field(None, description="out_of_stock_penalty · margin when out of stock, else 0")
    business: float | None = Field(None, description="sales_bonus - stock_penalty")
    final: float | None = None
    ranks: dict[str, int] = Field(default_factory=dict)
    knn_floor: float | None = None  # the similarity a vector hit had to reach to match
    rules: list[str] | None = None  # what merchandising rules did to this hit: "pin:r1 position 1", "boost:r2 x1.5"


class Hit(BaseModel):
    id: str
    score: float
    product: dict[str, Any]
    explain: Explanation | None = None
    highlight: dict[str, list[str]] | None = None  # field -> fragments, when asked for and matched
    variants: int | None = None  # with collapse: products of this hit's family among the ranked candidates


class ValueBucket(BaseModel):
    value: str
    count: int


class RangeBucket(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    from_: float | None = Field(alias="from")  # inclusive; null: open
    to: float | None  # exclusive; null: open
    count: int


class StatsResult(BaseModel):
    count: int  # matching products with a value
    min: float | None
    max: float | None
    sum: float
    avg: float | None


class Suggestion(BaseModel):
    text: str
    kind: Literal["query", "term", "brand", "category"]  # a popular past query, or a catalog prefix
    count: int  # times searched (query) or products holding it


class SuggestResponse(BaseModel):
    query: str
    suggestions: list[Suggestion]
    took_ms: float


class SearchResponse(BaseModel):
    hits: list[Hit]
    total: int  # products that match (lexically under the filters, or vector hits above the floor)
    relation: Literal["eq", "gte"] = "eq"  # "gte": counted up to track_total_hits
    next_cursor: str | None = None  # search_after for the next page; None on the last one
    took_ms: float
    timings_ms: dict[str, float]
    degraded: list[str] = Field(default_factory=list)
    reranked: int = 0  # how many of the candidates the reranker scored
    facets: dict[str, list[ValueBucket] | list[RangeBucket] | StatsResult] | None = None
    # the merchandising rules that fired, and pins not placed ({"rule", "id", "reason"}); None: none fired
    rules_report: dict[str, Any] | None = None
    query_id: str | None = None  # names this search in events (POST /v1/events)
    experiment: str | None = None  # the A/B experiment this search was exposed to, and its variant
    variant: str | None = None
    # the set `facets` counted (the proxy's aggregations count over it too); not serialised
    _match: Any = PrivateAttr(default=None)
