"""Text analysis for lexical retrieval: words (jieba for Han, stemmed Latin) and CJK bigrams.

Every analysis NFKC-normalises (full-width ＡＢＣ１２３ → ABC123), lower-cases and drops punctuation
and whitespace. Three token streams come out of one pass over the text:

- words: Han runs cut by jieba in search mode (each word plus its dictionary 2- and 3-grams); kana
  and hangul runs whole; every other word split at letter/digit boundaries ("iphone15" → "iphone",
  "15"; decimals such as "3.5" stay whole) with its letter parts Snowball-stemmed ("sneakers" →
  "sneaker"). English stopwords are indexed, and a query leaves them out unless it has nothing else.
- cjk: overlapping bigrams of each run of CJK characters (han, kana, hangul, as Lucene's
  CJKBigramFilter), and the words stream's stems and numbers of non-CJK words.
- uni: every CJK character, in fields of their own with half the bigram fields' boost, so that a
  shared character adds recall without outweighing a shared bigram (a query 手机壳 ranks 手机
  products above a 手表 that only shares 手).
- pinyin / initials (titles only): each Han word of a document's title as toneless pinyin ("手机" →
  "shouji") and as its initials ("sj"); a query's Latin words as typed (lower-cased, unstemmed) are
  looked up there. Low-boost fields: a pinyin match never outranks a real one.

Traditional Han characters are folded to simplified (OpenCC t2s) before any of this, in documents
and queries alike, so 手錶 and 手表 are the same tokens.

Tokens never contain whitespace, so a field stored space-joined and read back by a whitespace
tokenizer is indexed exactly as analysed here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import regex

if TYPE_CHECKING:
    import jieba
    import Stemmer

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}"
# Token characters: letters, numbers, combining marks (Indic vowel signs, viramas), private use.
# "." "_" and "'" are kept only *inside* a word, between token characters ("3.5", "u.s", "don't").
_TOKEN_CHAR = r"[\p{L}\p{N}\p{M}\p{Co}]"
_NON_CJK_CHAR = rf"(?:(?![{_CJK}]){_TOKEN_CHAR})"
# One pass: a run of CJK characters, or a word of other token characters.
_CJK_RUN_OR_WORD = regex.compile(rf"(?P<cjk>[{_CJK}]+)|(?P<word>{_NON_CJK_CHAR}+(?:[._']{_NON_CJK_CHAR}+)*)")
_HAN_RUN = regex.compile(r"\p{Han}+")
# A word's parts: numbers (decimals whole: "3.5", "1.2.3") and runs of letters (with "._'" inside).
_PART = regex.compile(r"\p{N}+(?:\.\p{N}+)*|[\p{L}\p{M}\p{Co}]+(?:[._'][\p{L}\p{M}\p{Co}]+)*")
_LETTER = regex.compile(r"\p{L}")

# Lucene's English stopword set (EnglishAnalyzer.ENGLISH_STOP_WORDS_SET).
_LUCENE_STOPWORDS = "a an and are as at be but by for if in into is it no not of on or such that the their then there"
STOPWORDS: frozenset[str] = frozenset(f"{_LUCENE_STOPWORDS} these they this to was will with".split(" "))
# Longer words (and kana / hangul runs) are dropped, as Lucene's default maximum token length: no
# real word is that long, and a search engine's terms have a length limit.
MAX_WORD_CHARS = 255


_jieba_lock = threading.Lock()
_jieba: jieba.Tokenizer | None = None
_local = threading.local()


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


def _stemmer() -> Stemmer.Stemmer:
    """One Snowball stemmer per thread: a stemmer object keeps state between calls."""
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        import Stemmer as stemmer_module

        stemmer = _local.stemmer = stemmer_module.Stemmer("english")
    return stemmer


@functools.lru_cache(maxsize=200_000)
def stem(word: str) -> str:
    """The Snowball English stem of a lower-cased word ("sneakers" → "sneaker")."""
    return _stemmer().stemWord(word)


# jieba's own Han block (its `re_han_default` without the Latin part): other Han characters are single words.
_JIEBA_HAN = regex.compile(r"[\u4E00-\u9FD5]+")


def _jieba_cut(block: str) -> list[str]:
    """jieba's `cut(block, HMM=True)` of a block of `_JIEBA_HAN` characters, same words, fewer steps.

    jieba builds the whole DAG of dictionary words, then finds the most probable route over it; here
    both happen in one backward pass. Runs of single characters the dictionary does not know as a
    word go to jieba's HMM, as in jieba.
    """
    tokenizer = _tokenizer()
    freq = tokenizer.FREQ
    logtotal = math.log(tokenizer.total)
    n = len(block)
    score = [0.0] * (n + 1)
    end = list(range(n + 1))
    for idx in range(n - 1, -1, -1):
        best: float | None = None
        best_end = idx
        i = idx
        frag = block[idx]
        while i < n and frag in freq:
            f = freq[frag]
            if f:
                s = math.log(f) - logtotal + score[i + 1]
                if best is None or s >= best:  # ties: the longer word, as jieba's max over (score, end)
                    best, best_end = s, i
            i += 1
            frag = block[idx : i + 1]
        if best is None:
            best = math.log(freq.get(block[idx]) or 1) - logtotal + score[idx + 1]
        score[idx] = best
        end[idx] = best_end
    out: list[str] = []
    buf = ""
    x = 0
    while x < n:
        y = end[x] + 1
        if y - x == 1:
            buf += block[x]
        else:
            if buf:
                out.extend(_unknown_run(buf, freq))
                buf = ""
            out.append(block[x:y])
        x = y
    if buf:
        out.extend(_unknown_run(buf, freq))
    return out


def _unknown_run(buf: str, freq: dict[str, int]) -> list[str]:
    if len(buf) == 1:
        return [buf]
    if freq.get(buf):
        return list(buf)
    from jieba import finalseg

    return list(finalseg.cut(buf))


@functools.lru_cache(maxsize=100_000)
def _han_words(run: str) -> tuple[str, ...]:
    """jieba search-mode words of a run of Han characters: each word plus its dictionary 2- and 3-grams.

    Cached: brands, categories and stock phrases repeat across a catalogue's products.
    """
    freq = _tokenizer().FREQ
    out: list[str] = []
    pos = 0
    for block in _JIEBA_HAN.finditer(run):
        out.extend(run[pos : block.start()])  # Han characters outside jieba's range: one word each
        pos = block.end()
        for word in _jieba_cut(block.group()):
            if len(word) > 2:
                for size in (2, 3):
                    if len(word) > size:
                        for i in range(len(word) - size + 1):
                            gram = word[i : i + size]
                            if freq.get(gram):
                                out.append(gram)
            if len(word) <= MAX_WORD_CHARS:
                out.append(word)
    out.extend(run[pos:])
    return tuple(out)


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


_ANY_HAN = regex.compile(r"\p{Han}")


def _converter() -> object:
    converter = getattr(_local, "t2s", None)
    if converter is None:
        import opencc

        converter = _local.t2s = opencc.OpenCC("t2s")
    return converter


def fold_han(text: str) -> str:
    """Traditional Han characters as simplified (手錶 → 手表); text without Han characters unchanged."""
    if not _ANY_HAN.search(text):
        return text
    converter = _converter()
    try:
        return converter.convert(text)  # type: ignore[attr-defined]
    except UnicodeError:  # a lone surrogate cannot cross into OpenCC: convert the Han runs alone
        return _HAN_RUN.sub(lambda m: converter.convert(m.group()), text)  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=100_000)
def pinyin_of(word: str) -> tuple[str, str]:
    """A Han word's toneless pinyin and initials ("手机" → ("shouji", "sj")); ("", "") for non-Han words."""
    if not _ANY_HAN.search(word):
        return "", ""
    from pypinyin import Style, lazy_pinyin

    syllables = [s for s in lazy_pinyin(word, style=Style.NORMAL, errors="ignore") if s.isascii() and s.isalpha()]
    return "".join(syllables), "".join(s[0] for s in syllables)


def word_parts(word: str) -> list[str]:
    """A lower-cased non-CJK word split at letter/digit boundaries, its letter parts stemmed."""
    return [stem(p) if _LETTER.match(p) else p for p in _PART.findall(word)]


@dataclass(frozen=True)
class Analysis:
    """How text becomes the lexical index's tokens; the module's functions use `ANALYSIS`.

    `stem`: Snowball-stem the letter parts of non-CJK words. `split`: split those words at
    letter/digit boundaries (decimals whole).
    `joined`: also index a word split at letter/digit boundaries whole ("iphone15").
    `stopwords`: "index" keeps them in documents and drops them from queries that have other tokens;
    "drop" removes them everywhere; "keep" treats them as any word.
    `unigrams`: "lone" gives a CJK unigram only for a run of one character; "all" gives every
    character of every run as well; "field" puts every character in separate `uni_*` fields.
    `latin_in_cjk`: the cjk stream repeats the words stream's non-CJK word parts.
    `fold`: fold traditional Han characters to simplified. `pinyin`: index title Han words' pinyin
    and initials (fields `pinyin_title`, `initials_title`, boost `pinyin_boost`).
    `words_boost`, `cjk_boost`, `uni_boost`: each stream's title field boost (its body field: half).
    """

    stem: bool = True
    split: bool = True
    joined: bool = False
    stopwords: str = "index"
    unigrams: str = "field"
    latin_in_cjk: bool = True
    words_boost: float = 2.0
    cjk_boost: float = 2.0
    uni_boost: float = 1.0
    fold: bool = True
    pinyin: bool = True
    pinyin_boost: float = 0.5

    def __post_init__(self) -> None:
        for name, allowed in (("stopwords", ("index", "drop", "keep")), ("unigrams", ("lone", "all", "field"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("words_boost", "cjk_boost", "uni_boost", "pinyin_boost"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        object.__setattr__(self, "_bodies", {})  # short body text -> its streams (`_body_streams`)

    @property
    def field_boosts(self) -> dict[str, float]:
        boosts = {
            "words_title": self.words_boost,
            "words_body": self.words_boost / 2,
            "cjk_title": self.cjk_boost,
            "cjk_body": self.cjk_boost / 2,
        }
        if self.unigrams == "field":
            boosts |= {"uni_title": self.uni_boost, "uni_body": self.uni_boost / 2}
        if self.pinyin:
            boosts |= {"pinyin_title": self.pinyin_boost, "initials_title": self.pinyin_boost}
        return boosts

    def streams(
        self, text: str, *, query: bool = False, pinyin: bool = True, typed: list[str] | None = None
    ) -> dict[str, list[str]]:
        """{"words", "cjk", "uni", "pinyin", "initials"} token lists of one text (`uni` empty unless
        unigrams="field"; `pinyin` and `initials` empty unless pinyin: a document's Han words, a query's
        Latin words as typed; `pinyin=False`: leave them empty). `typed`: also appends the text's
        words as `suggest_terms` sees them, repeats included, in the same pass."""
        pinyin_on = self.pinyin and pinyin
        words: list[str] = []
        cjk: list[str] = []
        uni: list[str] = []
        stops: list[str] = []
        pinyin: list[str] = []
        initials: list[str] = []
        text = normalize(text).lower() if text else ""
        if self.fold:
            text = fold_han(text)
        for match in _CJK_RUN_OR_WORD.finditer(text):
            run = match.group("cjk")
            if run is None:
                word = match.group("word")
                if query and pinyin_on and word.isascii() and word.isalpha():
                    pinyin.append(word)
                    initials.append(word)
                if typed is not None and word not in STOPWORDS and len(word) <= MAX_WORD_CHARS:
                    typed.append(word)
                if self.stopwords != "keep" and word in STOPWORDS:
                    if query:
                        stops.append(word)
                    elif self.stopwords == "index":
                        words.append(word)
                    continue
                parts = self._parts(word) if len(word) <= MAX_WORD_CHARS else []
                if self.joined and len(parts) > 1:
                    parts.append(word)
                words.extend(parts)
                if self.latin_in_cjk:
                    cjk.extend(parts)
                continue
            han_words = list(self._cjk_words(run))
            words.extend(han_words)
            if typed is not None:
                typed.extend(han_words)
            self._cjk_grams(run, cjk, uni)
            if pinyin_on and not query:
                for han in han_words:
                    full, short = pinyin_of(han)
                    if full:
                        pinyin.append(full)
                        initials.append(short)
        if stops and not words and not cjk and self.stopwords == "index":
            words.extend(stops)  # a query of stopwords only ("the who") still matches them
        return {"words": words, "cjk": cjk, "uni": uni, "pinyin": pinyin, "initials": initials}

    def _parts(self, word: str) -> list[str]:
        if self.stem and self.split:
            return word_parts(word)
        if self.split:
            return _PART.findall(word)
        return [stem(word) if self.stem else word]

    @staticmethod
    def _cjk_words(run: str) -> Iterator[str]:
        pos = 0
        for han in _HAN_RUN.finditer(run):
            if pos < han.start() <= pos + MAX_WORD_CHARS:
                yield run[pos : han.start()]  # kana / hangul whole
            yield from _han_words(han.group())
            pos = han.end()
        if pos < len(run) <= pos + MAX_WORD_CHARS:
            yield run[pos:]

    def _cjk_grams(self, run: str, cjk: list[str], uni: list[str]) -> None:
        if len(run) == 1:
            (uni if self.unigrams == "field" else cjk).append(run)
        elif self.unigrams == "all":
            for i, char in enumerate(run):
                cjk.append(char)
                if i + 1 < len(run):
                    cjk.append(run[i : i + 2])
        else:
            cjk.extend(run[i : i + 2] for i in range(len(run) - 1))
            if self.unigrams == "field":
                uni.extend(run)

    def _fields(self, title: dict[str, list[str]], body: dict[str, list[str]]) -> dict[str, list[str]]:
        fields = {
            "words_title": title["words"],
            "words_body": body["words"],
            "cjk_title": title["cjk"],
            "cjk_body": body["cjk"],
        }
        if self.unigrams == "field":
            fields |= {"uni_title": title["uni"], "uni_body": body["uni"]}
        if self.pinyin:
            fields |= {"pinyin_title": title["pinyin"], "initials_title": title["initials"]}
        return fields

    def product(self, title: str, body: str, typed: list[str] | None = None) -> dict[str, list[str]]:
        """`typed`: also appends the title's `suggest_terms` words (repeats included)."""
        return self._fields(self.streams(title, typed=typed), self._body_streams(body))

    def _body_streams(self, body: str) -> dict[str, list[str]]:
        """The body's streams, without pinyin (titles only); short bodies are cached: most are a
        brand and a category, repeated across a catalogue."""
        if len(body) > _BODY_CACHED_CHARS:
            return self.streams(body, pinyin=False)
        cache: dict[str, dict[str, tuple[str, ...]]] = self._bodies  # type: ignore[attr-defined]
        kept = cache.get(body)
        if kept is None:
            kept = cache[body] = {name: tuple(tokens) for name, tokens in self.streams(body, pinyin=False).items()}
            if len(cache) > _BODY_CACHE_SIZE:  # the oldest entry goes (dict order)
                with contextlib.suppress(KeyError, StopIteration, RuntimeError):  # another thread may trim too
                    del cache[next(iter(cache))]
        return {name: list(tokens) for name, tokens in kept.items()}

    def query(self, text: str) -> dict[str, list[str]]:
        distinct = {name: list(dict.fromkeys(tokens)) for name, tokens in self.streams(text, query=True).items()}
        return self._fields(distinct, distinct)


_BODY_CACHED_CHARS = 200
_BODY_CACHE_SIZE = 20_000

ANALYSIS = Analysis()


def jieba_tokens(text: str) -> list[str]:
    """The words stream of a document's text (jieba words, kana/hangul runs, stemmed word parts)."""
    return ANALYSIS.streams(text)["words"]


def cjk_tokens(text: str) -> list[str]:
    """The cjk and uni streams of a document's text as one bag (CJK bigrams, other word parts, CJK
    characters), for an engine with a single CJK field."""
    streams = ANALYSIS.streams(text)
    return streams["cjk"] + streams["uni"]


# ---------------------------------------------------------------------- the lexical index's fields
# What the embedded lexical engine indexes: each field is a list of tokens (pre-tokenised, stored
# space-joined), scored by BM25 per field and summed with FIELD_BOOSTS. Changing any analysis or
# field changes ANALYSIS_VERSION, which makes a store rebuild its lexical index from its products.

ANALYSIS_VERSION = 3
FIELD_BOOSTS: dict[str, float] = ANALYSIS.field_boosts
LEXICAL_FIELDS: tuple[str, ...] = tuple(FIELD_BOOSTS)


def analyze_product(title: str, body: str) -> dict[str, list[str]]:
    """A product's tokens per lexical field (`body`: everything indexed besides the title)."""
    return ANALYSIS.product(title, body)


def analyze_query(text: str) -> dict[str, list[str]]:
    """A query's distinct tokens per lexical field, in order of first occurrence."""
    return ANALYSIS.query(text)


_AS_TYPED = Analysis(stem=False, split=False, stopwords="drop", pinyin=False)


def suggest_terms(title: str) -> list[str]:
    """The words of a title as a shopper types them (lower-cased, unstemmed, no stopwords): what
    autocomplete offers and typo correction compares against."""
    return list(dict.fromkeys(_AS_TYPED.streams(title)["words"]))


def analyze_product_suggest(title: str, body: str) -> tuple[dict[str, list[str]], list[str]]:
    """`analyze_product` and `suggest_terms(title)` together, the title read once."""
    typed: list[str] = []
    fields = ANALYSIS.product(title, body, typed=typed)
    return fields, list(dict.fromkeys(typed))
