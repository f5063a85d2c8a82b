"""The two lexical analyses: jieba search-mode words and CJK unigrams + bigrams."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import middleware.text as text_module
from middleware.text import FTS5_TOKENIZE, cjk_tokens, jieba_tokens


def test_cjk_tokens_unigrams_and_overlapping_bigrams_per_run() -> None:
    assert cjk_tokens("珐琅表") == ["珐", "珐琅", "琅", "琅表", "表"]
    # bigrams never cross a non-CJK boundary; a lone CJK character is its own unigram
    assert cjk_tokens("手表 礼盒") == ["手", "手表", "表", "礼", "礼盒", "盒"]
    assert cjk_tokens("T恤") == ["t", "恤"]


def test_cjk_tokens_keep_latin_words_and_numbers_whole_lower_cased() -> None:
    assert cjk_tokens("Apple iPhone14 Pro 3.5寸") == ["apple", "iphone14", "pro", "3.5", "寸"]
    assert cjk_tokens("G-SHOCK") == ["g", "shock"]


def test_cjk_tokens_cover_kana_and_hangul() -> None:
    assert cjk_tokens("한국어") == ["한", "한국", "국", "국어", "어"]
    assert cjk_tokens("カナ") == ["カ", "カナ", "ナ"]


def test_full_width_forms_are_normalised() -> None:
    assert cjk_tokens("ＡＢＣ１２３，手表") == ["abc123", "手", "手表", "表"]
    assert jieba_tokens("ＡＢＣ１２３") == ["abc123"]


def test_jieba_search_mode_adds_dictionary_subwords() -> None:
    tokens = jieba_tokens("小众设计师珐琅手表")
    assert "设计师" in tokens and "设计" in tokens  # search mode: the word and its 2-grams
    assert "珐琅" in tokens and "手表" in tokens


def test_jieba_keeps_latin_and_numbers_whole_and_drops_punctuation() -> None:
    assert jieba_tokens("Apple iPhone14 Pro，3.5寸！！") == ["apple", "iphone14", "pro", "3.5", "寸"]
    assert jieba_tokens("Internationalization") == ["internationalization"]  # never split into grams


@pytest.mark.parametrize("analyse", [jieba_tokens, cjk_tokens])
@pytest.mark.parametrize("blank", ["", "   ", "，。！？", "!!! --- ***", "😀🎁", "\x00\t\n"])
def test_no_tokens_from_blank_or_punctuation(analyse, blank: str) -> None:
    assert analyse(blank) == []


_ALPHABET = st.sampled_from(
    [
        *"abcXYZ09 .-_'+#:\"*()，。！手表珐琅小众设计师カナ한국éüÅ１２ＡＢ\u0301\u093f\u094d",
        *["हिन्दी", "3.5", "don't", "c++", "e.g.", "..", "_x_"],
    ]
)


@settings(max_examples=150, deadline=None, derandomize=True)  # deterministic runs
@given(st.lists(_ALPHABET, max_size=12).map("".join))
def test_every_token_is_one_fts5_token(text: str) -> None:
    """Stored space-joined, the tokens read back through FTS5's tokenizer unchanged."""
    conn = sqlite3.connect(":memory:")
    conn.execute(f'CREATE VIRTUAL TABLE t USING fts5(body, tokenize="{FTS5_TOKENIZE}")')
    conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
    for analyse in (jieba_tokens, cjk_tokens):
        tokens = analyse(text)
        assert all(tokens), tokens
        conn.execute("DELETE FROM t")
        conn.execute("INSERT INTO t (rowid, body) VALUES (1, ?)", (" ".join(tokens),))
        stored = [row[0] for row in conn.execute("SELECT term FROM v ORDER BY offset")]
        assert stored == tokens


def test_jieba_initialises_once_quietly_and_thread_safely(monkeypatch, capfd) -> None:
    monkeypatch.setattr(text_module, "_jieba", None)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(jieba_tokens("送女友的轻奢小众手表"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 6 and all(r == results[0] for r in results)
    assert "手表" in results[0]
    err = capfd.readouterr().err
    assert "prefix dict" not in err and "Loading model" not in err
