"""Request and response models of the query path (library, REST API and CLI share them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from middleware.config import BusinessSettings
from middleware.products import MAX_QUERY_CHARS, Filters

Stage = Literal["embed", "bm25", "knn", "hybrid", "rerank", "business"]


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
    retrieve_n: int | None = Field(None, ge=1, le=10_000)
    rerank: bool = True
    rerank_k: int | None = Field(None, ge=0, le=10_000)
    business: BusinessSettings | None = None  # None: the configured weights; see business_enabled
    business_enabled: bool = True
    explain: bool = False
    deadline_ms: float | None = Field(None, gt=0, le=600_000)
    # paging and order: [{"price": "asc"}] on price, sales, stock or _score; search_after: a response's next_cursor
    sort: list[str | dict[str, Any]] | None = Field(None, max_length=8)
    search_after: str | None = Field(None, max_length=1000)
    track_total_hits: bool | int = Field(10_000, ge=0)  # True: count exactly; N: count up to N (then "gte")


class Explanation(BaseModel):
    bm25: float | None = None
    knn: float | None = None
    fused: float | None = None
    rerank: float | None = None
    business: float | None = None
    final: float | None = None
    ranks: dict[str, int] = Field(default_factory=dict)
    knn_floor: float | None = None  # the similarity a vector hit had to reach to match


class Hit(BaseModel):
    id: str
    score: float
    product: dict[str, Any]
    explain: Explanation | None = None


class SearchResponse(BaseModel):
    hits: list[Hit]
    total: int  # products that match (lexically under the filters, or vector hits above the floor)
    relation: Literal["eq", "gte"] = "eq"  # "gte": counted up to track_total_hits
    next_cursor: str | None = None  # search_after for the next page; None on the last one
    took_ms: float
    timings_ms: dict[str, float]
    degraded: list[str] = Field(default_factory=list)
    reranked: int = 0  # how many of the candidates the reranker scored
