"""Query-time expansion of the lexical (BM25) query: synonym sets and typo tolerance.

Expansion never touches the index: it rewrites the text handed to `Backend.bm25`, so synonym sets
can change at runtime without a reindex and the Backend protocol stays as it is.

- Synonyms, in Solr's format, one rule a line (`#` starts a comment):
  `a, b, c` (equivalence: a query holding any of them also looks for the others) and
  `a, b => c, d` (replacement: a query holding a or b looks for c and d instead).
  Terms may be several words ("tv, television set"); they match whole words of the query,
  case-insensitively, after the analysis' normalisation (full-width folding, traditional Han
  characters as simplified). A term holding Han characters matches anywhere in a run of them.
- Typos: a Latin-script query word that no indexed title word equals is looked up by edit distance
  (`Backend.fuzzy_terms`), the distance scaled with its length (`max_edits_for`), and its nearest
  indexed words are added to the query.

The synonym set is a JSON file written atomically (a temporary file renamed over it); every worker
re-reads it when its modification time or size changes, so an edit made through any worker (or the
CLI) applies to all of them on their next query.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import regex

from middleware.text import STOPWORDS, fold_han, normalize

if TYPE_CHECKING:
    from middleware.backends.base import Backend, TermCount
    from middleware.config import Settings


class FuzzyTerms(Protocol):
    """The one Backend primitive typo tolerance needs."""

    def fuzzy_terms(self, word: str, max_edits: int, n: int) -> list[TermCount]: ...


MAX_RULES = 100_000
MAX_TERMS_PER_RULE = 64
MAX_TERM_CHARS = 200
MAX_LINE_CHARS = 4_000
TYPO_CANDIDATES = 2  # indexed words added per misspelt query word
SYNONYMS_FILE = "synonyms.json"

_HAN = regex.compile(r"\p{Han}")
_LATIN_WORD = regex.compile(r"(?<![\p{L}\p{N}\p{M}])\p{Latin}+(?![\p{L}\p{N}\p{M}])")
_SPACE = regex.compile(r"\s+")


class SynonymError(ValueError):
    """A synonym line that cannot be read; `line`: its 1-based number in the input."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True)
class SynonymRule:
    """`terms` are equivalent when `replacement` is empty; otherwise `terms` are replaced by it."""

    terms: tuple[str, ...]
    replacement: tuple[str, ...] = ()

    def to_line(self) -> str:
        line = ", ".join(self.terms)
        return f"{line} => {', '.join(self.replacement)}" if self.replacement else line


def fold(text: str) -> str:
    """A term or query as synonyms compare them: NFKC, lower-cased, simplified Han, single spaces."""
    return _SPACE.sub(" ", fold_han(normalize(text).lower())).strip()


def _terms(side: str, line: int) -> tuple[str, ...]:
    terms: list[str] = []
    for raw in side.split(","):
        term = fold(raw.replace("\\,", ","))
        if not term:
            raise SynonymError(line, "empty term (two commas in a row, or a comma at an end)")
        if len(term) > MAX_TERM_CHARS:
            raise SynonymError(line, f"a term longer than {MAX_TERM_CHARS} characters")
        if term not in terms:
            terms.append(term)
    if len(terms) > MAX_TERMS_PER_RULE:
        raise SynonymError(line, f"more than {MAX_TERMS_PER_RULE} terms")
    return tuple(terms)


def parse_line(text: str, line: int = 1) -> SynonymRule | None:
    """One Solr synonym line as a rule; None for a blank or comment line. Raises SynonymError."""
    if not isinstance(text, str):
        raise SynonymError(line, f"a rule must be a string, got {type(text).__name__}")
    if len(text) > MAX_LINE_CHARS:
        raise SynonymError(line, f"longer than {MAX_LINE_CHARS} characters")
    content = text.split("#", 1)[0].strip()
    if not content:
        return None
    if content.count("=>") > 1:
        raise SynonymError(line, "more than one '=>'")
    if "=>" in content:
        left, right = content.split("=>")
        if not left.strip() or not right.strip():
            raise SynonymError(line, "'=>' needs terms on both sides")
        return SynonymRule(_terms(left, line), _terms(right, line))
    terms = _terms(content, line)
    if len(terms) < 2:
        raise SynonymError(line, "an equivalence needs at least two different terms ('a, b'), or use 'a => b'")
    return SynonymRule(terms)


def parse_synonyms(lines: Iterable[str]) -> tuple[list[SynonymRule], list[SynonymError]]:
    """Rules of the good lines, and one error (with its line number) per bad line."""
    rules: list[SynonymRule] = []
    errors: list[SynonymError] = []
    for number, text in enumerate(lines, start=1):
        try:
            rule = parse_line(text.rstrip("\r\n") if isinstance(text, str) else text, number)
        except SynonymError as err:
            errors.append(err)
            continue
        if rule is not None:
            rules.append(rule)
    if len(rules) > MAX_RULES:
        errors.append(SynonymError(MAX_RULES + 1, f"more than {MAX_RULES} rules"))
        rules = rules[:MAX_RULES]
    return rules, errors


def _pattern(term: str) -> regex.Pattern[str]:
    body = regex.escape(term).replace(r"\ ", r"\s+")
    if _HAN.search(term):
        return regex.compile(body)
    return regex.compile(rf"(?<![\p{{L}}\p{{N}}\p{{M}}]){body}(?![\p{{L}}\p{{N}}\p{{M}}])")


class SynonymSet:
    """Compiled rules: `apply(text)` → the lexical query text."""

    def __init__(self, rules: Iterable[SynonymRule] = ()) -> None:
        self.rules = list(rules)
        self._replace = [([_pattern(t) for t in r.terms], " ".join(r.replacement)) for r in self.rules if r.replacement]
        self._equivalent = [([_pattern(t) for t in r.terms], r.terms) for r in self.rules if not r.replacement]

    def __len__(self) -> int:
        return len(self.rules)

    def apply(self, text: str) -> str:
        """Replacements first (each matched term becomes the rule's replacement), then every
        equivalent set with a term in the text adds its other terms."""
        if not self.rules:
            return text
        out = fold(text)
        for patterns, replacement in self._replace:
            for pattern in patterns:
                out = pattern.sub(lambda _m, r=replacement: f" {r} ", out)
        extra: list[str] = []
        for patterns, terms in self._equivalent:
            hit = [pattern.search(out) is not None for pattern in patterns]
            if any(hit):
                extra.extend(t for t, found in zip(terms, hit, strict=True) if not found and t not in extra)
        return _SPACE.sub(" ", " ".join([out, *extra])).strip()


class SynonymStore:
    """The synonym set in a JSON file ({"rules": ["a, b", "c => d"]}), re-read when it changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._set = SynonymSet()

    def _current_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def current(self) -> SynonymSet:
        """The set as the file holds it now (an unreadable file keeps the last good set)."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return self._set
        with self._lock:
            if stamp != self._stamp:
                if stamp is None:
                    self._set = SynonymSet()
                else:
                    try:
                        data = json.loads(self.path.read_text(encoding="utf-8"))
                        rules, _ = parse_synonyms(data.get("rules", []))
                        self._set = SynonymSet(rules)
                    except (OSError, ValueError, AttributeError):
                        return self._set  # a half-copied or hand-broken file: keep serving the last set
                self._stamp = stamp
            return self._set

    def lines(self) -> list[str]:
        return [rule.to_line() for rule in self.current().rules]

    def replace(self, rules: list[SynonymRule]) -> int:
        """Write the whole set (atomically: readers see the old set or the new one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"rules": [r.to_line() for r in rules]}, ensure_ascii=False, indent=1)
        fd, tmp = tempfile.mkstemp(prefix=".synonyms-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(rules)


def synonyms_path(settings: Settings) -> Path:
    """`synonyms_file` when configured, else synonyms.json in the data directory."""
    return Path(settings.synonyms_file) if settings.synonyms_file else Path(settings.data_dir) / SYNONYMS_FILE


def max_edits_for(word: str) -> int:
    """Edits a word of this length may have: none up to 4 characters, 1 up to 8, then 2."""
    n = len(word)
    return 0 if n <= 4 else 1 if n <= 8 else 2


def typo_corrections(backend: FuzzyTerms, text: str) -> list[str]:
    """Indexed title words nearest to each Latin-script word of `text` that no title word equals."""
    from rapidfuzz.distance import OSA

    out: list[str] = []
    seen: set[str] = set()
    for match in _LATIN_WORD.finditer(fold(text)):
        word = match.group()
        edits = max_edits_for(word)
        if not edits or word in STOPWORDS or word in seen:
            continue
        seen.add(word)
        found = [t.term for t in backend.fuzzy_terms(word, edits, TYPO_CANDIDATES * 4)]
        if not found or word in found:
            continue
        nearest = min(OSA.distance(word, term) for term in found)
        nearest_terms = [t for t in found if OSA.distance(word, t) == nearest and t not in out]
        out.extend(nearest_terms[:TYPO_CANDIDATES])
    return out


class QueryExpander:
    """The lexical query text of a user query: synonyms applied, typo corrections added."""

    def __init__(self, backend: Backend, store: SynonymStore | None = None, *, typos: bool = True) -> None:
        self.backend = backend
        self.store = store
        self.typos = typos

    def expand(self, text: str) -> str:
        expanded = self.store.current().apply(text) if self.store is not None else text
        if self.typos:
            extra = typo_corrections(self.backend, expanded)
            if extra:
                expanded = f"{expanded} {' '.join(extra)}"
        return expanded
