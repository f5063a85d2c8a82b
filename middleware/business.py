"""Business score: relevance first, then sales and stock. Pure functions over Candidates."""

from __future__ import annotations

import math
from collections.abc import Sequence

from middleware.config import BusinessSettings
from middleware.products import Candidate


def relevance(candidates: Sequence[Candidate]) -> list[float]:
    """Relevance on a 0–1 scale: the reranker's probability when present, else the fused score
    divided by the best fused score of the group (RRF scores are ~0.03; they must not be drowned
    by the sales term)."""
    best_fused = max((c.fused or 0.0 for c in candidates), default=0.0)
    out = []
    for cand in candidates:
        if cand.rerank is not None:
            out.append(cand.rerank)
        elif best_fused > 0:
            out.append((cand.fused or 0.0) / best_fused)
        else:
            out.append(0.0)
    return out


def apply(candidates: Sequence[Candidate], weights: BusinessSettings) -> list[Candidate]:
    """Score and sort: final = w_relevance·relevance + w_sales·sales_term + w_stock·in_stock.

    sales_term = log1p(sales) / log1p(max sales among these candidates), so it lies in [0, 1]
    whatever the shop's volumes. Out-of-stock items lose the stock bonus ("demote") or are
    dropped ("filter"). Ties keep the incoming order.
    """
    kept = [c for c in candidates if weights.out_of_stock != "filter" or c.product is None or c.product.in_stock]
    max_sales = max((c.product.sales for c in kept if c.product is not None), default=0)
    sales_scale = math.log1p(max_sales) if max_sales > 0 else 1.0
    for cand, rel in zip(kept, relevance(kept), strict=True):
        product = cand.product
        sales_term = math.log1p(product.sales) / sales_scale if product is not None else 0.0
        stock_term = 1.0 if product is None or product.in_stock else 0.0
        cand.business = weights.w_sales * sales_term + weights.w_stock * stock_term
        cand.final = weights.w_relevance * rel + cand.business
    order = {c.id: i for i, c in enumerate(kept)}
    return sorted(kept, key=lambda c: (-(c.final or 0.0), order[c.id]))
