"""Business score: relevance first, then sales and stock. Pure functions over Candidates.

final = relevance + sales_bonus - stock_penalty, where

- relevance lies on a 0–1 scale and never contradicts the incoming (fused or reranked) order;
- sales_bonus = margin · w_sales · log1p(sales + prior) / log1p(max sales + prior), in [0, margin]:
  it can only reorder products whose relevance differs by less than the margin;
- stock_penalty = out_of_stock_penalty · margin for a product out of stock ("demote"), 0 otherwise:
  at two margins or more, an out-of-stock product falls below every in-stock product of comparable
  relevance whatever the sales.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from middleware.config import BusinessSettings
from middleware.products import Candidate


def relevance(candidates: Sequence[Candidate]) -> list[float]:
    """Each candidate's relevance on a 0–1 scale, in the incoming order.

    - All reranked: the reranker's probability (the sigmoid of its logit), which is their order.
    - Otherwise the retrievals' own scores, normalised per query: each retrieval's score divided by
      that retrieval's best score among these candidates (a candidate one retrieval did not return
      gets the lowest score it returned: at most that), averaged over the retrievals present. Rank
      fusion (RRF) keeps no magnitudes, so the fused score itself cannot tell a close second from a
      distant one; the raw scores can.
    - Neither (server-side fusion gives fused scores only): the fused score over the best one.

    The scale then follows the incoming order (a running minimum): relevance never places a product
    above one the fusion or the reranker put before it, so equal signals leave the order unchanged.
    """
    if not candidates:
        return []
    if all(c.rerank is not None for c in candidates):
        raw = [min(1.0, max(0.0, float(c.rerank or 0.0))) for c in candidates]
    else:
        raw = _retrieval_scale(candidates)
    out: list[float] = []
    floor = 1.0
    for value in raw:
        floor = min(floor, value)
        out.append(floor)
    return out


def _retrieval_scale(candidates: Sequence[Candidate]) -> list[float]:
    columns: list[list[float]] = []
    for name in ("bm25", "knn"):
        values = [getattr(c, name) for c in candidates]
        present = [max(0.0, float(v)) for v in values if v is not None]
        best = max(present, default=0.0)
        if best <= 0.0:
            continue
        lowest = min(present)
        columns.append([(max(0.0, float(v)) if v is not None else lowest) / best for v in values])
    if columns:
        return [sum(col[i] for col in columns) / len(columns) for i in range(len(candidates))]
    best_fused = max((c.fused or 0.0 for c in candidates), default=0.0)
    if best_fused <= 0.0:
        return [0.0] * len(candidates)
    return [max(0.0, c.fused or 0.0) / best_fused for c in candidates]


def sales_terms(candidates: Sequence[Candidate], weights: BusinessSettings) -> list[float]:
    """log1p(sales + prior) / log1p(max sales + prior) in [0, 1]; 0 for a candidate without a product.

    The prior (pseudo-sales added to every product) smooths small counts: 3 sales against 0 is noise,
    and a new product keeps most of a best-seller's term instead of none.
    """
    prior = weights.sales_prior
    top = max((c.product.sales for c in candidates if c.product is not None), default=0)
    scale = math.log1p(top + prior)
    if scale <= 0.0:  # no sales and no prior: nothing to tell apart
        return [0.0] * len(candidates)
    return [math.log1p(c.product.sales + prior) / scale if c.product is not None else 0.0 for c in candidates]


def apply(candidates: Sequence[Candidate], weights: BusinessSettings) -> list[Candidate]:
    """Score and sort: final = relevance + sales_bonus - stock_penalty (see the module docstring).

    Out-of-stock products are demoted by the penalty ("demote") or dropped ("filter"); products
    whose stock is not tracked count as in stock. Ties keep the incoming order.
    """
    kept = [c for c in candidates if weights.out_of_stock != "filter" or c.product is None or c.product.in_stock]
    band = weights.margin * weights.w_sales
    penalty = weights.margin * weights.out_of_stock_penalty
    for cand, rel, term in zip(kept, relevance(kept), sales_terms(kept, weights), strict=True):
        in_stock = cand.product is None or cand.product.in_stock
        cand.relevance = rel
        cand.sales_bonus = band * term
        cand.stock_penalty = 0.0 if in_stock else penalty
        cand.business = cand.sales_bonus - cand.stock_penalty
        cand.final = rel + cand.business
    order = {id(c): i for i, c in enumerate(kept)}
    return sorted(kept, key=lambda c: (-(c.final or 0.0), order[id(c)]))
