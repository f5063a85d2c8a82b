"""The storefront primitives (count, listing, facets, highlight, prefix and fuzzy terms), the same
behaviour asserted on both backends over one catalog.

"opensearch" runs when OPENSEARCH_URL is set (`tests/opensearch/with-node python -m pytest ...`); its
index gets a small `index.max_result_window`, so deep pages go past it. The expected answers come from
the catalog itself (`Filters.matches`, a plain word split), never from either engine.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from middleware.backends.base import (
    Backend,
    FacetRange,
    FacetSpec,
    FacetValue,
    HighlightTags,
    MatchSet,
    SortKey,
    TermCount,
)
from middleware.products import Filters, Product
from tests.support.stores import SHARDS, throwaway_opensearch

SMALL_RESULT_WINDOW = 100  # opensearch: listings past it walk pages with search_after

N_GENERATED = 600
COLORS = ("red", "blue", "green", "black", "white")
BRANDS = ("Acme", "Borealis", "Cobalt", "Dynamo")


def brand_of(i: int) -> str | None:
    slot = i % 15  # Acme 6/15, Borealis 4/15, Cobalt 3/15, Dynamo 1/15, none 1/15
    if slot < 6:
        return "Acme"
    if slot < 10:
        return "Borealis"
    if slot < 13:
        return "Cobalt"
    return "Dynamo" if slot == 13 else None


def generated(i: int) -> Product:
    noun = "sneakers" if i % 25 < 12 else ("boots" if i % 2 else "jacket")  # sneakers: 288 of 600
    words = [COLORS[i % 5]]
    if i % 7 == 0:
        words.append("sleek")
    if i % 11 == 0:
        words.append("snug")
    title = " ".join([*words, noun])
    description = "waterproof leather upper" if i % 3 == 0 else ("breathable mesh" if i % 3 == 1 else None)
    return Product(
        id=f"p{i:03d}",
        title=title,
        description=description,
        brand=brand_of(i),
        category=[["shoes"], ["apparel"], ["outdoor", "shoes"]][i % 3],
        price=None if i % 50 == 0 else float((i * 37) % 200) + 0.5,  # repeats: ties broken by id
        sales=(i * 13) % 97,
        stock=None if i % 4 == 0 else i % 5,
    )


HTML_PRODUCT = Product(
    id="html1",
    title="Trail <b>runner</b> & socks",
    description='Grips "wet" rock <script>alert(1)</script> runner',
    brand="Acme",
    category=["outdoor"],
    price=42.5,
    sales=5,
)
CJK_PRODUCT = Product(
    id="zh1",
    title="红色连衣裙 夏季新款",
    description="纯棉 轻薄",
    brand="Ember",
    category=["apparel"],
    price=199.5,
    sales=3,
)
CATALOG: list[Product] = [generated(i) for i in range(N_GENERATED)] + [HTML_PRODUCT, CJK_PRODUCT]
BY_ID = {p.id: p for p in CATALOG}


# ------------------------------------------------------------------ the reference answers


def words(product: Product) -> set[str]:
    text = " ".join([product.title, product.description or "", product.brand or "", *product.category])
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def title_words(product: Product) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", product.title.lower()))


def expected_set(text: str | None, filters: Filters | None = None, ids: tuple[str, ...] = ()) -> list[Product]:
    """MatchSet semantics on the catalog: (any token of text, or every product when None; or ids) AND filters."""
    tokens = set(re.findall(r"[a-z0-9]+", text.lower())) if text is not None else None
    out = []
    for p in CATALOG:
        matched = tokens is None or bool(tokens & words(p)) or p.id in ids
        if matched and (filters is None or filters.matches(p)):
            out.append(p)
    return out


def expected_order(products: list[Product], field: str, descending: bool) -> list[str]:
    """Sorted by the field, missing values last either way, ties by id."""
    present = [p for p in products if getattr(p, field) is not None]
    missing = sorted(p.id for p in products if getattr(p, field) is None)
    present.sort(key=lambda p: p.id)
    present.sort(key=lambda p: getattr(p, field), reverse=descending)
    return [p.id for p in present] + missing


def value_counts(products: list[Product], field: str) -> list[tuple[str, int]]:
    counts: Counter[str] = Counter()
    for p in products:
        values = p.category if field == "category" else ([p.brand] if p.brand else [])
        counts.update(set(values))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


# ------------------------------------------------------------------ the backends


def _embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    from middleware.backends.embedded import EmbeddedBackend

    backend = EmbeddedBackend(tmp_path_factory.mktemp("primitives"))
    backend.upsert(CATALOG, None)
    yield backend
    backend.close()


def _opensearch() -> Iterator[Backend]:
    with throwaway_opensearch(shards=SHARDS) as backend:
        backend.upsert(CATALOG, None)
        backend.client.indices.put_settings(
            index=backend.read_alias, body={"index": {"max_result_window": SMALL_RESULT_WINDOW}}
        )
        backend.refresh()
        yield backend


@pytest.fixture(scope="module", params=["embedded", "opensearch"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    if request.param == "embedded":
        yield from _embedded(tmp_path_factory)
    else:
        yield from _opensearch()


ACME = Filters(brand=["Acme"])
CHEAP_IN_STOCK = Filters(price_max=100.0, in_stock=True)


# ------------------------------------------------------------------ count_matches


class TestCount:
    def test_exact_count_of_a_frequent_word(self, backend: Backend) -> None:
        assert len(expected_set("sneakers")) == 288
        assert backend.count_matches(MatchSet(text="sneakers")) == 288

    @pytest.mark.parametrize(
        "filters",
        [
            ACME,
            CHEAP_IN_STOCK,
            Filters(category=["outdoor"], price_min=50.0),
            Filters(exclude=[{"brand": ["Acme"]}]),
            Filters(category=["shoes"], exclude=[{"price_min": 60.0, "price_max": 120.0}, {"in_stock": True}]),
        ],
    )
    def test_filters_restrict_the_count(self, backend: Backend, filters: Filters) -> None:
        want = len(expected_set("sneakers", filters))
        assert 0 < want < 288
        assert backend.count_matches(MatchSet(text="sneakers", filters=filters)) == want

    def test_no_text_counts_every_product_under_the_filters(self, backend: Backend) -> None:
        assert backend.count_matches(MatchSet()) == len(CATALOG)
        for filters in (ACME, CHEAP_IN_STOCK, Filters(category=["outdoor"])):
            assert backend.count_matches(MatchSet(filters=filters)) == len(expected_set(None, filters))
            # no text is every product already: ids add nothing
            with_ids = MatchSet(filters=filters, ids=("p001", "p002"))
            assert backend.count_matches(with_ids) == len(expected_set(None, filters))
            (brand,) = backend.facets(with_ids, [FacetSpec("brand")])
            assert sum(v.count for v in brand.values or []) == sum(1 for p in expected_set(None, filters) if p.brand)

    def test_any_token_matches(self, backend: Backend) -> None:
        want = len(expected_set("sneakers waterproof"))
        assert want > 288
        assert backend.count_matches(MatchSet(text="sneakers waterproof")) == want

    def test_ids_add_products_still_filtered(self, backend: Backend) -> None:
        boots = [p.id for p in CATALOG if "boots" in p.title][:6]
        ids = (*boots, "zh1", "no-such-id")
        assert backend.count_matches(MatchSet(text="sneakers", ids=ids)) == 288 + 7
        want = len(expected_set("sneakers", ACME, ids))
        assert want < 288 + 7
        assert backend.count_matches(MatchSet(text="sneakers", filters=ACME, ids=ids)) == want

    def test_pasted_document_is_bounded_not_refused(self, backend: Backend) -> None:
        noise = " ".join(f"zq{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}x" for i in range(3000))
        assert backend.count_matches(MatchSet(text=f"sneakers {noise}")) == 288
        assert backend.count_matches(MatchSet(text="连衣裙" * 3000)) == 1
        got = backend.listing(MatchSet(text=f"sneakers {noise}"), [SortKey("_score", descending=True)], 0, 5)
        assert len(got) == 5

    def test_bad_match_set(self, backend: Backend) -> None:
        with pytest.raises(ValueError, match="ids"):
            backend.count_matches(MatchSet(ids="p001"))  # type: ignore[arg-type]

    def test_gibberish_counts_zero(self, backend: Backend) -> None:
        assert backend.count_matches(MatchSet(text="qzxvbn")) == 0
        assert backend.count_matches(MatchSet(text="qzxvbn", ids=("p001",))) == 1
        # blank text has no tokens: it matches nothing lexically (None is the way to browse)
        assert backend.count_matches(MatchSet(text="  ")) == 0
        assert backend.count_matches(MatchSet(text="", ids=("p001", "p002"))) == 2


# ------------------------------------------------------------------ listing


class TestListing:
    @pytest.mark.parametrize(
        ("field", "descending"), [("price", False), ("price", True), ("sales", True), ("stock", False)]
    )
    def test_sorted_missing_last_ties_by_id(self, backend: Backend, field: str, descending: bool) -> None:
        got = backend.listing(MatchSet(), [SortKey(field, descending)], 0, len(CATALOG) + 10)
        assert [c.id for c in got] == expected_order(CATALOG, field, descending)
        assert all(c.product is not None and c.product.id == c.id for c in got)

    def test_text_and_filters_restrict_the_listing(self, backend: Backend) -> None:
        match = MatchSet(text="sneakers", filters=CHEAP_IN_STOCK)
        got = backend.listing(match, [SortKey("price")], 0, 1000)
        assert [c.id for c in got] == expected_order(expected_set("sneakers", CHEAP_IN_STOCK), "price", False)
        assert all(c.bm25 is not None and c.bm25 > 0 for c in got)

    def test_browse_under_filters(self, backend: Backend) -> None:
        got = backend.listing(MatchSet(filters=ACME), [SortKey("sales", descending=True)], 0, 1000)
        assert [c.id for c in got] == expected_order(expected_set(None, ACME), "sales", True)

    def test_score_order(self, backend: Backend) -> None:
        match = MatchSet(text="sleek sneakers")
        got = backend.listing(match, [SortKey("_score", descending=True)], 0, 1000)
        assert sorted(c.id for c in got) == sorted(p.id for p in expected_set("sleek sneakers"))
        scores = [c.bm25 for c in got]
        assert all(s is not None for s in scores)
        assert scores == sorted(scores, reverse=True)
        # both words rank above one word
        both = {p.id for p in CATALOG if {"sleek", "sneakers"} <= title_words(p)}
        assert {c.id for c in got[: len(both)]} == both
        for a, b in itertools.pairwise(got):
            if a.bm25 == b.bm25:
                assert a.id < b.id

    def test_ids_only_products_have_no_bm25(self, backend: Backend) -> None:
        match = MatchSet(text="snug", ids=("zh1", "html1"))
        got = {c.id: c for c in backend.listing(match, [SortKey("price")], 0, 1000)}
        assert set(got) == {p.id for p in expected_set("snug", ids=("zh1", "html1"))}
        assert got["zh1"].bm25 is None and got["html1"].bm25 is None
        assert all(c.bm25 is not None for i, c in got.items() if i not in ("zh1", "html1"))

    @pytest.mark.parametrize("page", [37, 100, 250])
    def test_paging_gives_every_product_once(self, backend: Backend, page: int) -> None:
        sort = [SortKey("price", descending=True)]
        seen: list[str] = []
        offset = 0
        while True:
            chunk = backend.listing(MatchSet(), sort, offset, page)
            assert len(chunk) <= page
            if not chunk:
                break
            seen += [c.id for c in chunk]
            offset += page
        assert seen == expected_order(CATALOG, "price", True)

    def test_deep_page(self, backend: Backend) -> None:
        want = expected_order(CATALOG, "sales", False)
        got = backend.listing(MatchSet(), [SortKey("sales")], 550, 100)
        assert [c.id for c in got] == want[550:650]
        assert backend.listing(MatchSet(), [SortKey("sales")], 10_000, 5) == []

    def test_two_keys(self, backend: Backend) -> None:
        got = backend.listing(MatchSet(), [SortKey("stock", True), SortKey("price")], 0, 1000)
        present = sorted((p for p in CATALOG if p.stock is not None), key=lambda p: p.id)
        present.sort(key=lambda p: (p.price is None, p.price or 0.0))
        present.sort(key=lambda p: p.stock or 0, reverse=True)
        missing = sorted((p for p in CATALOG if p.stock is None), key=lambda p: p.id)
        missing.sort(key=lambda p: (p.price is None, p.price or 0.0))
        assert [c.id for c in got] == [p.id for p in present + missing]

    def test_bad_input(self, backend: Backend) -> None:
        assert backend.listing(MatchSet(), [SortKey("price")], 0, 0) == []
        with pytest.raises(ValueError, match="offset"):
            backend.listing(MatchSet(), [SortKey("price")], -1, 10)
        with pytest.raises(ValueError, match="sort field"):
            SortKey("title")


# ------------------------------------------------------------------ facets


class TestFacets:
    def test_term_counts_over_the_match_set(self, backend: Backend) -> None:
        match = MatchSet(text="boots")
        products = expected_set("boots")
        brand, category = backend.facets(match, [FacetSpec("brand", size=2), FacetSpec("category")])
        want = value_counts(products, "brand")
        assert brand.values == [FacetValue(v, n) for v, n in want[:2]]
        assert brand.other == sum(n for _, n in want[2:]) > 0
        assert category.values == [FacetValue(v, n) for v, n in value_counts(products, "category")]
        assert category.other == 0
        # the match set, not the whole catalog
        assert brand.values != [FacetValue(v, n) for v, n in value_counts(CATALOG, "brand")[:2]]

    def test_ties_ordered_by_value(self, backend: Backend) -> None:
        match = MatchSet(ids=tuple(f"p{i:03d}" for i in (0, 6, 10, 13)), text="qzxvbn")
        (brand,) = backend.facets(match, [FacetSpec("brand")])
        assert brand.values == [FacetValue(b, 1) for b in BRANDS]

    def test_filters_respected(self, backend: Backend) -> None:
        (brand, price) = backend.facets(
            MatchSet(text="sneakers", filters=ACME), [FacetSpec("brand"), FacetSpec("price", stats=True)]
        )
        products = expected_set("sneakers", ACME)
        assert brand.values == [FacetValue("Acme", len(products))]
        assert price.stats is not None
        assert price.stats.count == sum(p.price is not None for p in products)

    def test_ranges_are_start_inclusive_end_exclusive(self, backend: Backend) -> None:
        ranges = ((None, 60.5), (60.5, 120.5), (120.5, None), (10.0, 10.0))
        (facet,) = backend.facets(MatchSet(), [FacetSpec("price", ranges=ranges)])
        prices = [p.price for p in CATALOG if p.price is not None]
        assert 60.5 in prices and 120.5 in prices
        want = [sum(1 for x in prices if (lo is None or x >= lo) and (hi is None or x < hi)) for lo, hi in ranges]
        assert facet.ranges == [FacetRange(lo, hi, n) for (lo, hi), n in zip(ranges, want, strict=True)]
        assert facet.values is None and facet.stats is None

    def test_stats(self, backend: Backend) -> None:
        price, sales = backend.facets(
            MatchSet(text="sneakers"), [FacetSpec("price", stats=True), FacetSpec("sales", stats=True)]
        )
        products = expected_set("sneakers")
        prices = [p.price for p in products if p.price is not None]
        assert price.stats is not None and sales.stats is not None
        assert price.stats.count == len(prices) < len(products)
        assert price.stats.min == min(prices) and price.stats.max == max(prices)
        assert math.isclose(price.stats.sum, sum(prices))
        assert price.stats.avg is not None and math.isclose(price.stats.avg, sum(prices) / len(prices))
        assert sales.stats.count == len(products)
        assert math.isclose(sales.stats.sum, sum(p.sales for p in products))

    def test_empty_match_set(self, backend: Backend) -> None:
        brand, price = backend.facets(MatchSet(text="qzxvbn"), [FacetSpec("brand"), FacetSpec("price", stats=True)])
        assert brand.values == [] and brand.other == 0
        assert price.stats is not None
        assert (price.stats.count, price.stats.min, price.stats.max, price.stats.avg) == (0, None, None, None)
        assert price.stats.sum == 0
        assert backend.facets(MatchSet(), []) == []

    def test_overlapping_ranges_and_fractional_bounds_on_counts(self, backend: Backend) -> None:
        match = MatchSet(text="sneakers")
        products = expected_set("sneakers")
        ranges = ((None, 10.5), (5.0, 50.0), (0.5, 0.5), (20.2, None), (0.0, 96.5), (-3.0, 1.0))
        stock_ranges = ((None, 2.5), (1.0, 4.0), (3.5, None))
        sales, stock, price = backend.facets(
            match,
            [
                FacetSpec("sales", ranges=ranges),
                FacetSpec("stock", ranges=stock_ranges),
                FacetSpec("price", ranges=((None, None), (40.5, 100.5), (60.0, 150.0))),
            ],
        )

        def want(values: list[float], bounds: tuple) -> list[FacetRange]:
            return [
                FacetRange(lo, hi, sum(1 for x in values if (lo is None or x >= lo) and (hi is None or x < hi)))
                for lo, hi in bounds
            ]

        assert sales.ranges == want([p.sales for p in products], ranges)
        stocks = [p.stock for p in products if p.stock is not None]
        assert len(stocks) < len(products)  # untracked stock is in no bucket
        assert stock.ranges == want(stocks, stock_ranges)
        prices = [p.price for p in products if p.price is not None]
        assert price.ranges == want(prices, ((None, None), (40.5, 100.5), (60.0, 150.0)))

    def test_stats_on_stock_count_the_tracked_only(self, backend: Backend) -> None:
        (stock,) = backend.facets(MatchSet(text="jacket"), [FacetSpec("stock", stats=True)])
        stocks = [p.stock for p in expected_set("jacket") if p.stock is not None]
        assert stock.stats is not None
        assert (stock.stats.count, stock.stats.min, stock.stats.max) == (len(stocks), min(stocks), max(stocks))
        assert stock.stats.sum == sum(stocks)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        text=st.one_of(st.none(), st.sampled_from(["sneakers", "red boots", "snug", "waterproof mesh", "qzxvbn"])),
        ids=st.lists(st.sampled_from([p.id for p in CATALOG[::7]]), max_size=6, unique=True),
        brands=st.lists(st.sampled_from(BRANDS), max_size=2, unique=True),
        low=st.one_of(st.none(), st.floats(0, 200, allow_nan=False)),
        in_stock=st.sampled_from([None, True]),
        bounds=st.lists(st.one_of(st.none(), st.floats(0, 200, allow_nan=False)), min_size=2, max_size=6),
    )
    def test_facets_equal_a_brute_force_count(self, backend: Backend, text, ids, brands, low, in_stock, bounds):
        """Random match sets (text, ids standing for vector hits, filters) and random range facets."""
        exclude = [{"brand": brands[-1]}, {"price_max": low}] if brands and low is not None else None
        filters = Filters(brand=brands[:1] or None, price_min=low, in_stock=in_stock, exclude=exclude)
        if in_stock and low is None:
            filters = Filters(in_stock=True, exclude={"brand": ["Acme"], "price_max": 100.0})
        ranges = tuple(
            (a, b) if a is None or b is None or a <= b else (b, a)
            for a, b in zip(bounds[::2], bounds[1::2], strict=False)
        )
        products = expected_set(text, filters, tuple(ids))
        specs = [
            FacetSpec("brand", size=2),
            FacetSpec("category"),
            FacetSpec("price", ranges=ranges),
            FacetSpec("sales", ranges=ranges),
            FacetSpec("sales", stats=True),
        ]
        brand, category, price, sales, sales_stats = backend.facets(MatchSet(text, filters, tuple(ids)), specs)
        brands_want = value_counts(products, "brand")
        assert brand.values == [FacetValue(v, n) for v, n in brands_want[:2]]
        assert brand.other == sum(n for _, n in brands_want[2:])
        assert category.values == [FacetValue(v, n) for v, n in value_counts(products, "category")]

        def counts(values: list[float]) -> list[int]:
            return [sum(1 for x in values if (a is None or x >= a) and (b is None or x < b)) for a, b in ranges]

        assert [r.count for r in price.ranges or []] == counts([p.price for p in products if p.price is not None])
        assert [r.count for r in sales.ranges or []] == counts([p.sales for p in products])
        assert sales_stats.stats is not None and sales_stats.stats.count == len(products)
        assert sales_stats.stats.sum == sum(p.sales for p in products)


# ------------------------------------------------------------------ highlight

TAG_RE = re.compile(r"<em>(.*?)</em>")


class TestHighlight:
    def test_tags_around_matched_words_and_unmatched_ids_absent(self, backend: Backend) -> None:
        sneakers = [p.id for p in CATALOG if "sneakers" in p.title][:5]
        jacket = next(p.id for p in CATALOG if p.title.endswith("jacket") and p.description is None)
        ids = [*sneakers, jacket, "no-such-id"]
        got = backend.highlight("sneakers", ids, ["title", "description"], HighlightTags())
        assert set(got) == set(sneakers)
        for product_id in sneakers:
            assert set(got[product_id]) == {"title"}
            (fragment,) = got[product_id]["title"]
            assert TAG_RE.findall(fragment) == ["sneakers"]
            assert TAG_RE.sub(r"\1", fragment) == BY_ID[product_id].title

    def test_both_fields_and_custom_tags(self, backend: Backend) -> None:
        product = next(p for p in CATALOG if p.description == "waterproof leather upper" and "sneakers" in p.title)
        tags = HighlightTags(pre='<mark class="hit">', post="</mark>")
        got = backend.highlight("sneakers leather", [product.id], ["title", "description"], tags)
        fields = got[product.id]
        assert '<mark class="hit">sneakers</mark>' in fields["title"][0]
        assert '<mark class="hit">leather</mark>' in fields["description"][0]
        assert "<em>" not in fields["title"][0]
        only_title = backend.highlight("sneakers leather", [product.id], ["title"], tags)
        assert set(only_title[product.id]) == {"title"}

    def test_product_html_is_escaped_tags_are_not(self, backend: Backend) -> None:
        got = backend.highlight("runner", ["html1"], ["title", "description"], HighlightTags())
        title = got["html1"]["title"][0]
        description = got["html1"]["description"][0]
        assert "&lt;b&gt;" in title and "<b>" not in title
        assert "&amp;" in title
        assert "<em>runner</em>" in title
        assert "&lt;script&gt;" in description and "<script>" not in description
        assert "<em>runner</em>" in description
        assert TAG_RE.findall(title) == ["runner"]

    def test_cjk(self, backend: Backend) -> None:
        got = backend.highlight("连衣裙", ["zh1", "p001"], ["title"], HighlightTags())
        assert set(got) == {"zh1"}
        (fragment,) = got["zh1"]["title"]
        assert TAG_RE.sub(r"\1", fragment) == CJK_PRODUCT.title
        marked = "".join(TAG_RE.findall(fragment))
        assert marked and set(marked) <= set("连衣裙")
        assert "连衣裙" in TAG_RE.sub(r"\1", fragment)

    def test_fragments_bounded(self, backend: Backend) -> None:
        long_text = " ".join(["filler words here"] * 30 + ["target"] + ["more filler words"] * 30)
        product = Product(id="long1", title="long item", description=long_text, sales=0)
        backend.upsert([product], None)
        if hasattr(backend, "refresh"):
            backend.refresh()
        try:
            got = backend.highlight("target", ["long1"], ["description"], HighlightTags(fragment_chars=40))
            (fragment,) = got["long1"]["description"]
            assert "<em>target</em>" in fragment
            assert len(TAG_RE.sub(r"\1", fragment)) < len(long_text) // 2
        finally:
            backend.delete(["long1"])
            if hasattr(backend, "refresh"):
                backend.refresh()

    def test_many_ids(self, backend: Backend) -> None:
        ids = [p.id for p in CATALOG]
        got = backend.highlight("sneakers", ids, ["title"], HighlightTags())
        assert set(got) == {p.id for p in CATALOG if "sneakers" in title_words(p)}

    def test_nothing_to_highlight(self, backend: Backend) -> None:
        assert backend.highlight("qzxvbn", ["p001"], ["title"], HighlightTags()) == {}
        assert backend.highlight("", ["p001"], ["title"], HighlightTags()) == {}
        assert backend.highlight("sneakers", [], ["title"], HighlightTags()) == {}
        assert backend.highlight("sneakers", ["p001"], [], HighlightTags()) == {}
        with pytest.raises(ValueError, match="fields"):
            backend.highlight("sneakers", ["p001"], ["brand"], HighlightTags())


# ------------------------------------------------------------------ prefix and fuzzy terms


def title_df(word: str) -> int:
    return sum(word in title_words(p) for p in CATALOG)


class TestTerms:
    def test_prefix_title_words_most_frequent_first(self, backend: Backend) -> None:
        got = backend.prefix_terms("s", 10)
        terms = [t for t in got if t.kind == "term"]
        # sleek, sneakers, snug, socks
        want = sorted(
            {w for p in CATALOG for w in title_words(p) if w.startswith("s")}, key=lambda w: (-title_df(w), w)
        )
        assert [(t.term, t.doc_freq) for t in terms] == [(w, title_df(w)) for w in want]
        assert got[0] == TermCount("shoes", sum("shoes" in p.category for p in CATALOG), "category")
        assert backend.prefix_terms("sn", 3) == [TermCount("sneakers", 288, "term"), TermCount("snug", 55, "term")]
        assert [t.doc_freq for t in got] == sorted((t.doc_freq for t in got), reverse=True)

    def test_prefix_brands_and_categories(self, backend: Backend) -> None:
        got = backend.prefix_terms("bo", 5)
        brand_n = sum(p.brand == "Borealis" for p in CATALOG)
        assert TermCount("Borealis", brand_n, "brand") in got
        assert TermCount("boots", title_df("boots"), "term") in got
        got = backend.prefix_terms("ap", 5)
        assert got == [TermCount("apparel", sum("apparel" in p.category for p in CATALOG), "category")]
        assert TermCount("Acme", sum(p.brand == "Acme" for p in CATALOG), "brand") in backend.prefix_terms("AC", 5)

    def test_prefix_limits_and_bad_input(self, backend: Backend) -> None:
        assert len(backend.prefix_terms("s", 2)) == 2
        assert backend.prefix_terms("", 5) == []
        assert backend.prefix_terms("s", 0) == []
        assert backend.prefix_terms("s", -3) == []
        for hostile in ("(.*", "s.*", "[a-z]", "\\", "s|b", "*", '"', "~1"):
            assert backend.prefix_terms(hostile, 5) == [], hostile
        assert backend.prefix_terms("qzx", 5) == []
        assert backend.prefix_terms("s" * 5000, 5) == []
        assert backend.prefix_terms("ßẞ" * 40, 5) == []
        assert backend.fuzzy_terms("s" * 5000, 2, 5) == []
        assert len(backend.prefix_terms("s", 10**9)) == len(backend.prefix_terms("s", 100))

    def test_fuzzy_finds_the_word(self, backend: Backend) -> None:
        for typo, edits in (("sneakrs", 1), ("snekers", 1), ("sneekrs", 2), ("bots", 1)):
            got = backend.fuzzy_terms(typo, edits, 5)
            assert got, typo
            want = "boots" if typo == "bots" else "sneakers"
            assert got[0] == TermCount(want, title_df(want), "term"), typo
        assert all(t.term != "sneakers" for t in backend.fuzzy_terms("sneekrs", 1, 5))

    def test_fuzzy_nearest_first(self, backend: Backend) -> None:
        got = backend.fuzzy_terms("snag", 2, 10)
        assert got[0] == TermCount("snug", title_df("snug"), "term")
        assert backend.fuzzy_terms("sneakers", 1, 3)[0] == TermCount("sneakers", 288, "term")

    def test_fuzzy_bad_input(self, backend: Backend) -> None:
        assert backend.fuzzy_terms("zzzzqqqq", 2, 5) == []
        assert backend.fuzzy_terms("", 1, 5) == []
        assert backend.fuzzy_terms("sneakrs", 1, 0) == []
        with pytest.raises(ValueError, match="max_edits"):
            backend.fuzzy_terms("sneakrs", 3, 5)


def test_typo_lookup_follows_writes(empty_store: Backend) -> None:
    """A word written after a lookup is found by the next one; on the embedded store, a word whose last
    product is deleted is not."""
    backend = empty_store
    backend.upsert([Product(id="a", title="leather sandals"), Product(id="b", title="wool socks")], None)
    assert [t.term for t in backend.fuzzy_terms("sandels", 1, 5)] == ["sandals"]
    assert backend.fuzzy_terms("scarff", 1, 5) == []
    backend.upsert([Product(id="c", title="silk scarf"), Product(id="d", title="cotton sandals")], None)
    assert backend.fuzzy_terms("scarff", 1, 5) == [TermCount("scarf", 1, "term")]
    assert backend.fuzzy_terms("sandels", 1, 5) == [TermCount("sandals", 2, "term")]
    backend.delete(["c"])
    if not hasattr(backend, "client"):  # OpenSearch's term lookups count deleted documents until a merge
        assert backend.fuzzy_terms("scarff", 1, 5) == []


def test_first_letter_suggestions_follow_writes_and_deletes(empty_store: Backend) -> None:
    """A search box's first keystroke: the one-letter suggestions change with every write."""
    backend = empty_store
    backend.upsert([Product(id="a", title="silk scarf")], None)
    assert backend.prefix_terms("s", 5) == [TermCount("scarf", 1, "term"), TermCount("silk", 1, "term")]
    backend.upsert([Product(id="b", title="silk socks"), Product(id="c", title="sandals")], None)
    assert [(t.term, t.doc_freq) for t in backend.prefix_terms("s", 5)] == [
        ("silk", 2),
        ("sandals", 1),
        ("scarf", 1),
        ("socks", 1),
    ]
    backend.delete(["a"])
    assert [(t.term, t.doc_freq) for t in backend.prefix_terms("s", 5)] == [("sandals", 1), ("silk", 1), ("socks", 1)]
