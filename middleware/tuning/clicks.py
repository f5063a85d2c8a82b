"""Training pairs from shoppers' behaviour: served searches and their events → FlagEmbedding pairs.

Input: the learning loop's `QueryRecord`s (what was served, in order) and `Event`s (impression,
click, add_to_cart, purchase). Searches are grouped by query text (NFKC, case-folded, whitespace
collapsed); filters are ignored. A product's evidence for a query is counted per served search:
shown (it was in `hit_ids`), engaged (the strongest of its actions there, weighted by
`action_weights`: a purchase counts more than a click), skipped (shown above the deepest engaged
product of that search and not engaged itself — under a top-down scan it was looked at and passed
over).

Position bias. A product shown at position 1 is clicked more than the same product at position 8
because more shoppers look at position 1. Each position p gets a propensity θ_p (the chance a
shopper examines it, relative to position 1), estimated from the log itself: harvested from products
shown for the same query at adjacent positions where the log has them (below), else the
click-through rate at p over that at position 1; made non-increasing with depth. Corrections:
- `ipw` (default): relevance = mean over impressions of weight · 1[engaged] / θ_p, i.e. clicks
  counted with inverse-propensity weights (θ floored at `propensity_floor` to bound the variance);
- `coec`: clicks over expected clicks, Σ weight · engaged / Σ CTR_p over the impressions (1.0 = as
  many as an average product at those positions gets; the label is coec / (1 + coec));
- `none`: the raw weighted click-through rate (the uncorrected baseline).
Negatives are skip-above products (`skip_above=True`: skipped at least `min_skips` times, never
engaged); without it every shown, never-engaged product is a negative, including those below the
last click that nobody looked at.

Caveat on the propensities: without randomised rankings, position and relevance are confounded —
the top slots also hold the better products — so CTR_p / CTR_1 overstates how fast examination
decays, and the correction over-credits deep clicks. It is the randomisation-free estimate of
clicks-over-expected-clicks. `propensities="harvest"` (the default) removes the confound where the
log allows: the same product shown for the same query at adjacent positions k and k+1 (ranker
versions, A/B variants, randomised swaps of a small share of traffic) gives θ_{k+1} / θ_k as the
ratio of its click-through rates there (intervention harvesting); steps without such evidence fall
back to the CTR ratio.

Untrusted input is skipped and counted, never used: events naming a query_id no served search has,
events for a product that search did not serve, duplicate query_ids, products missing from the
catalog. An event's own `position` is checked against the served one (the served one is used).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from middleware.events.model import Event, QueryRecord
from middleware.tuning.data import TuningDataError, normalise_text

Correction = Literal["ipw", "coec", "none"]
CORRECTIONS: tuple[str, ...] = ("ipw", "coec", "none")
PropensityMethod = Literal["ctr", "harvest"]
PROPENSITY_METHODS: tuple[str, ...] = ("ctr", "harvest")
DEFAULT_ACTION_WEIGHTS: dict[str, float] = {"click": 1.0, "add_to_cart": 2.0, "purchase": 3.0}
# the corrected score a product needs to be a positive, by correction (ipw/none: a click-through
# rate; coec: a ratio to the expected clicks)
DEFAULT_POSITIVE_MIN: dict[str, float] = {"ipw": 0.1, "coec": 1.0, "none": 0.1}


@dataclass
class ClickPairsConfig:
    correction: Correction = "ipw"
    propensities: PropensityMethod = "harvest"
    skip_above: bool = True
    min_query_searches: int = 3  # served searches of a query text before any pair is drawn from it
    min_impressions: int = 3  # times a product was shown for a query before it is a positive or negative
    min_skips: int = 2  # skip-above negatives: times skipped (and never engaged)
    min_clicks: int = 1  # positives: searches in which the product was engaged
    positive_min: float | None = None  # None: DEFAULT_POSITIVE_MIN[correction]
    propensity_floor: float = 0.05  # θ_p below this is raised to it (bounds IPW weights at 1/floor)
    min_position_impressions: int = 20  # positions shown fewer times inherit the propensity above them
    max_negatives: int = 30  # per query, the most-skipped first
    action_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_ACTION_WEIGHTS))

    def __post_init__(self) -> None:
        if self.correction not in CORRECTIONS:
            raise TuningDataError(f"--correction must be one of {', '.join(CORRECTIONS)}, got {self.correction!r}")
        if self.propensities not in PROPENSITY_METHODS:
            methods = ", ".join(PROPENSITY_METHODS)
            raise TuningDataError(f"--propensities must be one of {methods}, got {self.propensities!r}")
        for name in ("min_query_searches", "min_impressions", "min_skips", "min_clicks", "min_position_impressions"):
            if getattr(self, name) < 1:
                raise TuningDataError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if self.max_negatives < 0:
            raise TuningDataError(f"--max-negatives must be ≥ 0, got {self.max_negatives}")
        if not 0.0 < self.propensity_floor <= 1.0:
            raise TuningDataError(f"--propensity-floor must be in (0, 1], got {self.propensity_floor}")
        if self.positive_min is not None and self.positive_min <= 0:
            raise TuningDataError(f"--positive-min must be > 0, got {self.positive_min}")
        for action in ("click", "add_to_cart", "purchase"):
            weight = self.action_weights.get(action)
            if weight is None or weight <= 0:
                raise TuningDataError(f"action weight for {action!r} must be > 0, got {weight}")

    @property
    def positive_threshold(self) -> float:
        return self.positive_min if self.positive_min is not None else DEFAULT_POSITIVE_MIN[self.correction]


@dataclass
class ClickStats:
    searches: int = 0  # query records read
    events: int = 0  # events read
    browse_searches: int = 0  # records with an empty query (category pages): not pairs material
    untrusted: dict[str, int] = field(
        default_factory=lambda: {
            "unknown_query_id": 0,
            "object_not_served": 0,
            "duplicate_query_id": 0,
            "not_in_catalog": 0,
        }
    )
    position_mismatch: int = 0  # events whose position disagreed with the served one (served used)
    impression_events: int = 0  # checked for trust; the served page is the impression list
    queries: int = 0  # distinct query texts
    queries_below_evidence: int = 0  # fewer than min_query_searches served searches
    queries_without_positive: int = 0
    records: int = 0  # pairs records written
    positives: int = 0
    negatives: int = 0
    judged: int = 0  # engaged but below the positive threshold (graded, never negatives)
    products_below_evidence: int = 0  # (query, product) shown fewer than min_impressions times
    ctr_by_position: dict[int, float] = field(default_factory=dict)
    impressions_by_position: dict[int, int] = field(default_factory=dict)
    propensities: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Evidence:
    impressions: int = 0
    engaged: int = 0  # searches where it got any action
    weight: float = 0.0  # Σ action weight over engaged searches
    skips: int = 0
    positions: Counter[int] = field(default_factory=Counter)  # position -> impressions
    engaged_at: list[tuple[int, float]] = field(default_factory=list)  # (position, weight) per engaged search


@dataclass
class _Query:
    text: Counter[str] = field(default_factory=Counter)  # raw spellings, the most common is written
    searches: int = 0
    products: dict[str, _Evidence] = field(default_factory=dict)


def query_key_id(key: str) -> str:
    """A stable id for a normalised query text (the pairs' `query_id`)."""
    return "q" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]


def click_pairs(
    records: Iterable[QueryRecord],
    events: Iterable[Event],
    catalog: Mapping[str, str],
    config: ClickPairsConfig | None = None,
) -> tuple[list[dict[str, Any]], ClickStats]:
    """Pairs records (FlagEmbedding JSONL shape with query_id, pos_ids, pos_labels, neg_ids, judged*)
    from served searches and their events; `catalog` maps product id → the product's text
    (Product.embedding_text). Returns the records (sorted by query_id) and what was counted."""
    config = config or ClickPairsConfig()
    stats = ClickStats()
    served: dict[str, tuple[str, dict[str, int]]] = {}  # query_id -> (query key, product -> position)
    queries: dict[str, _Query] = {}
    for record in records:
        stats.searches += 1
        if record.query_id in served:
            stats.untrusted["duplicate_query_id"] += 1
            continue
        key = normalise_text(record.query)
        positions: dict[str, int] = {}
        for index, object_id in enumerate(record.hit_ids):
            positions.setdefault(object_id, record.from_ + index + 1)
        served[record.query_id] = (key, positions)
        if not key:
            stats.browse_searches += 1
            continue
        query = queries.setdefault(key, _Query())
        query.text[record.query.strip()] += 1
        query.searches += 1

    # the strongest action per (search, product); untrusted events counted and dropped
    engaged: dict[str, dict[str, float]] = {}
    for event in events:
        stats.events += 1
        found = served.get(event.query_id)
        if found is None:
            stats.untrusted["unknown_query_id"] += 1
            continue
        key, positions = found
        position = positions.get(event.object_id)
        if position is None:
            stats.untrusted["object_not_served"] += 1
            continue
        if event.position is not None and event.position != position:
            stats.position_mismatch += 1
        if event.action == "impression":
            stats.impression_events += 1
            continue
        if not key:
            continue
        weight = config.action_weights[event.action]
        per_search = engaged.setdefault(event.query_id, {})
        per_search[event.object_id] = max(per_search.get(event.object_id, 0.0), weight)

    missing: set[str] = set()
    shown_at: Counter[int] = Counter()
    clicked_at: Counter[int] = Counter()
    for query_id, (key, positions) in served.items():
        if not key:
            continue
        query = queries[key]
        actions = engaged.get(query_id, {})
        deepest = max((positions[o] for o in actions), default=0)
        for object_id, position in positions.items():
            if object_id not in catalog:
                missing.add(object_id)
                continue
            evidence = query.products.setdefault(object_id, _Evidence())
            evidence.impressions += 1
            evidence.positions[position] += 1
            shown_at[position] += 1
            weight = actions.get(object_id)
            if weight is not None:
                evidence.engaged += 1
                evidence.weight += weight
                evidence.engaged_at.append((position, weight))
                clicked_at[position] += 1
            elif position < deepest:
                evidence.skips += 1
    # an event for a product the catalog lacks is as unusable as the product itself
    stats.untrusted["not_in_catalog"] = len(missing)

    ctr = {p: clicked_at[p] / shown_at[p] for p in sorted(shown_at)}
    stats.ctr_by_position = {p: round(v, 6) for p, v in ctr.items()}
    stats.impressions_by_position = dict(sorted(shown_at.items()))
    if config.propensities == "harvest":
        evidence = [e for query in queries.values() for e in query.products.values()]
        theta = harvest_propensities(evidence, ctr, shown_at, config)
    else:
        theta = estimate_propensities(ctr, shown_at, config)
    stats.propensities = {p: round(v, 6) for p, v in theta.items()}
    stats.queries = len(queries)

    out: list[dict[str, Any]] = []
    threshold = config.positive_threshold
    for key, query in queries.items():
        if query.searches < config.min_query_searches:
            stats.queries_below_evidence += 1
            continue
        record = _query_record(key, query, catalog, theta, ctr, threshold, config, stats)
        if record is None:
            stats.queries_without_positive += 1
            continue
        out.append(record)
    out.sort(key=lambda r: r["query_id"])
    stats.records = len(out)
    return out, stats


def estimate_propensities(
    ctr: Mapping[int, float], impressions: Mapping[int, int], config: ClickPairsConfig
) -> dict[int, float]:
    """θ_p = CTR_p / CTR_1, non-increasing with depth, floored at `propensity_floor`; positions with
    fewer than `min_position_impressions` impressions (or before any click at position 1) take the
    value of the position above. Confounded with relevance without randomisation (module docstring)."""
    theta: dict[int, float] = {}
    top = ctr.get(1, 0.0) if impressions.get(1, 0) >= config.min_position_impressions else 0.0
    previous = 1.0
    for position in sorted(ctr):
        value = previous
        if top > 0 and impressions[position] >= config.min_position_impressions:
            value = min(previous, ctr[position] / top)
        value = max(value, config.propensity_floor)
        theta[position] = value
        previous = value
    return theta


def harvest_propensities(
    evidence: Iterable[_Evidence], ctr: Mapping[int, float], impressions: Mapping[int, int], config: ClickPairsConfig
) -> dict[int, float]:
    """Intervention harvesting over adjacent positions: for every (query, product) shown at both k and
    k+1, θ_{k+1} / θ_k ≈ Σ w·CTR_{k+1} / Σ w·CTR_k with w the harmonic mean of its impressions at the two
    positions. A step whose Σ w is below `min_position_impressions` takes the CTR ratio of the two
    positions instead; the result is non-increasing and floored like `estimate_propensities`."""
    up: Counter[int] = Counter()  # Σ w·CTR at k+1, by k
    down: Counter[int] = Counter()  # Σ w·CTR at k
    weight: Counter[int] = Counter()
    for item in evidence:
        if len(item.positions) < 2:
            continue
        clicks = Counter(position for position, _ in item.engaged_at)
        for k, shown in item.positions.items():
            shown_next = item.positions.get(k + 1)
            if not shown_next:
                continue
            w = shown * shown_next / (shown + shown_next)
            up[k] += w * clicks[k + 1] / shown_next
            down[k] += w * clicks[k] / shown
            weight[k] += w
    theta: dict[int, float] = {}
    previous: int | None = None
    for position in sorted(ctr):
        if previous is None:
            value = 1.0
        else:
            value = theta[previous]
            if previous == position - 1 and weight[previous] >= config.min_position_impressions and down[previous] > 0:
                value *= up[previous] / down[previous]
            elif (
                ctr[previous] > 0
                and impressions[previous] >= config.min_position_impressions
                and impressions[position] >= config.min_position_impressions
            ):
                value *= ctr[position] / ctr[previous]
            value = min(value, theta[previous])
        theta[position] = max(value, config.propensity_floor)
        previous = position
    return theta


def _score(
    evidence: _Evidence, theta: Mapping[int, float], ctr: Mapping[int, float], config: ClickPairsConfig
) -> float:
    if config.correction == "none":
        return evidence.weight / evidence.impressions
    if config.correction == "ipw":
        return sum(weight / theta[position] for position, weight in evidence.engaged_at) / evidence.impressions
    expected = sum(ctr[position] * count for position, count in evidence.positions.items())
    return evidence.weight / expected if expected > 0 else 0.0


def _label(score: float, config: ClickPairsConfig) -> float:
    if config.correction == "coec":
        return round(score / (1.0 + score), 4)
    return round(min(1.0, score), 4)


def _query_record(
    key: str,
    query: _Query,
    catalog: Mapping[str, str],
    theta: Mapping[int, float],
    ctr: Mapping[int, float],
    threshold: float,
    config: ClickPairsConfig,
    stats: ClickStats,
) -> dict[str, Any] | None:
    positives: list[tuple[float, str]] = []
    judged: list[tuple[float, str]] = []
    negatives: list[tuple[int, str]] = []
    below = 0
    for object_id, evidence in query.products.items():
        if evidence.impressions < config.min_impressions:
            below += 1
            continue
        if evidence.engaged:
            score = _score(evidence, theta, ctr, config)
            strong = score >= threshold and evidence.engaged >= config.min_clicks
            (positives if strong else judged).append((score, object_id))
        elif config.skip_above:
            if evidence.skips >= config.min_skips:
                negatives.append((evidence.skips, object_id))
        else:
            negatives.append((evidence.impressions, object_id))
    if not positives:
        return None
    stats.products_below_evidence += below
    positives.sort(key=lambda item: (-item[0], item[1]))
    judged.sort(key=lambda item: (-item[0], item[1]))
    negatives.sort(key=lambda item: (-item[0], item[1]))
    negatives = negatives[: config.max_negatives]
    stats.positives += len(positives)
    stats.negatives += len(negatives)
    stats.judged += len(judged)
    text = min(query.text.items(), key=lambda item: (-item[1], item[0]))[0]
    return {
        "query": text,
        "pos": [catalog[o] for _, o in positives],
        "neg": [catalog[o] for _, o in negatives],
        "query_id": query_key_id(key),
        "pos_ids": [o for _, o in positives],
        "pos_labels": [_label(s, config) for s, _ in positives],
        "neg_ids": [o for _, o in negatives],
        "judged": [catalog[o] for _, o in judged],
        "judged_ids": [o for _, o in judged],
        "judged_labels": [_label(s, config) for s, _ in judged],
        "searches": query.searches,
        "correction": config.correction,
    }


# ------------------------------------------------------------------------------------------- files

EXPORT_FILES: tuple[str, str] = ("queries.jsonl", "events.jsonl")


def _read_models(path: Path, model: type[QueryRecord] | type[Event]) -> list[Any]:
    from pydantic import ValidationError

    rows: list[Any] = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                rows.append(model.model_validate_json(line))
            except ValidationError as err:
                raise TuningDataError(f"{where}: {_field_error(err)}") from None
    return rows


def _field_error(err: Any) -> str:
    """`field 'name': message` of a pydantic ValidationError's first error."""
    first = err.errors()[0]
    name = ".".join(str(part) for part in first["loc"]) or "line"
    return f"field {name!r}: {first['msg']}"


def read_export(directory: str | Path) -> tuple[list[QueryRecord], list[Event]]:
    """The query records and events of an export folder (queries.jsonl + events.jsonl, one JSON
    object a line in the shapes of middleware.events.model)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TuningDataError(f"--from-events {directory}: not a directory")
    paths = [directory / name for name in EXPORT_FILES]
    absent = [p.name for p in paths if not p.is_file()]
    if absent:
        raise TuningDataError(
            f"--from-events {directory}: no {' or '.join(absent)} there; give an export folder holding "
            f"{' and '.join(EXPORT_FILES)} (or give --from-events alone to read the store's event log)"
        )
    return _read_models(paths[0], QueryRecord), _read_models(paths[1], Event)


def read_catalog(path: str | Path) -> dict[str, str]:
    """Product id → text (Product.embedding_text) from a products JSONL file (`id`, `title`,
    `description`, …: what `shopsearch index` loads) or a BEIR corpus.jsonl (`_id`, `title`, `text`)."""

    from pydantic import ValidationError

    from middleware.products import Product
    from middleware.tuning.data import document_text, json_lines

    path = Path(path)
    if not path.is_file():
        raise TuningDataError(f"--catalog {path}: file not found")
    texts: dict[str, str] = {}
    for where, row in json_lines(path):
        if not isinstance(row, dict):
            raise TuningDataError(f"{where}: expected a JSON object")
        if "_id" in row and "id" not in row:
            title, text = row.get("title") or "", row.get("text") or ""
            if not isinstance(title, str) or not isinstance(text, str):
                raise TuningDataError(f"{where}: fields 'title' and 'text' must be strings")
            texts[str(row["_id"])] = document_text(title, text)
            continue
        try:
            product = Product.model_validate(row)
        except ValidationError as err:
            raise TuningDataError(f"{where}: {_field_error(err)}") from None
        texts[product.id] = product.embedding_text()
    if not texts:
        raise TuningDataError(f"--catalog {path}: no products")
    return texts
