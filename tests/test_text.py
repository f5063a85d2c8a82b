"""The lexical analysis: what a product's and a query's tokens are, field by field."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import middleware.text as text_module
from middleware.text import (
    FIELD_BOOSTS,
    LEXICAL_FIELDS,
    Analysis,
    analyze_product,
    analyze_product_suggest,
    analyze_query,
    cjk_tokens,
    jieba_tokens,
    suggest_terms,
)


def matching_fields(query: str, title: str, body: str = "") -> set[str]:
    """The fields in which the query shares at least one token with the product."""
    product = analyze_product(title, body)
    return {f for f, tokens in analyze_query(query).items() if set(tokens) & set(product[f])}


def test_fields_and_boosts_are_one_contract() -> None:
    assert tuple(FIELD_BOOSTS) == LEXICAL_FIELDS
    assert all(boost > 0 for boost in FIELD_BOOSTS.values())
    assert set(analyze_product("手表", "礼盒")) == set(LEXICAL_FIELDS)
    assert set(analyze_query("手表")) == set(LEXICAL_FIELDS)
    assert FIELD_BOOSTS["words_title"] > FIELD_BOOSTS["words_body"]


def test_plural_and_singular_match_by_stem() -> None:
    assert analyze_query("sneaker")["words_title"] == analyze_query("sneakers")["words_title"]
    assert "words_title" in matching_fields("sneakers", "Running Sneaker for men")
    assert "words_title" in matching_fields("running shoes", "Men's Run Shoe")


def test_letters_and_digits_split_so_joined_and_spaced_forms_match() -> None:
    assert analyze_query("iphone15")["words_title"] == analyze_query("iPhone 15")["words_title"]
    assert {"words_title", "cjk_title"} <= matching_fields("iphone15", "Apple iPhone 15 Pro")
    assert {"words_title", "cjk_title"} <= matching_fields("iPhone 15", "iPhone15 手机壳")


def test_decimals_stay_whole() -> None:
    tokens = analyze_query("3.5寸 1.9 cu. ft.")["words_title"]
    assert "3.5" in tokens and "1.9" in tokens
    assert "3" not in tokens and "5" not in tokens


def test_cjk_fields_hold_bigrams_and_unigrams_live_in_lower_boosted_fields() -> None:
    query = analyze_query("手机壳")
    assert query["cjk_title"] == ["手机", "机壳"]
    assert "手" not in query["cjk_title"] and "手" not in query["cjk_body"]
    assert query["uni_title"] == ["手", "机", "壳"]
    assert FIELD_BOOSTS["uni_title"] < FIELD_BOOSTS["cjk_title"]
    assert FIELD_BOOSTS["uni_body"] < FIELD_BOOSTS["cjk_body"]
    # a watch shares only the character 手 with a phone-case query: no bigram, no word
    assert matching_fields("手机壳", "小米手表 运动版") == {"uni_title"}
    assert {"cjk_title", "words_title", "uni_title"} <= matching_fields("手机壳", "苹果手机壳 硅胶")


def test_a_shared_character_ranks_below_every_shared_bigram() -> None:
    """Scored as the engine scores (BM25 per field in tantivy, summed with the field boosts)."""
    from benchmarks.lexical_analysis import TantivyIndex

    titles = [
        "小米手表 运动版 智能手表",
        "苹果手机壳 硅胶 防摔",
        "华为手机 壳膜套装",
        "手提包 女士",
        "OPPO手机 5G",
        "手工皂",
    ]
    index = TantivyIndex([analyze_product(t, "") for t in titles], titles, FIELD_BOOSTS)
    ranked = index.search(analyze_query("手机壳"))
    assert ranked[0] == "苹果手机壳 硅胶 防摔"
    by_bigram = {"苹果手机壳 硅胶 防摔", "华为手机 壳膜套装", "OPPO手机 5G"}
    assert set(ranked[: len(by_bigram)]) == by_bigram
    assert ranked.index("小米手表 运动版 智能手表") > len(by_bigram) - 1


def test_a_lone_cjk_character_is_its_own_token_on_both_sides() -> None:
    assert analyze_query("表")["uni_title"] == ["表"]
    assert "uni_title" in matching_fields("男", "T恤 男 夏季")
    assert "words_title" in matching_fields("男", "T恤 男 夏季")  # jieba's word too


def test_kana_and_hangul_bigrams_and_whole_runs() -> None:
    assert analyze_product("한국어", "")["cjk_title"] == ["한국", "국어"]
    assert cjk_tokens("한국어") == ["한국", "국어", "한", "국", "어"]
    assert jieba_tokens("한국어 カナ") == ["한국어", "カナ"]


def test_jieba_search_mode_adds_dictionary_subwords() -> None:
    tokens = jieba_tokens("小众设计师珐琅手表")
    assert "设计师" in tokens and "设计" in tokens  # search mode: the word and its 2-grams
    assert "珐琅" in tokens and "手表" in tokens


def test_jieba_cut_is_jiebas_own() -> None:
    tokenizer = text_module._tokenizer()
    for text in [
        "送女友的轻奢小众手表",
        "南京市长江大桥",
        "我来到北京清华大学",
        "小米手环7代NFC版",
        "他来到了网易杭研大厦",
    ]:
        for block in text_module._JIEBA_HAN.findall(text):
            assert text_module._jieba_cut(block) == list(tokenizer.cut(block, HMM=True))


def test_stopwords_are_left_out_of_queries_that_have_other_words() -> None:
    assert analyze_query("sneakers for the beach")["words_title"] == ["sneaker", "beach"]
    assert "for" in analyze_product("Sneakers for men", "")["words_title"]  # indexed all the same


def test_a_query_of_stopwords_only_still_matches() -> None:
    assert analyze_query("The Who")["words_title"] == ["who"]
    assert analyze_query("to be or not to be")["words_title"] == ["to", "be", "or", "not"]
    assert "words_title" in matching_fields("to be or not to be", "To Be or Not to Be (DVD)")


def test_full_width_forms_are_folded() -> None:
    assert analyze_query("ＡＢＣ１２３，手表") == analyze_query("abc123,手表")
    assert jieba_tokens("ＡＢＣ１２３") == ["abc", "123"]
    assert "words_title" in matching_fields("ＩＰＨＯＮＥ１５", "iPhone 15")


def test_traditional_characters_fold_to_simplified() -> None:
    assert analyze_query("手錶 電腦") == analyze_query("手表 电脑")
    assert analyze_product("復古手錶", "") == analyze_product("复古手表", "")
    assert Analysis(fold=False).query("手錶")["cjk_title"] == ["手錶"]


def test_pinyin_and_initials_of_title_words() -> None:
    product = analyze_product("华为手机 Mate", "苹果")
    assert product["pinyin_title"] == ["huawei", "shouji"] and product["initials_title"] == ["hw", "sj"]
    query = analyze_query("Shouji SJ")
    assert query["pinyin_title"] == ["shouji", "sj"] and query["initials_title"] == ["shouji", "sj"]
    assert analyze_query("手机")["pinyin_title"] == []  # Han queries match Han tokens, never homophones
    assert FIELD_BOOSTS["pinyin_title"] < FIELD_BOOSTS["uni_title"] < FIELD_BOOSTS["words_title"]
    assert "pinyin_title" not in Analysis(pinyin=False).field_boosts


@pytest.mark.parametrize("analyse", [jieba_tokens, cjk_tokens])
@pytest.mark.parametrize("blank", ["", "   ", "，。！？", "!!! --- ***", "😀🎁", "\x00\t\n"])
def test_no_tokens_from_blank_or_punctuation(analyse, blank: str) -> None:
    assert analyse(blank) == []


def test_every_variant_yields_whitespace_free_tokens_per_declared_field() -> None:
    text = "Apple iPhone15 Pro，3.5寸 手机壳 送女友 T恤 the 한국어"
    for analysis in [
        Analysis(),
        Analysis(unigrams="all", stopwords="keep"),
        Analysis(unigrams="lone", latin_in_cjk=False),
        Analysis(unigrams="field", joined=True, stopwords="drop", stem=False, split=False),
    ]:
        fields = analysis.product(text, text)
        assert set(fields) == set(analysis.field_boosts)
        assert all(t and not any(c.isspace() for c in t) for tokens in fields.values() for t in tokens)


_ALPHABET = st.sampled_from(
    [
        *"abcXYZ09 .-_'+#:\"*()，。！手表珐琅小众设计师カナ한국éüÅ１２ＡＢ\u0301\u093f\u094d",
        *["हिन्दी", "3.5", "don't", "c++", "e.g.", "..", "_x_", "the", "\ud800", "ﬁ"],
    ]
)


@settings(max_examples=200, deadline=None, derandomize=True)  # deterministic runs
@given(st.lists(_ALPHABET, max_size=12).map("".join))
def test_tokens_are_non_empty_and_whitespace_free(text: str) -> None:
    """Stored space-joined and read back by a whitespace tokenizer, the tokens come back unchanged."""
    for tokens in [*analyze_product(text, text).values(), *analyze_query(text).values()]:
        assert " ".join(tokens).split() == tokens


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(_ALPHABET, max_size=12).map("".join), st.lists(_ALPHABET, max_size=6).map("".join))
def test_one_pass_gives_the_fields_and_the_suggest_terms_of_separate_passes(title: str, body: str) -> None:
    fields, suggest = analyze_product_suggest(title, body)
    assert fields == analyze_product(title, body)
    assert suggest == suggest_terms(title)


def test_suggest_terms_of_one_pass_on_product_titles() -> None:
    titles = [
        "The Sneakers for Men (2-Pack)",
        "iPhone15 Pro 手机壳 防摔",
        "復古手錶 ＡＢＣ",
        "a" * 300 + " 手表 and the",
    ]
    for title in titles:
        assert analyze_product_suggest(title, "Brand 服饰")[1] == suggest_terms(title)


def test_a_cached_body_analysis_is_not_changed_by_its_callers() -> None:
    first = analyze_product("手表", "Hampton Bay 家居")
    first["words_body"].append("mutated")
    first["cjk_body"].clear()
    assert analyze_product("耳机", "Hampton Bay 家居")["words_body"] == ["hampton", "bay", "家居"]
    assert (
        analyze_product("耳机", "Hampton Bay 家居")["cjk_body"]
        == analyze_product("耳机", "Hampton Bay 家居 ")["cjk_body"]
    )


@pytest.mark.parametrize(
    ("options", "name"),
    [({"stopwords": "remove"}, "stopwords"), ({"unigrams": 2}, "unigrams"), ({"uni_boost": 0}, "uni_boost")],
)
def test_bad_analysis_options_are_named(options: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Analysis(**options)


def test_overlong_words_are_dropped() -> None:
    assert jieba_tokens("a" * 300 + " ok") == ["ok"]
    assert jieba_tokens("カ" * 300 + "手表" + "한" * 300) == ["手表"]
    fields = analyze_product("カ" * 300 + " " + "手" * 300, "")
    assert max(len(t) for tokens in fields.values() for t in tokens) <= text_module.MAX_WORD_CHARS


def test_jieba_initialises_once_quietly_and_thread_safely(monkeypatch, capfd) -> None:
    monkeypatch.setattr(text_module, "_jieba", None)
    text_module._han_words.cache_clear()
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(jieba_tokens("送女友的轻奢小众手表 running sneakers"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 6 and all(r == results[0] for r in results)
    assert "手表" in results[0] and "sneaker" in results[0]
    err = capfd.readouterr().err
    assert "prefix dict" not in err and "Loading model" not in err
