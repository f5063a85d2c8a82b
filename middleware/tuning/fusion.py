"""Fusion tuning: retrieve once per query, fuse in memory under every candidate configuration, score.

`capture` asks the store for each query's lexical and vector lists exactly as the pipeline does (the
query expanded for BM25, the kNN floor threshold of the configured embedder recorded beside the raw
vector list). `FusionConfig` is one point of the grid: RRF (k, optionally weighted per list) or min-max
(weights), with or without the kNN floor. `fuse_ranking` runs the product's own `middleware.fusion`
functions; `FastScorer` computes the same rankings with arrays, for grids of thousands of fusions, and
is checked against `fuse_ranking`. `tune` splits the queries by query into dev and held-out (seeded),
picks the best configuration on dev and reports it against the current one on held-out, paired.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from middleware import fusion
from middleware.products import Candidate

Method = Literal["rrf", "minmax"]
RRF_KS: tuple[int, ...] = (1, 5, 10, 20, 40, 60, 100)
# share of the fused score given to BM25: RRF list weights (2s, 2(1-s)) (0.5: plain RRF); min-max (s, 1-s)
RRF_BM25_SHARES: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MINMAX_BM25_WEIGHTS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class FusionConfig:
    method: Method
    rrf_k: int = 60
    bm25_weight: float = 1.0
    knn_weight: float = 1.0
    knn_floor: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("rrf", "minmax"):
            raise ValueError(f"fusion method must be rrf or minmax, got {self.method!r}")
        if self.rrf_k < 1:
            raise ValueError(f"rrf_k must be >= 1, got {self.rrf_k}")
        if self.bm25_weight < 0 or self.knn_weight < 0:
            raise ValueError("fusion weights must be >= 0")

    @property
    def weighted_rrf(self) -> bool:
        return self.method == "rrf" and self.bm25_weight != self.knn_weight

    @property
    def label(self) -> str:
        floor = "" if self.knn_floor else " no-floor"
        if self.method == "rrf":
            weights = f" w={self.bm25_weight:g}/{self.knn_weight:g}" if self.weighted_rrf else ""
            return f"rrf k={self.rrf_k}{weights}{floor}"
        return f"minmax {self.bm25_weight:g}/{self.knn_weight:g}{floor}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


def default_grid(*, floors: Sequence[bool] = (True, False), weighted_rrf: bool = True) -> list[FusionConfig]:
    """RRF over `RRF_KS` (plain, and weighted by BM25 share), min-max over `MINMAX_BM25_WEIGHTS`."""
    grid: list[FusionConfig] = []
    for floor in floors:
        for k in RRF_KS:
            for share in RRF_BM25_SHARES if weighted_rrf else (0.5,):
                bm25_w, knn_w = round(2 * share, 2), round(2 * (1 - share), 2)
                grid.append(FusionConfig("rrf", rrf_k=k, bm25_weight=bm25_w, knn_weight=knn_w, knn_floor=floor))
        for w in MINMAX_BM25_WEIGHTS:
            grid.append(FusionConfig("minmax", bm25_weight=w, knn_weight=round(1 - w, 1), knn_floor=floor))
    return grid


# ------------------------------------------------------------------------------------------ capture


@dataclass
class QueryLists:
    """One query's raw retrievals: (id, score) in rank order, and the kNN floor's score threshold."""

    bm25: list[tuple[str, float]] = field(default_factory=list)
    knn: list[tuple[str, float]] = field(default_factory=list)
    knn_threshold: float | None = None

    def lists(self, floor: bool) -> dict[str, list[Candidate]]:
        """The candidate lists the pipeline fuses (the vector list above the floor when `floor`)."""
        out: dict[str, list[Candidate]] = {}
        if self.bm25:
            out["bm25"] = [Candidate(id=i, bm25=s) for i, s in self.bm25]
        knn = self.knn
        if floor and self.knn_threshold is not None:
            knn = [(i, s) for i, s in knn if s >= self.knn_threshold]
        if knn:
            out["knn"] = [Candidate(id=i, knn=s) for i, s in knn]
        return out


def capture(
    pipeline: Any,
    queries: Mapping[str, str],
    *,
    n: int,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, QueryLists]:
    """Each query's BM25 list (the expanded text, as the pipeline sends it) and kNN list (top `n`,
    unfloored, with the floor threshold the pipeline would apply). `pipeline` gives the backend, the
    embedder, the query expander and the floor settings."""
    from middleware import paging

    backend = pipeline.backend
    embedder = pipeline.embedder
    settings = pipeline.settings
    floor = paging.knn_floor(settings.knn_floor, settings.embedder)
    scale = paging.knn_score_scale(backend)
    out: dict[str, QueryLists] = {}
    ids = list(queries)
    limit = settings.max_query_chars
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        texts = [queries[q].strip()[:limit] for q in batch]
        vectors = np.asarray(embedder.encode_queries(texts), np.float32) if embedder is not None else None
        for row, (qid, text) in enumerate(zip(batch, texts, strict=True)):
            lists = QueryLists()
            lexical = pipeline.expander.expand(text)
            lists.bm25 = [(c.id, float(c.bm25)) for c in backend.bm25(lexical, None, n) if c.bm25 is not None]
            if vectors is not None:
                hits = backend.knn(vectors[row], None, n)
                lists.knn = [(c.id, float(c.knn)) for c in hits if c.knn is not None]
                _, lists.knn_threshold = paging.above_floor(hits, floor, scale)
            out[qid] = lists
        if progress is not None:
            progress(min(start + batch_size, len(ids)), len(ids))
    return out


def save_captured(captured: Mapping[str, QueryLists], path: str | Path) -> None:
    rows = {q: {"bm25": v.bm25, "knn": v.knn, "knn_threshold": v.knn_threshold} for q, v in captured.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows), encoding="utf-8")


def load_captured(path: str | Path) -> dict[str, QueryLists]:
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    return {
        q: QueryLists(
            bm25=[(str(i), float(s)) for i, s in v["bm25"]],
            knn=[(str(i), float(s)) for i, s in v["knn"]],
            knn_threshold=v["knn_threshold"],
        )
        for q, v in rows.items()
    }


# ------------------------------------------------------------------------------------------ fusing


def fuse_ranking(lists: QueryLists, config: FusionConfig, depth: int) -> list[str]:
    """The top `depth` ids of the product's own fusion functions under `config`."""
    candidates = lists.lists(config.knn_floor)
    if config.method == "rrf":
        weights = {"bm25": config.bm25_weight, "knn": config.knn_weight} if config.weighted_rrf else None
        fused = fusion.rrf(candidates, k=config.rrf_k, weights=weights)
    else:
        fused = fusion.minmax(candidates, {"bm25": config.bm25_weight, "knn": config.knn_weight})
    return [c.id for c in fused[:depth]]


class _QueryArrays:
    """One query's lists over the union of their ids, ordered by id (the fusion tie-break)."""

    __slots__ = ("bm25_norm", "bm25_rank", "ids", "knn_norm", "knn_norm_floor", "knn_rank", "knn_rank_floor")

    def __init__(self, lists: QueryLists) -> None:
        bm25 = _first(lists.bm25)
        knn = _first(lists.knn)
        ids = sorted(set(bm25) | set(knn))
        self.ids = np.asarray(ids, dtype=object)
        self.bm25_rank, self.bm25_norm = _rank_norm(ids, bm25)
        self.knn_rank, self.knn_norm = _rank_norm(ids, knn)
        threshold = lists.knn_threshold
        kept = {i: (r, s) for i, (r, s) in knn.items() if threshold is None or s >= threshold}
        # ranks in the floored list: the kept hits keep their order, so their ranks close up
        order = sorted(kept, key=lambda i: kept[i][0])
        renumbered = {i: (rank, kept[i][1]) for rank, i in enumerate(order, start=1)}
        self.knn_rank_floor, self.knn_norm_floor = _rank_norm(ids, renumbered)


def _first(items: Sequence[tuple[str, float]]) -> dict[str, tuple[int, float]]:
    """id -> (1-based rank, score) at its first (best) rank, as `fusion._merge` keeps it."""
    out: dict[str, tuple[int, float]] = {}
    for rank, (doc_id, score) in enumerate(items, start=1):
        out.setdefault(doc_id, (rank, score))
    return out


def _rank_norm(ids: Sequence[str], found: Mapping[str, tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Ranks (inf where absent) and min-max normalised scores (0 where absent) aligned with `ids`."""
    ranks = np.full(len(ids), np.inf)
    norms = np.zeros(len(ids))
    if found:
        scores = [s for _, s in found.values()]
        low, high = min(scores), max(scores)
        for j, doc_id in enumerate(ids):
            hit = found.get(doc_id)
            if hit is not None:
                ranks[j] = hit[0]
                norms[j] = fusion._normalised(hit[1], low, high)
    return ranks, norms


class FastScorer:
    """nDCG@k of every query under a fusion configuration, computed with arrays (same order as
    `fuse_ranking`: fused score descending, ties by id)."""

    def __init__(
        self,
        captured: Mapping[str, QueryLists],
        qrels: Mapping[str, Mapping[str, float]],
        query_ids: Sequence[str],
        *,
        gain_mapping: str,
        k: int = 10,
    ) -> None:
        from middleware.evaluation.metrics import dcg, gain

        self.query_ids = list(query_ids)
        self.k = k
        self.arrays = [_QueryArrays(captured.get(q, QueryLists())) for q in self.query_ids]
        self.gains: list[np.ndarray] = []
        self.ideal: list[float] = []
        for q, arr in zip(self.query_ids, self.arrays, strict=True):
            judged = qrels.get(q, {})
            self.gains.append(np.asarray([gain(judged[i], gain_mapping) if i in judged else 0.0 for i in arr.ids]))
            self.ideal.append(dcg(sorted((gain(s, gain_mapping) for s in judged.values()), reverse=True)[:k]))
        self.discount = 1.0 / np.log2(np.arange(2, k + 2))

    def fused_scores(self, arr: _QueryArrays, config: FusionConfig) -> np.ndarray:
        knn_rank = arr.knn_rank_floor if config.knn_floor else arr.knn_rank
        knn_norm = arr.knn_norm_floor if config.knn_floor else arr.knn_norm
        if config.method == "rrf":
            bm25_w, knn_w = (config.bm25_weight, config.knn_weight) if config.weighted_rrf else (1.0, 1.0)
            return bm25_w / (config.rrf_k + arr.bm25_rank) + knn_w / (config.rrf_k + knn_rank)
        return config.bm25_weight * arr.bm25_norm + config.knn_weight * knn_norm

    def order(self, index: int, config: FusionConfig) -> np.ndarray:
        """Positions (into the query's id array) of the fused ranking; ids absent from every list it
        fuses (the vector-only hits under the floor) are left out."""
        arr = self.arrays[index]
        scores = self.fused_scores(arr, config)
        present = np.isfinite(arr.bm25_rank) | np.isfinite(arr.knn_rank_floor if config.knn_floor else arr.knn_rank)
        positions = np.flatnonzero(present)
        # stable sort of id-ordered positions by descending score: ties stay in id order
        return positions[np.argsort(-scores[positions], kind="stable")]

    def ranking(self, index: int, config: FusionConfig, depth: int) -> list[str]:
        return [str(x) for x in self.arrays[index].ids[self.order(index, config)[:depth]]]

    def ndcg(self, config: FusionConfig) -> np.ndarray:
        out = np.zeros(len(self.query_ids))
        for index, arr in enumerate(self.arrays):
            ideal = self.ideal[index]
            if ideal <= 0 or not len(arr.ids):
                continue
            top = self.order(index, config)[: self.k]
            out[index] = float(self.gains[index][top] @ self.discount[: len(top)]) / ideal
        return out


# ------------------------------------------------------------------------------------------ tuning


def split_queries(query_ids: Iterable[str], dev_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split by query: (dev, held_out), each sorted."""
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev fraction must be between 0 and 1 (exclusive), got {dev_fraction}")
    ids = sorted(set(query_ids))
    if len(ids) < 4:
        raise ValueError(f"tuning needs at least 4 judged queries (2 dev, 2 held-out), got {len(ids)}")
    shuffled = list(ids)
    random.Random(seed).shuffle(shuffled)
    n_dev = min(len(ids) - 2, max(2, round(dev_fraction * len(ids))))
    return sorted(shuffled[:n_dev]), sorted(shuffled[n_dev:])


def grid_scores(scorer: FastScorer, grid: Sequence[FusionConfig]) -> dict[FusionConfig, np.ndarray]:
    return {config: scorer.ndcg(config) for config in dict.fromkeys(grid)}


def best_config(
    scores: Mapping[FusionConfig, np.ndarray], positions: Sequence[int], current: FusionConfig
) -> FusionConfig:
    """The configuration with the highest mean over `positions`; the current one wins ties, then the
    grid's order (so the choice is deterministic and never a change for nothing)."""
    index = np.asarray(positions, dtype=int)
    best = current
    best_mean = float(scores[current][index].mean()) if current in scores else -1.0
    for config, values in scores.items():
        mean = float(values[index].mean())
        if mean > best_mean + 1e-12:
            best, best_mean = config, mean
    return best


def tune(
    scorer: FastScorer,
    grid: Sequence[FusionConfig],
    current: FusionConfig,
    *,
    dev_fraction: float = 0.5,
    seed: int = 0,
    n_resamples: int = 10_000,
) -> dict[str, Any]:
    """Pick on dev, report on held-out: the chosen and the current configuration, a paired test."""
    from middleware.evaluation.significance import compare

    dev, held_out = split_queries(scorer.query_ids, dev_fraction, seed)
    where = {q: i for i, q in enumerate(scorer.query_ids)}
    dev_pos = [where[q] for q in dev]
    held_pos = [where[q] for q in held_out]
    scores = grid_scores(scorer, [current, *grid])
    chosen = best_config(scores, dev_pos, current)
    held = np.asarray(held_pos, dtype=int)
    test = compare(
        f"ndcg@{scorer.k}",
        chosen.label,
        scores[chosen][held],
        current.label,
        scores[current][held],
        n_resamples=n_resamples,
        seed=seed,
    )
    ranked = sorted(scores, key=lambda c: -float(scores[c][np.asarray(dev_pos)].mean()))
    return {
        "queries": {"dev": len(dev), "held_out": len(held_out), "dev_fraction": dev_fraction, "seed": seed},
        "current": current.to_dict(),
        "chosen": chosen.to_dict(),
        "dev": {"chosen": _mean(scores[chosen], dev_pos), "current": _mean(scores[current], dev_pos)},
        "held_out": {
            "chosen": _mean(scores[chosen], held_pos),
            "current": _mean(scores[current], held_pos),
            "paired_test": test.to_dict(),
        },
        "grid": [
            {**c.to_dict(), "dev": _mean(scores[c], dev_pos), "held_out": _mean(scores[c], held_pos)} for c in ranked
        ],
    }


def _mean(values: np.ndarray, positions: Sequence[int]) -> float:
    return round(float(values[np.asarray(positions, dtype=int)].mean()), 6)


def settings_snippet(config: FusionConfig, *, fmt: Literal["env", "json"] = "env") -> str:
    """Settings that select `config`: environment lines, or the JSON of the `fusion` settings."""
    values: dict[str, Any] = {"method": config.method}
    if config.method == "rrf":
        values["rrf_k"] = config.rrf_k
        if config.weighted_rrf:
            values.update(rrf_bm25_weight=config.bm25_weight, rrf_knn_weight=config.knn_weight)
    else:
        values.update(bm25_weight=config.bm25_weight, knn_weight=config.knn_weight)
    if fmt == "json":
        body: dict[str, Any] = {"fusion": values}
        if not config.knn_floor:
            body["knn_floor"] = {"relative": 0.0, "absolute": -1.0}
        return json.dumps(body, indent=2) + "\n"
    lines = [f"SHOPSEARCH_FUSION__{name.upper()}={value}" for name, value in values.items()]
    if not config.knn_floor:
        lines += ["SHOPSEARCH_KNN_FLOOR__RELATIVE=0", "SHOPSEARCH_KNN_FLOOR__ABSOLUTE=-1"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ datasets


def current_config(settings: Any) -> FusionConfig:
    """The fusion the pipeline runs under `settings` (the kNN floor on: the pipeline always applies it)."""
    cfg = settings.fusion
    if cfg.method == "rrf":
        return FusionConfig("rrf", rrf_k=cfg.rrf_k, bm25_weight=cfg.rrf_bm25_weight, knn_weight=cfg.rrf_knn_weight)
    return FusionConfig("minmax", bm25_weight=cfg.bm25_weight, knn_weight=cfg.knn_weight)


def capture_dataset(
    dataset: Any,
    query_ids: Sequence[str],
    *,
    embedder: str,
    workdir: Path,
    pool: str = "global",
    n: int = 100,
    settings_overrides: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, QueryLists]:
    """Index a BEIR dataset's pool as `shopsearch eval` does (cached under `workdir`) and capture every
    query's lists once; the capture itself is cached there too (same data, pool, queries, model, code)."""
    import hashlib

    from middleware.backends.embedded import EmbeddedBackend
    from middleware.evaluation.pools import build_pool
    from middleware.evaluation.runner import EvalConfig, Evaluation, _analysis_version
    from middleware.pipeline import Pipeline

    evaluation = Evaluation(
        dataset, EvalConfig(modes=["hybrid-rrf"], pools=[pool], embedder=embedder, workdir=workdir, retrieve_n=n)
    )
    evaluation._load_models()
    if evaluation.embedder is None:
        raise ValueError(f"fusion tuning needs an embedder: {evaluation.skipped_modes.get('hybrid-rrf')}")
    overrides = dict(settings_overrides or {})
    settings = evaluation._settings(**overrides)
    key_text = json.dumps(
        [
            dataset.fingerprint,
            pool,
            sorted(query_ids),
            evaluation._model_key(),
            _analysis_version(),
            n,
            settings.knn_floor.model_dump(),
            settings.typo_tolerance,
        ],
        default=str,
    )
    cache = workdir / "fusion-capture" / f"{hashlib.sha1(key_text.encode()).hexdigest()[:16]}.json"
    if cache.is_file():
        if log:
            log(f"captured lists from cache {cache}")
        return load_captured(cache)
    vectors = evaluation._document_vectors()
    pool_docs = build_pool(pool, dataset.corpus, dataset.qrels, list(query_ids))
    path, dim = evaluation._open_index(pool_docs, vectors)
    pipeline = Pipeline(settings, EmbeddedBackend(path, dim=dim), evaluation.embedder)

    def progress(done: int, total: int) -> None:
        if log and (done == total or done % 512 == 0):
            log(f"{pool} pool: captured {done}/{total} queries")

    try:
        captured = capture(pipeline, {q: dataset.queries[q] for q in query_ids}, n=n, progress=progress)
    finally:
        pipeline.close()
    save_captured(captured, cache)
    return captured
