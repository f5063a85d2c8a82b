"""Request and response models of the query path (library, REST API and CLI share them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from middleware.config import BusinessSettings
from middleware.products import MAX_QUERY_CHARS, Filters

Stage = Literal["embed", "bm25", "knn", "hybrid", "rerank", "business"]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
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


class Hit(BaseModel):
    id: str
    score: float
    product: dict[str, Any]
    explain: Explanation | None = None


class SearchResponse(BaseModel):
    hits: list[Hit]
    total: int  # candidates that survived retrieval and fusion (the pageable set)
    took_ms: float
    timings_ms: dict[str, float]
    degraded: list[str] = Field(default_factory=list)
    reranked: int = 0  # how many of the candidates the reranker scored
