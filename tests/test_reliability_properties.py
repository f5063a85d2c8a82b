"""Property-based tests (hypothesis): the data models, fusion and the proxy's body translation never
fail in an unplanned way, and keep their invariants on any input. Fast: pure functions, no models."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from benchmarks.reliability.hostile import proxy_body
from middleware.config import ServerSettings
from middleware.fusion import minmax, rrf
from middleware.products import Candidate, Filters, Product, SignalUpdate
from middleware.schema import SearchRequest
from middleware.server.errors import ApiError
from middleware.server.translate import SCRIPT_KEYS, Unsupported, translate_search

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
)
maybe = st.one_of(json_scalars, st.lists(json_scalars, max_size=3))
product_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=20), st.integers(), st.floats(), st.booleans(), st.none()),
        "title": st.one_of(st.text(max_size=30), json_scalars),
        "description": maybe,
        "brand": maybe,
        "category": maybe,
        "price": st.one_of(json_scalars, st.sampled_from(["89.00", "nan", "-1", "inf", " 3 "])),
        "sales": st.one_of(json_scalars, st.sampled_from(["12.0", "12.5", "-3", str(2**63), 10**30])),
        "stock": st.one_of(json_scalars, st.sampled_from(["0", "7.0", "1e3"])),
        "attributes": json_values,
        "extra": json_values,
    },
)


# -------------------------------------------------------------------------------------------- Product


@FAST
@given(product_like)
def test_product_validates_or_names_the_field(row: dict[str, Any]) -> None:
    try:
        product = Product.model_validate(row)
    except ValidationError as err:
        assert err.errors() and all(e["loc"] for e in err.errors())  # each error names its field
        return
    assert product.id and product.id == product.id.strip() and len(product.id) <= 512
    assert product.title and len(product.title) <= 2000
    for value in (product.price,):
        assert value is None or (math.isfinite(value) and value >= 0)
    assert 0 <= product.sales < 2**63 and (product.stock is None or 0 <= product.stock < 2**63)  # SQLite INTEGER
    assert isinstance(product.sales, int) and not isinstance(product.sales, bool)
    # what the store writes reads back equal, with the same content hash (the rerank-cache version)
    again = Product.model_validate_json(product.model_dump_json())
    assert again == product and again.content_hash() == product.content_hash()


valid_products = st.builds(
    Product,
    id=st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True),
    title=st.text(min_size=1, max_size=30).filter(str.strip),
    description=st.none() | st.text(max_size=30),
    brand=st.none() | st.text(max_size=10),
    category=st.lists(st.text(max_size=8), max_size=3),
    price=st.none() | st.floats(0, 1e9),
    sales=st.integers(0, 10**9),
    stock=st.none() | st.integers(0, 10**6),
)


@FAST
@given(valid_products, st.integers(0, 10**6), st.integers(0, 10**6), st.floats(0, 1e9))
def test_content_hash_ignores_signals_only(product: Product, sales: int, stock: int, price: float) -> None:
    changed = product.model_copy(update={"sales": sales, "stock": stock, "price": price})
    assert changed.content_hash() == product.content_hash()
    retitled = product.model_copy(update={"title": product.title + " x"})
    assert retitled.content_hash() != product.content_hash()


# ------------------------------------------------------------------------------- Filters, SignalUpdate

filters_like = st.fixed_dictionaries(
    {},
    optional={
        "category": maybe,
        "brand": maybe,
        "price_min": json_scalars,
        "price_max": json_scalars,
        "in_stock": json_scalars,
        "ids": maybe,
        "colour": json_scalars,
    },
)


@FAST
@given(filters_like, product_like)
def test_filters_validate_or_raise_and_match_is_total(raw: dict[str, Any], row: dict[str, Any]) -> None:
    try:
        filters = Filters.model_validate(raw)
    except ValidationError:
        return
    if filters.price_min is not None and filters.price_max is not None:
        assert filters.price_min <= filters.price_max
    try:
        product = Product.model_validate(row)
    except ValidationError:
        return
    matched = filters.matches(product)  # total: never raises for a valid pair
    assert isinstance(matched, bool)
    if filters.is_empty():
        assert matched
    if matched and filters.price_min is not None:
        assert product.price is not None and product.price >= filters.price_min


@FAST
@given(
    st.fixed_dictionaries(
        {"id": st.one_of(st.text(max_size=10), st.integers())},
        optional={"price": json_scalars, "sales": json_scalars, "stock": json_scalars, "title": json_scalars},
    )
)
def test_signal_update_carries_only_valid_signals(raw: dict[str, Any]) -> None:
    try:
        update = SignalUpdate.model_validate(raw)
    except ValidationError:
        return
    assert update.price is not None or update.sales is not None or update.stock is not None
    assert update.price is None or (math.isfinite(update.price) and update.price >= 0)
    assert update.sales is None or update.sales >= 0
    assert update.stock is None or update.stock >= 0
    assert "title" not in update.model_dump()  # a signal update can never carry text


# --------------------------------------------------------------------------------------------- fusion

ids = st.sampled_from([f"p{i}" for i in range(12)])
finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def ranked_lists(draw: st.DrawFn) -> dict[str, list[Candidate]]:
    out = {}
    for name in draw(st.lists(st.sampled_from(["bm25", "knn"]), unique=True, max_size=2)):
        entries = draw(st.lists(st.tuples(ids, finite), max_size=15))  # ids may repeat (a bad upstream)
        entries.sort(key=lambda e: -e[1])
        out[name] = [Candidate(id=i, **{name: s}) for i, s in entries]
    return out


def _first_occurrences(candidates: list[Candidate]) -> dict[str, tuple[int, Candidate]]:
    firsts: dict[str, tuple[int, Candidate]] = {}
    for rank, c in enumerate(candidates, start=1):
        firsts.setdefault(c.id, (rank, c))
    return firsts


@FAST
@given(ranked_lists(), st.integers(1, 1000))
def test_rrf_invariants(lists: dict[str, list[Candidate]], k: int) -> None:
    fused = rrf(lists, k=k)
    expected_ids = {c.id for cands in lists.values() for c in cands}
    assert len({c.id for c in fused}) == len(fused)  # no id twice
    assert {c.id for c in fused} == expected_ids
    for c in fused:
        want = 0.0
        for name, cands in lists.items():
            first = _first_occurrences(cands).get(c.id)
            if first is not None:
                rank, original = first
                want += 1.0 / (k + rank)
                # the best rank, and the score at that rank (never a later duplicate's)
                assert c.ranks[name] == rank and getattr(c, name) == getattr(original, name)
        assert c.fused == pytest.approx(want)
    assert all((-a.fused, a.id) <= (-b.fused, b.id) for a, b in itertools.pairwise(fused))  # sorted, ties by id
    assert [c.id for c in rrf(lists, k=k)] == [c.id for c in fused]  # deterministic


@FAST
@given(ranked_lists(), st.floats(0, 10), st.floats(0, 10))
def test_minmax_invariants(lists: dict[str, list[Candidate]], w_bm25: float, w_knn: float) -> None:
    weights = {"bm25": w_bm25, "knn": w_knn}
    fused = minmax(lists, weights)
    assert {c.id for c in fused} == {c.id for cands in lists.values() for c in cands}
    bound = sum(weights[name] for name in lists)
    for c in fused:
        assert c.fused is not None and math.isfinite(c.fused)  # never NaN, even for extreme scores
        assert -1e-9 <= c.fused <= bound + 1e-9
    assert all((-a.fused, a.id) <= (-b.fused, b.id) for a, b in itertools.pairwise(fused))
    for name, cands in lists.items():  # each list's best candidate gets the list's full weight
        if cands:
            best = cands[0].id
            others = [c for c in fused if c.id == best]
            assert others[0].fused >= weights[name] - 1e-9


def test_minmax_extreme_scores_are_not_nan() -> None:
    """Regression: a span beyond the float range made the best candidate's score NaN."""
    fused = minmax({"bm25": [Candidate(id="a", bm25=1e308), Candidate(id="b", bm25=-1e308)]})
    assert [(c.id, c.fused) for c in fused] == [("a", 1.0), ("b", 0.0)]


def test_repeated_id_keeps_the_score_of_its_best_rank() -> None:
    """Regression: a repeated id kept its best rank but the score of its last (worst) occurrence."""
    lists = {"bm25": [Candidate(id="a", bm25=5.0), Candidate(id="b", bm25=3.0), Candidate(id="a", bm25=1.0)]}
    by_id = {c.id: c for c in rrf(lists)}
    assert by_id["a"].bm25 == 5.0 and by_id["a"].ranks == {"bm25": 1}
    assert {c.id: c.fused for c in minmax(lists)} == {"a": 1.0, "b": 0.0}


# ------------------------------------------------------------------------------------- SearchRequest


@FAST
@given(
    st.fixed_dictionaries(
        {"query": st.one_of(st.text(max_size=30), json_scalars)},
        optional={
            "size": json_scalars,
            "from": json_scalars,
            "filters": st.one_of(filters_like, json_scalars),
            "retrieval": st.one_of(st.sampled_from(["hybrid", "bm25", "vector"]), json_scalars),
            "deadline_ms": json_scalars,
            "rerank_k": json_scalars,
            "fusion": json_scalars,
            "unknown": json_scalars,
        },
    )
)
def test_search_request_validates_within_bounds(raw: dict[str, Any]) -> None:
    try:
        req = SearchRequest.model_validate(raw)
    except ValidationError:
        return
    # an empty query is a category page (the pipeline refuses it only without filters)
    assert req.query is None or len(req.query) <= 10_000
    assert 0 <= req.size <= 10_000 and req.from_ >= 0
    assert req.deadline_ms is None or 0 < req.deadline_ms <= 600_000


# ----------------------------------------------------------------------------- proxy body translation

SERVER = ServerSettings()


@FAST
@given(proxy_body(), st.dictionaries(st.sampled_from(["q", "size", "from", "timeout"]), st.text(max_size=12)))
def test_translate_answers_refuses_or_passes_on(body: dict[str, Any], params: dict[str, str]) -> None:
    """Any body: a valid SearchRequest within the server's limits, a 4xx ApiError, or Unsupported."""
    try:
        translated = translate_search(body, params, SERVER, default_deadline_ms=2000.0)
    except ApiError as err:
        assert 400 <= err.status < 500
        return
    except Unsupported:
        return
    req = translated.request
    assert req.size <= SERVER.max_size and req.from_ <= SERVER.max_from
    # a text search, or a browse under filters (match_all browses everything: in_stock False restricts nothing)
    assert (req.query is not None and req.query.strip() and len(req.query) <= 10_000) or (
        req.query is None and req.filters is not None and not req.filters.is_empty()
    )
    assert req.deadline_ms is not None and 0 < req.deadline_ms <= 600_000


@st.composite
def body_with_script(draw: st.DrawFn) -> dict[str, Any]:
    """A text search with a script key planted somewhere inside it."""
    key = draw(st.sampled_from(sorted(SCRIPT_KEYS)))
    body: Any = draw(proxy_body())
    node = body
    for _ in range(draw(st.integers(0, 4))):  # walk down to a random dict
        children = [v for v in (node.values() if isinstance(node, dict) else node) if isinstance(v, (dict, list))]
        if not children:
            break
        node = draw(st.sampled_from(children))
    if isinstance(node, list):
        node.append({key: {"source": "1"}})
    else:
        node[key] = {"source": "ctx._source.price = 0"}
    return body


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body_with_script())
def test_a_script_anywhere_is_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as caught:
        translate_search(body, {}, SERVER)
    assert caught.value.status == 400 and "script" in caught.value.message
    json.dumps(body)  # the body was plain JSON


def test_long_proxy_timeout_is_capped_not_a_server_error() -> None:
    """Regression: "timeout": "20m" (valid in OpenSearch) failed SearchRequest's bound → a 500."""
    body = {"query": {"match": {"title": "手表"}}, "timeout": "20m"}
    assert translate_search(body, {}, SERVER).request.deadline_ms == 600_000
    body["timeout"] = "99999999999999999999999d"
    assert translate_search(body, {}, SERVER).request.deadline_ms == 600_000


def test_counts_beyond_64_bits_are_rejected_not_stored() -> None:
    """Regression: sales=10**30 validated, then crashed the SQLite write (OverflowError → 500 / loader abort)."""
    with pytest.raises(ValidationError, match="sales"):
        Product(id="a", title="t", sales=10**30)
    with pytest.raises(ValidationError, match="stock"):
        SignalUpdate(id="a", stock="1e30")
    assert Product(id="a", title="t", sales=2**63 - 1).sales == 2**63 - 1
