"""Merchandising rules: pin, hide, boost and bury products for matching queries, after business scoring.

A rule applies to a request when it is enabled, inside its active window, its `when.query` matches the
normalised query ("exact": equal, "contains": contained, "any": every query) and the request's filters
are at least as narrow as the rule's `when.filters` (every field the rule sets is set in the request
within the rule's values: a sub-list of its categories / brands / ids, a price range inside its range,
in_stock when it asks for in_stock).

Within the ranked candidates, in rule id order: hide removes, boost multiplies the final score of the
products its filter matches (then the list is re-sorted, ties keeping their order), bury moves matching
products after all others, and pins place products at 1-based positions (a pinned product outside the
candidates is fetched; one that does not exist, or that the request's filters exclude, is reported and
not placed). Each hit's explain lists what the rules did to it. A category page or a sorted page keeps
its order (the pipeline's `_page_rules`): hide and, on a category page, pins apply; boost and bury do not.

Storage: one JSON file, `<data_dir>/rules.json`, for both backends. Writes take an exclusive lock, write a
temporary file and rename it over the old one (atomic), so the rules survive restarts and every worker
sharing the data directory sees the same ones; readers re-read the file when it changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from middleware.json_records import JsonRecordStore, ScheduledRecord, first_error
from middleware.products import Candidate, Filters, Product, ProductId
from middleware.text import normalize

MAX_RULE_QUERY_CHARS = 512
MAX_PIN_POSITION = 1000
MAX_RULE_ITEMS = 1000  # pins, hides, boosts or buries in one rule
MAX_RULES = 10_000


def normalize_query(text: str) -> str:
    """NFKC, casefold, whitespace collapsed: how rule queries and request queries are compared."""
    return " ".join(normalize(text).casefold().split())


class RuleWhen(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str | None = Field(None, max_length=MAX_RULE_QUERY_CHARS)
    match: Literal["exact", "contains", "any"] = "contains"
    filters: Filters | None = None

    @model_validator(mode="after")
    def _query_needed(self) -> RuleWhen:
        if self.match != "any" and not normalize_query(self.query or ""):
            raise ValueError(f'query: required (non-blank) for match "{self.match}"; use match "any" for every query')
        return self


class Pin(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: ProductId
    position: int = Field(ge=1, le=MAX_PIN_POSITION)


class Boost(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    filter: Filters
    factor: float = Field(gt=0, le=1000)


class Bury(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filter: Filters


class Rule(ScheduledRecord):
    """One merchandising rule. Datetimes without a zone are UTC."""

    when: RuleWhen = Field(default_factory=lambda: RuleWhen(match="any"))
    pin: list[Pin] = Field(default_factory=list, max_length=MAX_RULE_ITEMS)
    hide: list[ProductId] = Field(default_factory=list, max_length=MAX_RULE_ITEMS)
    boost: list[Boost] = Field(default_factory=list, max_length=MAX_RULE_ITEMS)
    bury: list[Bury] = Field(default_factory=list, max_length=MAX_RULE_ITEMS)

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        positions = [p.position for p in self.pin]
        if len(set(positions)) != len(positions):
            raise ValueError("pin: two pins share a position")
        ids = [p.id for p in self.pin]
        if len(set(ids)) != len(ids):
            raise ValueError("pin: a product is pinned twice")
        if not (self.pin or self.hide or self.boost or self.bury):
            raise ValueError("rule: needs at least one of pin, hide, boost, bury")
        return self

    def applies(self, query: str, filters: Filters | None, now: datetime) -> bool:
        """Whether this rule fires for `query` (already normalised) under the request's filters."""
        if not self.active(now):
            return False
        when = self.when
        if when.match != "any":
            wanted = normalize_query(when.query or "")
            if when.match == "exact" and query != wanted:
                return False
            if when.match == "contains" and wanted not in query:
                return False
        return when.filters is None or narrower(filters, when.filters)


def narrower(request: Filters | None, rule: Filters) -> bool:
    """Whether the request's filters are at least as narrow as the rule's (every field the rule sets)."""
    req = request or Filters()
    for name in ("category", "brand", "ids"):
        wanted = getattr(rule, name)
        given = getattr(req, name)
        if wanted is not None and (given is None or not set(given) <= set(wanted)):
            return False
    if rule.price_min is not None and (req.price_min is None or req.price_min < rule.price_min):
        return False
    if rule.price_max is not None and (req.price_max is None or req.price_max > rule.price_max):
        return False
    if rule.exclude and not all(clause in (req.exclude or ()) for clause in rule.exclude):
        return False  # the request leaves out at least what the rule's filters leave out
    return not (rule.in_stock and not req.in_stock)


def rule_error(err: ValidationError) -> tuple[str, str]:
    """(field, message) of a rule's first validation error: `pin.0.position`, `when.match`, …"""
    return first_error(err, "rule")


# ------------------------------------------------------------------------------------------- storage


class RuleStore(JsonRecordStore[Rule]):
    """Rules in one JSON file (`{"rules": [...]}`), re-read when the file changes."""

    key = "rules"
    model = Rule

    def put(self, rules: Sequence[Rule]) -> int:
        """Insert or replace rules by id; the number written."""
        with self._writing() as current:
            for rule in rules:
                current[rule.id] = rule
            if len(current) > MAX_RULES:
                raise ValueError(f"at most {MAX_RULES} rules")
        return len(rules)


def rules_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / "rules.json"


# ----------------------------------------------------------------------------------------- applying


@dataclass
class RulesOutcome:
    candidates: list[Candidate]
    applied: list[str] = field(default_factory=list)  # ids of the rules that fired
    missing_pins: list[dict[str, Any]] = field(default_factory=list)  # {"rule", "id", "reason"}
    hidden: set[str] = field(default_factory=set)  # ids hidden (kept out of later pages too)
    actions: dict[str, list[str]] = field(default_factory=dict)  # product id -> what rules did to it

    def report(self) -> dict[str, Any]:
        return {"applied": self.applied, "missing_pins": self.missing_pins}


def matching(rules: Sequence[Rule], query: str, filters: Filters | None, now: datetime | None = None) -> list[Rule]:
    norm = normalize_query(query)
    moment = now or datetime.now(UTC)
    return [r for r in rules if r.applies(norm, filters, moment)]


def apply(
    candidates: list[Candidate],
    rules: Sequence[Rule],
    filters: Filters | None,
    fetch: Callable[[list[str]], list[Product]],
) -> RulesOutcome:
    """Hide, boost (re-sort), bury, then pin, rule by rule in id order; see the module docstring."""
    out = RulesOutcome(candidates=list(candidates), applied=[r.id for r in rules])

    def note(product_id: str, action: str) -> None:
        out.actions.setdefault(product_id, []).append(action)

    cands = out.candidates
    for rule in rules:
        if rule.hide:
            hidden = set(rule.hide)
            out.hidden |= hidden
            cands[:] = [c for c in cands if c.id not in hidden]
        for boost in rule.boost:
            for c in cands:
                if c.product is not None and boost.filter.matches(c.product):
                    c.final = (c.final if c.final is not None else _score(c)) * boost.factor
                    note(c.id, f"boost:{rule.id} x{boost.factor:g}")
        if rule.boost:
            order = {id(c): i for i, c in enumerate(cands)}
            cands.sort(key=lambda c: (-_score(c), order[id(c)]))
        for bury in rule.bury:
            sunk = [c for c in cands if c.product is not None and bury.filter.matches(c.product)]
            if sunk:
                sunk_ids = {id(c) for c in sunk}
                cands[:] = [c for c in cands if id(c) not in sunk_ids] + sunk
                for c in sunk:
                    note(c.id, f"bury:{rule.id}")
    # pins last, so that no later step moves them; hidden products can be pinned back explicitly
    pins = sorted(((p, r) for r in rules for p in r.pin), key=lambda pr: pr[0].position)
    present = {c.id: c for c in cands}
    wanted = [p.id for p, _ in pins if p.id not in present]
    fetched = {p.id: p for p in fetch(wanted)} if wanted else {}
    placed: set[str] = set()
    for pin, rule in pins:
        if pin.id in placed:
            continue
        cand = present.get(pin.id)
        if cand is None:
            product = fetched.get(pin.id)
            if product is None:
                out.missing_pins.append({"rule": rule.id, "id": pin.id, "reason": "no such product"})
                continue
            if filters is not None and not filters.matches(product):
                out.missing_pins.append({"rule": rule.id, "id": pin.id, "reason": "excluded by the request's filters"})
                continue
            cand = Candidate(id=product.id, product=product)
        else:
            cands.remove(cand)
        cands.insert(min(pin.position - 1, len(cands)), cand)
        placed.add(pin.id)
        out.hidden.discard(pin.id)
        note(pin.id, f"pin:{rule.id} position {pin.position}")
    return out


def _score(c: Candidate) -> float:
    for value in (c.final, c.rerank, c.fused):
        if value is not None and math.isfinite(value):
            return float(value)
    return 0.0


# ----------------------------------------------------------------------------------------- collapse


def family(c: Candidate) -> str:
    """The product family (attributes.group_id), or the product itself when it has none."""
    group = c.product.attributes.get("group_id") if c.product is not None else None
    if group is None or isinstance(group, (dict, list)) or group == "":
        return f"\x00{c.id}"
    return f"g:{group}"


def collapse(candidates: Sequence[Candidate]) -> tuple[list[Candidate], dict[str, int]]:
    """One candidate per family, the best ranked (the order is by final score), and each kept one's count."""
    kept: list[Candidate] = []
    best: dict[str, Candidate] = {}
    counts: dict[str, int] = {}
    for c in candidates:
        key = family(c)
        counts[key] = counts.get(key, 0) + 1
        if key not in best:
            best[key] = c
            kept.append(c)
    return kept, {c.id: counts[family(c)] for c in kept}
