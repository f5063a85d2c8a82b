"""Highlighted fragments: matched spans of the original text, tagged, the rest HTML-escaped."""

from __future__ import annotations

import html

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.highlight import highlight_fragments


def hl(text: str, query: str, **kw) -> list[str]:
    return highlight_fragments(text, query, pre="<em>", post="</em>", **kw)


def test_a_chinese_phrase_is_highlighted_whole_by_its_bigrams() -> None:
    assert hl("轻奢小众手表 送女友生日礼物", "送女友") == ["轻奢小众手表 <em>送女友</em>生日礼物"]


def test_a_plural_query_highlights_the_singular_word_in_its_original_case() -> None:
    assert hl("Running Sneaker for men", "sneakers") == ["Running <em>Sneaker</em> for men"]


def test_letter_digit_parts_and_full_width_text_map_back_to_original_offsets() -> None:
    assert hl("Apple iPhone15 Pro", "iphone 15") == ["Apple <em>iPhone15</em> Pro"]
    assert hl("ＡＰＰＬＥ ｉＰｈｏｎｅ　１５ 手机壳", "iphone15") == [
        "ＡＰＰＬＥ <em>ｉＰｈｏｎｅ</em>　<em>１５</em> 手机壳"
    ]


def test_a_lone_character_query_highlights_that_character_only() -> None:
    assert hl("小米手表 表带", "表") == ["小米手<em>表</em> <em>表</em>带"]
    assert hl("小米手表", "手机壳") == []  # no bigram in common: the lone 手 does not match


def test_stopwords_are_not_highlighted_unless_the_query_is_only_stopwords() -> None:
    assert hl("shoes for the beach", "the beach") == ["shoes for the <em>beach</em>"]
    assert hl("To Be or not", "to be") == ["<em>To</em> <em>Be</em> or not"]


def test_text_is_escaped_and_tags_are_not() -> None:
    out = highlight_fragments('<i>"sneakers" & co</i>', "sneaker", pre="<mark>", post="</mark>", fragment_chars=100)
    assert out == ["&lt;i&gt;&quot;<mark>sneakers</mark>&quot; &amp; co&lt;/i&gt;"]


def test_nothing_matching_gives_no_fragments() -> None:
    assert hl("Running Sneaker", "boots") == []
    assert hl("", "boots") == []
    assert hl("Running Sneaker", "") == []
    assert hl("Running Sneaker", "，。!!") == []


def test_long_text_gives_fragments_around_the_best_covered_matches() -> None:
    filler = "lorem ipsum dolor sit amet " * 10
    text = filler + "one sneaker here " + filler + "red running sneakers for men " + filler
    out = hl(text, "running sneakers", fragment_chars=60, fragments=2)
    assert len(out) == 2
    assert "<em>running</em> <em>sneakers</em>" in out[0]  # both query words: the best fragment first
    assert "one <em>sneaker</em> here" in out[1]
    assert all(len(html.unescape(f.replace("<em>", "").replace("</em>", ""))) <= 60 for f in out)
    assert len(hl(text, "running sneakers", fragment_chars=60, fragments=1)) == 1


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="fragment_chars"):
        hl("text", "text", fragment_chars=0)
    with pytest.raises(ValueError, match="fragments"):
        hl("text", "text", fragments=-1)
    with pytest.raises(TypeError, match="query"):
        highlight_fragments("text", None, pre="<em>", post="</em>", fragment_chars=10, fragments=1)  # type: ignore[arg-type]


_PIECES = st.sampled_from(
    [
        *"ab Z9 .-_'&<>\"，。手机壳送女友表カナ한국éÅ１２ＡＢ\u0301\u093fİß",
        *["sneakers", "Sneaker", "iPhone15", "3.5", "the", "ﬁ", "\ud800", "<em>", "&amp;"],
    ]
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.one_of(st.text(max_size=80), st.lists(_PIECES, max_size=30).map("".join)),
    st.one_of(st.text(max_size=12), st.lists(_PIECES, max_size=4).map("".join)),
    st.integers(min_value=1, max_value=50),
    st.integers(min_value=1, max_value=4),
)
def test_fragments_are_substrings_of_the_original(text: str, query: str, size: int, count: int) -> None:
    out = highlight_fragments(text, query, pre="<em>", post="</em>", fragment_chars=size, fragments=count)
    assert len(out) <= count
    for fragment in out:
        assert "<em>" in fragment  # escaped text never holds a "<"
        plain = html.unescape(fragment.replace("<em>", "").replace("</em>", ""))
        assert plain in text
