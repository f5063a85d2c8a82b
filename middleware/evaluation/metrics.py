"""Ranking metrics as pure functions over one query's ranked ids and judgments.

Definitions (the same for every mode and pool):
- relevant = judged documents with score >= relevant_min; queries with none are skipped and counted.
- recall@k = |relevant ∩ top-k| / |relevant|.
- MRR@k = 1 / rank of the first relevant document within the top k, else 0.
- nDCG@k = DCG@k / IDCG@k with DCG = Σ gain(score_i) / log2(i + 1) (i from 1); unjudged documents gain 0;
  the ideal ranking orders all judged documents by gain. Gains below zero are clamped to 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

GAIN_MAPPINGS: dict[str, Callable[[float], float]] = {
    "score": lambda s: s,  # pytrec_eval / BEIR: binary 0/1 labels, 0/1/2 scales (qbqtc, TREC)
    "score-1": lambda s: s - 1.0,  # 1–3 scales (homedepot): 1 = irrelevant gains nothing
    "exp2": lambda s: 2.0**s - 1.0,  # the Burges et al. exponential gain
}

DEFAULT_GAIN = "score"
# share of evaluated queries whose judged documents all gain nothing above which the mapping is
# probably wrong for the labels (e.g. score-1 on binary labels makes every nDCG 0)
ZERO_GAIN_WARN_SHARE = 0.5

RECALL_KS: tuple[int, ...] = (1, 5, 10, 100)
MRR_KS: tuple[int, ...] = (1, 5, 10)
NDCG_K = 10
METRIC_NAMES: tuple[str, ...] = (
    *(f"recall@{k}" for k in RECALL_KS),
    *(f"mrr@{k}" for k in MRR_KS),
    f"ndcg@{NDCG_K}",
)
DEPTH = max(*RECALL_KS, *MRR_KS, NDCG_K)  # how many results each query needs


def gain(score: float, mapping: str) -> float:
    try:
        fn = GAIN_MAPPINGS[mapping]
    except KeyError:
        raise ValueError(f"unknown gain mapping {mapping!r}; choose one of {', '.join(GAIN_MAPPINGS)}") from None
    return max(0.0, fn(score))


def zero_gain_queries(qrels: Mapping[str, Mapping[str, float]], query_ids: Iterable[str], mapping: str) -> list[str]:
    """Queries (of `query_ids`) whose every judged document has gain 0 under `mapping`: nDCG is 0 for them."""
    return [qid for qid in query_ids if all(gain(score, mapping) <= 0.0 for score in qrels.get(qid, {}).values())]


def zero_gain_warning(qrels: Mapping[str, Mapping[str, float]], query_ids: Sequence[str], mapping: str) -> str | None:
    """A one-line warning when most queries can only score nDCG 0 under `mapping`, else None."""
    if not query_ids:
        return None
    zero = zero_gain_queries(qrels, query_ids, mapping)
    if len(zero) <= ZERO_GAIN_WARN_SHARE * len(query_ids):
        return None
    grades = sorted({score for qid in query_ids for score in qrels.get(qid, {}).values()})
    shown = ", ".join(f"{g:g}" for g in grades[:6]) + (", …" if len(grades) > 6 else "")
    return (
        f"gain {mapping!r} gives every judged document of {len(zero)} of {len(query_ids)} queries zero gain "
        f"(grades seen: {shown}), so their nDCG is 0; binary or 0-based labels want --gain score"
    )


def rank_by_score(scores: Mapping[str, float] | Iterable[tuple[str, float]]) -> list[str]:
    """Ids ordered by score descending, ties broken by id ascending (stable across runs)."""
    items = scores.items() if isinstance(scores, Mapping) else scores
    return [doc_id for doc_id, _ in sorted(items, key=lambda item: (-item[1], item[0]))]


def relevant_ids(judged: Mapping[str, float], relevant_min: float) -> set[str]:
    return {doc_id for doc_id, score in judged.items() if score >= relevant_min}


def _check_unique(ranking: Sequence[str]) -> None:
    if len(set(ranking)) != len(ranking):
        raise ValueError("ranking lists a document more than once")


def recall_at_k(ranking: Sequence[str], relevant: set[str], k: int) -> float:
    if not relevant:
        raise ValueError("recall is undefined without relevant documents")
    _check_unique(ranking)
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def mrr_at_k(ranking: Sequence[str], relevant: set[str], k: int) -> float:
    for position, doc_id in enumerate(ranking[:k], start=1):
        if doc_id in relevant:
            return 1.0 / position
    return 0.0


def dcg(gains: Sequence[float]) -> float:
    return sum(g / math.log2(i + 1) for i, g in enumerate(gains, start=1))


def ndcg_at_k(ranking: Sequence[str], judged: Mapping[str, float], k: int, mapping: str) -> float:
    """Graded nDCG; 0.0 when no judged document has a positive gain (nothing to find)."""
    _check_unique(ranking)
    gains = {doc_id: gain(score, mapping) for doc_id, score in judged.items()}
    ideal = dcg(sorted(gains.values(), reverse=True)[:k])
    if ideal <= 0.0:
        return 0.0
    return dcg([gains.get(doc_id, 0.0) for doc_id in ranking[:k]]) / ideal


def query_metrics(
    ranking: Sequence[str], judged: Mapping[str, float], relevant_min: float, mapping: str
) -> dict[str, float]:
    """Every metric of METRIC_NAMES for one query (which must have a relevant document)."""
    relevant = relevant_ids(judged, relevant_min)
    out = {f"recall@{k}": recall_at_k(ranking, relevant, k) for k in RECALL_KS}
    out.update({f"mrr@{k}": mrr_at_k(ranking, relevant, k) for k in MRR_KS})
    out[f"ndcg@{NDCG_K}"] = ndcg_at_k(ranking, judged, NDCG_K, mapping)
    return out


@dataclass
class RunEvaluation:
    """Metrics of one mode on one pool: per query (for significance tests) and means."""

    query_ids: list[str]  # evaluated queries, sorted: the order of every per-query array
    per_query: dict[str, np.ndarray]  # metric -> values aligned with query_ids
    skipped_no_relevant: list[str] = field(default_factory=list)

    @property
    def means(self) -> dict[str, float]:
        return {m: float(v.mean()) if v.size else float("nan") for m, v in self.per_query.items()}


def evaluable_queries(
    query_ids: Iterable[str], qrels: Mapping[str, Mapping[str, float]], relevant_min: float
) -> tuple[list[str], list[str]]:
    """(queries with at least one relevant judgment, queries skipped for having none), both sorted."""
    kept, skipped = [], []
    for qid in sorted(query_ids):
        (kept if relevant_ids(qrels.get(qid, {}), relevant_min) else skipped).append(qid)
    return kept, skipped


def evaluate_run(
    run: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, float]],
    query_ids: Iterable[str],
    *,
    relevant_min: float,
    gain_mapping: str,
) -> RunEvaluation:
    """Score a run (query id -> ranked doc ids). A query missing from the run counts as an empty ranking."""
    gain(1.0, gain_mapping)  # validate the mapping name before the loop
    kept, skipped = evaluable_queries(query_ids, qrels, relevant_min)
    values: dict[str, list[float]] = {m: [] for m in METRIC_NAMES}
    for qid in kept:
        try:
            scores = query_metrics(run.get(qid, ()), qrels[qid], relevant_min, gain_mapping)
        except ValueError as err:
            raise ValueError(f"query {qid}: {err}") from None
        for name, value in scores.items():
            values[name].append(value)
    per_query = {m: np.asarray(v, dtype=np.float64) for m, v in values.items()}
    return RunEvaluation(query_ids=kept, per_query=per_query, skipped_no_relevant=skipped)
