"""Lexical requirements of the proxy's text clauses: operator and, minimum_should_match, match_phrase,
match_phrase_prefix, prefix and fuzziness, with OpenSearch's meaning over shopsearch's analysis.

A requirement is checked on every product that matches the clause's words lexically (any of them,
the backend's match set), field by field; the products that pass become the ids the pipeline may
return, so totals, pages and aggregations count exactly them. Words are compared lower-cased and
unstemmed (jieba words for Chinese), as OpenSearch's standard analyzer keeps them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from rapidfuzz.distance import Levenshtein

from middleware.backends.base import Backend, MatchSet
from middleware.products import Filters, Product
from middleware.server.errors import ApiError
from middleware.text import Analysis

MAX_CANDIDATES = 10_000  # products a requirement is checked on; broader clauses are refused
EXPANSIONS = 50  # indexed words a prefix or a fuzzy word expands to
_WORDS = Analysis(stem=False, split=False, stopwords="keep")

Kind = Literal["all", "at_least", "phrase", "phrase_prefix", "prefix", "fuzzy"]
# the product text each clause field names ("*" and "_all": all of it)
FIELD_TEXT = {
    "title": ("title",),
    "description": ("description",),
    "*": ("title", "description", "brand", "category"),
    "_all": ("title", "description", "brand", "category"),
}


def words(text: str) -> list[str]:
    return _WORDS.streams(text)["words"]


@dataclass(frozen=True)
class Requirement:
    path: str  # the clause's JSON path, for errors
    text: str  # the clause's text (prefix: the prefix)
    fields: tuple[str, ...]  # product fields: title, description, brand, category
    kind: Kind
    minimum: int = 1  # at_least: how many of the distinct words
    per_field: bool = True  # all / at_least within one field (best_fields), else across them (cross_fields)
    max_edits: int = 0  # fuzzy: 1 or 2, or -1 for AUTO

    def field_words(self, product: Product) -> list[list[str]]:
        texts = {
            "title": product.title,
            "description": product.description or "",
            "brand": product.brand or "",
            "category": " ".join(product.category),
        }
        per = [words(texts[name]) for name in self.fields]
        return per if self.per_field else [[w for ws in per for w in ws]]

    def holds(self, product: Product) -> bool:
        wanted = words(self.text)
        return any(self._holds_in(wanted, found) for found in self.field_words(product))

    def _holds_in(self, wanted: list[str], found: list[str]) -> bool:
        if self.kind in ("all", "at_least"):
            need = len(set(wanted)) if self.kind == "all" else self.minimum
            return len(set(wanted) & set(found)) >= need
        if self.kind == "fuzzy":
            return any(_near(w, f, self.max_edits) for w in set(wanted) for f in set(found))
        if self.kind == "prefix":
            start = self.text.strip().lower()
            return any(f.startswith(start) for f in found) if start else False
        if not wanted:
            return False
        head, last = (wanted, None) if self.kind == "phrase" else (wanted[:-1], wanted[-1])
        span = len(head)
        for i in range(len(found) - span + (0 if last is None else -1) + 1):
            if found[i : i + span] == head and (last is None or found[i + span].startswith(last)):
                return True
        return False

    def candidate_text(self, backend: Backend) -> str:
        """Words whose lexical match set holds every product the requirement can pass."""
        if self.kind == "prefix":
            return " ".join(self._expand(t.term for t in backend.prefix_terms(self.text.strip().lower(), EXPANSIONS)))
        if self.kind == "phrase_prefix":
            wanted = words(self.text)
            if len(wanted) > 1:
                return " ".join(wanted[:-1])  # every word but the last must be there whole
            return " ".join(self._expand(t.term for t in backend.prefix_terms(wanted[0] if wanted else "", EXPANSIONS)))
        if self.kind == "fuzzy":
            near = [
                t.term
                for w in words(self.text)
                if (edits := auto_edits(w) if self.max_edits < 0 else self.max_edits) > 0
                for t in backend.fuzzy_terms(w, edits, EXPANSIONS)
            ]
            return " ".join(dict.fromkeys([*words(self.text), *near]))
        return self.text

    def _expand(self, terms: Iterable[str]) -> list[str]:
        found = list(terms)
        if len(found) >= EXPANSIONS:
            raise ApiError(
                400,
                f"the prefix matches more than {EXPANSIONS} indexed words: give more of the word",
                param=self.path,
            )
        return found


def auto_edits(word: str) -> int:
    """OpenSearch's fuzziness AUTO: no edit up to 2 characters, 1 up to 5, else 2."""
    return 0 if len(word) <= 2 else 1 if len(word) <= 5 else 2


def _near(wanted: str, found: str, max_edits: int) -> bool:
    edits = auto_edits(wanted) if max_edits < 0 else max_edits
    return Levenshtein.distance(wanted, found, score_cutoff=edits) <= edits


def excluded_ids(backend: Backend, negatives: Sequence[Requirement], filters: Filters | None) -> list[str]:
    """The products, under `filters`, that any negative requirement (a must_not text clause) matches:
    the search leaves them out (ApiError when a clause is too broad to check)."""
    out: set[str] = set()
    for req in negatives:
        out.update(allowed_ids(backend, [req], filters))
    return sorted(out)


def allowed_ids(backend: Backend, requirements: Sequence[Requirement], filters: Filters | None) -> list[str]:
    """The products, under `filters`, that satisfy every requirement (ApiError when a clause is too broad)."""
    allowed: set[str] | None = None
    for req in requirements:
        text = req.candidate_text(backend)
        passing: set[str] = set()
        if text.strip():
            match = MatchSet(text=text, filters=filters)
            if backend.count_matches(match) > MAX_CANDIDATES:
                raise ApiError(
                    400,
                    f"the clause matches more than {MAX_CANDIDATES} products lexically: narrow it with filters",
                    param=req.path,
                )
            for cand in backend.listing(match, [], 0, MAX_CANDIDATES):
                product = cand.product if cand.product is not None else None
                if product is not None and (allowed is None or cand.id in allowed) and req.holds(product):
                    passing.add(cand.id)
        allowed = passing if allowed is None else allowed & passing
        if not allowed:
            return []
    return sorted(allowed or ())
