"""Combine ranked lists from several retrievals into one: pure functions over Candidates.

Both functions take `{name: candidates}` where each list is in that retrieval's rank order and
the candidate's score for it is `getattr(candidate, name)` (e.g. "bm25", "knn"). They return new
merged Candidates sorted by `fused` descending, ties broken by id so results are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from middleware.products import Candidate


def _merge(lists: Mapping[str, Sequence[Candidate]]) -> dict[str, Candidate]:
    merged: dict[str, Candidate] = {}
    for name, candidates in lists.items():
        for rank, cand in enumerate(candidates, start=1):
            target = merged.get(cand.id)
            if target is None:
                target = Candidate(id=cand.id, product=cand.product)
                merged[cand.id] = target
            elif target.product is None:
                target.product = cand.product
            # a list may repeat an id (bad upstream): keep its best rank, and the score at that rank
            if name not in target.ranks:
                setattr(target, name, getattr(cand, name))
                target.ranks[name] = rank
    return merged


def _ordered(merged: dict[str, Candidate]) -> list[Candidate]:
    return sorted(merged.values(), key=lambda c: (-(c.fused or 0.0), c.id))


def rrf(
    lists: Mapping[str, Sequence[Candidate]], k: int = 60, weights: Mapping[str, float] | None = None
) -> list[Candidate]:
    """Reciprocal rank fusion: fused = Σ w / (k + rank), w = 1 per list unless `weights` says otherwise.
    Scale-free, so BM25 and cosine mix safely."""
    if k < 1:
        raise ValueError("rrf k must be >= 1")
    weights = dict(weights or {})
    for name, weight in weights.items():
        if not weight >= 0:
            raise ValueError(f"fusion weight for {name!r} must be >= 0")
    merged = _merge(lists)
    for cand in merged.values():
        cand.fused = sum(weights.get(name, 1.0) / (k + rank) for name, rank in cand.ranks.items())
    return _ordered(merged)


def minmax(lists: Mapping[str, Sequence[Candidate]], weights: Mapping[str, float] | None = None) -> list[Candidate]:
    """Weighted sum of per-list min-max normalised scores; a candidate absent from a list gets 0 there.

    A list whose scores are all equal normalises to 1 for every member (they are all its best),
    so a single-candidate list still counts fully.
    """
    weights = dict(weights or {})
    merged = _merge(lists)
    for name, candidates in lists.items():
        weight = weights.get(name, 1.0)
        if weight < 0:
            raise ValueError(f"fusion weight for {name!r} must be >= 0")
        firsts: dict[str, float] = {}  # a repeated id counts once, at its best rank (as in _merge)
        seen: set[str] = set()
        for cand in candidates:
            raw = getattr(cand, name)
            if cand.id not in seen and raw is not None:
                firsts[cand.id] = raw
            seen.add(cand.id)
        if not firsts:
            continue
        low, high = min(firsts.values()), max(firsts.values())
        for cand_id, raw in firsts.items():
            norm = _normalised(raw, low, high)
            target = merged[cand_id]
            target.fused = (target.fused or 0.0) + weight * norm
    for cand in merged.values():
        if cand.fused is None:
            cand.fused = 0.0
    return _ordered(merged)


def _normalised(raw: float, low: float, high: float) -> float:
    """(raw - low) / (high - low) in [0, 1]; 1 when all scores are equal. Halved first when the
    span overflows a float (extreme scores from a bad upstream), so the result is never NaN."""
    if high <= low:
        return 1.0
    span = high - low
    if math.isfinite(span):
        return min(1.0, max(0.0, (raw - low) / span))
    return min(1.0, max(0.0, (raw / 2 - low / 2) / (high / 2 - low / 2)))
