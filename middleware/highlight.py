"""Highlighted fragments of a text for a query, whatever engine found the text.

A span of the text is a match when one of its tokens matches one of the query's tokens under the
lexical analysis of `middleware.text`: a Latin word by its stem and letter/digit parts ("Sneaker"
for "sneakers", "iPhone 15" for "iphone15"), CJK text by bigram ("送女友" for 送女 + 女友), and a
query's lone CJK character wherever that character occurs. Offsets are into the original string,
whatever NFKC normalisation and lower-casing did to it.
"""

from __future__ import annotations

import bisect
import html
import unicodedata
from dataclasses import dataclass, field

import regex

from middleware import text as text_analysis

_GRAPHEME = regex.compile(r"\X")
_MAX_ANCHORS = 500
# Characters NFKC leaves alone and lower-cases one to one (ASCII, CJK unified ideographs), not
# followed by a combining mark that NFKC could compose with them.
_STABLE = regex.compile(r"[\x00-\x7f\u4e00-\u9fff]+(?!\p{M})")


@dataclass
class _Span:
    start: int
    end: int
    terms: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _QueryTerms:
    words: frozenset[str]  # stems and number parts of the query's non-CJK words
    bigrams: frozenset[str]
    chars: frozenset[str]  # the query's lone CJK characters

    def __bool__(self) -> bool:
        return bool(self.words or self.bigrams or self.chars)


def _query_terms(query: str) -> _QueryTerms:
    words: set[str] = set()
    stops: set[str] = set()
    bigrams: set[str] = set()
    chars: set[str] = set()
    for match in text_analysis._CJK_RUN_OR_WORD.finditer(text_analysis.normalize(query).lower()):
        run = match.group("cjk")
        if run is None:
            word = match.group("word")
            if word in text_analysis.STOPWORDS:
                stops.add(word)
            elif len(word) <= text_analysis.MAX_WORD_CHARS:
                words.update(text_analysis.word_parts(word))
        elif len(run) == 1:
            chars.add(run)
        else:
            bigrams.update(run[i : i + 2] for i in range(len(run) - 1))
    if not (words or bigrams or chars):
        words = stops  # a query of stopwords only highlights them, as it matches them
    return _QueryTerms(frozenset(words), frozenset(bigrams), frozenset(chars))


def _normalized(text: str) -> tuple[str, list[int], list[int]]:
    """NFKC + lower-cased text, and for each of its characters the original span it came from."""
    if text.isascii():
        offsets = list(range(len(text)))
        return text.lower(), offsets, [i + 1 for i in offsets]
    pieces: list[str] = []
    starts: list[int] = []
    ends: list[int] = []

    def graphemes(a: int, b: int) -> None:
        for grapheme in _GRAPHEME.finditer(text, a, b):
            piece = unicodedata.normalize("NFKC", grapheme.group()).lower()
            pieces.append(piece)
            starts.extend([grapheme.start()] * len(piece))
            ends.extend([grapheme.end()] * len(piece))

    pos = 0
    for stable in _STABLE.finditer(text):
        graphemes(pos, stable.start())
        pieces.append(stable.group().lower())
        starts.extend(range(stable.start(), stable.end()))
        ends.extend(range(stable.start() + 1, stable.end() + 1))
        pos = stable.end()
    graphemes(pos, len(text))
    return "".join(pieces), starts, ends


def _match_spans(text: str, terms: _QueryTerms) -> list[_Span]:
    norm, starts, ends = _normalized(text)
    found: list[_Span] = []

    def add(a: int, b: int, term: str) -> None:
        found.append(_Span(starts[a], ends[b - 1], {term}))

    for match in text_analysis._CJK_RUN_OR_WORD.finditer(norm):
        run = match.group("cjk")
        offset = match.start()
        if run is None:
            if not terms.words:
                continue
            word = match.group("word")
            if word in text_analysis.STOPWORDS:
                if word in terms.words:
                    add(offset, match.end(), word)
                continue
            if len(word) > text_analysis.MAX_WORD_CHARS:
                continue
            for part in text_analysis._PART.finditer(word):
                token = part.group()
                if text_analysis._LETTER.match(token):
                    token = text_analysis.stem(token)
                if token in terms.words:
                    add(offset + part.start(), offset + part.end(), token)
            continue
        for i in range(len(run)):
            if run[i] in terms.chars:
                add(offset + i, offset + i + 1, run[i])
            if i + 1 < len(run) and run[i : i + 2] in terms.bigrams:
                add(offset + i, offset + i + 2, run[i : i + 2])
    return _merge(found)


def _merge(spans: list[_Span]) -> list[_Span]:
    """Overlapping and touching spans as one."""
    merged: list[_Span] = []
    for span in sorted(spans, key=lambda s: (s.start, s.end)):
        if merged and span.start <= merged[-1].end:
            last = merged[-1]
            last.end = max(last.end, span.end)
            last.terms |= span.terms
        else:
            merged.append(_Span(span.start, span.end, set(span.terms)))
    return merged


def _window(text: str, span: _Span, size: int) -> tuple[int, int]:
    """About `size` characters around a span, its edges moved off the middle of a word."""
    start = max(0, min(span.start - (size - (span.end - span.start)) // 2, len(text) - size))
    end = min(len(text), start + size)
    slack = size // 5
    if start > 0 and text[start - 1].isalnum():
        cut = next((i + 1 for i in range(start, min(span.start, start + slack)) if not text[i].isalnum()), None)
        start = cut if cut is not None else start
    if end < len(text) and text[end].isalnum():
        cut = next((i for i in range(end - 1, max(span.end, end - slack) - 1, -1) if not text[i].isalnum()), None)
        end = cut if cut is not None else end
    return start, end


def _render(text: str, start: int, end: int, spans: list[_Span], pre: str, post: str) -> str:
    out: list[str] = []
    pos = start
    for span in spans:
        a, b = max(span.start, start), min(span.end, end)
        if a >= b:
            continue
        out.append(html.escape(text[pos:a]))
        out.append(pre + html.escape(text[a:b]) + post)
        pos = b
    out.append(html.escape(text[pos:end]))
    return "".join(out)


def highlight_fragments(
    text: str, query: str, *, pre: str = "<em>", post: str = "</em>", fragment_chars: int = 150, fragments: int = 3
) -> list[str]:
    """Up to `fragments` pieces of `text` of about `fragment_chars` characters around its best-covered
    matches of `query` (the whole text when it is no longer), best first; matches wrapped in `pre` and
    `post`, everything else HTML-escaped. Empty when nothing matches."""
    for name, value in (("text", text), ("query", query), ("pre", pre), ("post", post)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    for name, number in (("fragment_chars", fragment_chars), ("fragments", fragments)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"{name} must be a positive integer, got {number!r}")
    terms = _query_terms(query)
    if not terms or not text:
        return []
    spans = _match_spans(text, terms)
    if not spans:
        return []
    if len(text) <= fragment_chars:
        return [_render(text, 0, len(text), spans, pre, post)]
    starts = [s.start for s in spans]
    ends = [s.end for s in spans]
    chosen: list[tuple[int, int]] = []
    remaining = list(spans)
    while remaining and len(chosen) < fragments:
        best: tuple[tuple[int, int, int], int, int] | None = None
        step = -(-len(remaining) // _MAX_ANCHORS)  # a very long text: every step-th match as an anchor
        for span in remaining[::step]:
            start, end = _window(text, span, fragment_chars)
            for a, b in chosen:  # fragments never overlap
                if b <= span.start:
                    start = max(start, b)
                elif a >= span.end:
                    end = min(end, a)
            inside = spans[bisect.bisect_right(ends, start) : bisect.bisect_left(starts, end)]
            covered = set().union(*(s.terms for s in inside))
            key = (len(covered), sum(min(s.end, end) - max(s.start, start) for s in inside), -start)
            if best is None or key > best[0]:
                best = (key, start, end)
        if best is None:
            break
        _, start, end = best
        chosen.append((start, end))
        remaining = [s for s in remaining if all(s.end <= a or s.start >= b for a, b in chosen)]
    return [_render(text, a, b, spans, pre, post) for a, b in chosen]
