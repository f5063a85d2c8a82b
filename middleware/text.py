"""Text analysis for lexical retrieval: jieba words and CJK unigrams + bigrams.

Both analyses NFKC-normalise (full-width ＡＢＣ１２３ → ABC123), lower-case, drop punctuation and
whitespace, and keep Latin words and numbers whole ("iphone14", "3.5"). Every token they emit is one
token for SQLite FTS5's `unicode61` tokenizer configured as `FTS5_TOKENIZE` below, so pre-tokenised
text stored space-joined is indexed exactly as analysed here.
"""

from __future__ import annotations

import logging
import threading
import unicodedata
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import regex

if TYPE_CHECKING:
    import jieba

# Token characters: letters, numbers, combining marks (Indic vowel signs, viramas), private use.
# "." "_" and "'" are kept only *inside* a token, between token characters ("3.5", "u.s", "don't").
_WORD = regex.compile(r"[\p{L}\p{N}\p{M}\p{Co}]+(?:[._'][\p{L}\p{N}\p{M}\p{Co}]+)*")
# Scripts the `cjk` analyzer bigrams (Lucene's CJKBigramFilter: han, hiragana, katakana, hangul).
_CJK_CHAR = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]")
_CJK_RUN_OR_WORD = regex.compile(
    r"(?P<cjk>[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]+)"
    r"|(?P<word>(?:(?![\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}])[\p{L}\p{N}\p{M}\p{Co}])+"
    r"(?:[._'](?:(?![\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}])[\p{L}\p{N}\p{M}\p{Co}])+)*)"
)

# The FTS5 tokenizer that reads the space-joined tokens back: same character classes as _WORD,
# no diacritic folding (tokens are already final), "._'" as token characters.
FTS5_TOKENIZE = "unicode61 remove_diacritics 0 categories 'L* N* Co M*' tokenchars '._'''"

_jieba_lock = threading.Lock()
_jieba: jieba.Tokenizer | None = None


def _tokenizer() -> jieba.Tokenizer:
    """jieba's dictionary takes about a second to load: do it once, on first use, without log lines."""
    global _jieba
    if _jieba is None:
        with _jieba_lock:
            if _jieba is None:
                import jieba as jieba_module

                # jieba logs "Building prefix dict…" at DEBUG on its own stderr handler
                logging.getLogger("jieba").setLevel(logging.WARNING)
                tokenizer = jieba_module.Tokenizer()
                tokenizer.initialize()
                _jieba = tokenizer
    return _jieba


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _words(pieces: Iterable[str]) -> Iterator[str]:
    for piece in pieces:
        yield from _WORD.findall(piece.lower())


def jieba_tokens(text: str) -> list[str]:
    """jieba search-mode words: each word plus its dictionary 2- and 3-grams (as `cut_for_search`).

    Unlike jieba's own `cut_for_search`, words without Han characters are never split into
    sub-grams, so Latin words and numbers stay whole.
    """
    if not text:
        return []
    tokenizer = _tokenizer()
    freq = tokenizer.FREQ
    out: list[str] = []
    for word in tokenizer.cut(normalize(text), HMM=True):
        if len(word) > 2 and _CJK_CHAR.search(word):
            for size in (2, 3):
                if len(word) > size:
                    for i in range(len(word) - size + 1):
                        gram = word[i : i + size]
                        if freq.get(gram):
                            out.extend(_words((gram,)))
        out.extend(_words((word,)))
    return out


def cjk_tokens(text: str) -> list[str]:
    """As OpenSearch's `cjk` analyzer, plus unigrams: each CJK run gives its characters and
    overlapping bigrams; other words (Latin, digits, other scripts) are lower-cased whole."""
    if not text:
        return []
    out: list[str] = []
    for match in _CJK_RUN_OR_WORD.finditer(normalize(text).lower()):
        run = match.group("cjk")
        if run is None:
            out.append(match.group("word"))
            continue
        for i, char in enumerate(run):
            out.append(char)
            if i + 1 < len(run):
                out.append(run[i : i + 2])
    return out


# ---------------------------------------------------------------------- the lexical index's fields
# What the embedded lexical engine indexes: each field is a list of tokens (pre-tokenised, stored
# space-joined), scored by BM25 per field and summed with FIELD_BOOSTS. Changing any analysis or
# field changes ANALYSIS_VERSION, which makes a store rebuild its lexical index from its products.

ANALYSIS_VERSION = 1
FIELD_BOOSTS: dict[str, float] = {"words_title": 2.0, "words_body": 1.0, "cjk_title": 2.0, "cjk_body": 1.0}
LEXICAL_FIELDS: tuple[str, ...] = tuple(FIELD_BOOSTS)


def analyze_product(title: str, body: str) -> dict[str, list[str]]:
    """A product's tokens per lexical field (`body`: everything indexed besides the title)."""
    return {
        "words_title": jieba_tokens(title),
        "words_body": jieba_tokens(body),
        "cjk_title": cjk_tokens(title),
        "cjk_body": cjk_tokens(body),
    }


def analyze_query(text: str) -> dict[str, list[str]]:
    """A query's distinct tokens per lexical field, in order of first occurrence."""
    words = list(dict.fromkeys(jieba_tokens(text)))
    chars = list(dict.fromkeys(cjk_tokens(text)))
    return {"words_title": words, "words_body": words, "cjk_title": chars, "cjk_body": chars}


def suggest_terms(title: str) -> list[str]:
    """The words of a title as a shopper types them (lower-cased, unstemmed): what autocomplete offers."""
    return list(dict.fromkeys(jieba_tokens(title)))
