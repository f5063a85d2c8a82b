import math

import pytest
from pydantic import ValidationError

from middleware.products import Filters, Product, SignalUpdate, describe_validation_error


def error_of(**row) -> str:
    with pytest.raises(ValidationError) as info:
        Product.model_validate(row)
    return describe_validation_error(info.value)


def test_minimal_product_and_defaults():
    p = Product.model_validate({"id": 7, "title": "  卡西欧手表  "})
    assert p.id == "7" and p.title == "卡西欧手表"
    assert p.category == [] and p.sales == 0 and p.stock is None and p.in_stock


def test_lax_numeric_strings_are_coerced():
    p = Product.model_validate({"id": "a", "title": "t", "price": "89.00", "sales": "12", "stock": "3.0"})
    assert p.price == 89.0 and p.sales == 12 and p.stock == 3


def test_category_string_or_list():
    assert Product(id="a", title="t", category="手表").category == ["手表"]
    assert Product(id="a", title="t", category=["手表", "女表"]).category == ["手表", "女表"]


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"title": "t"}, "id"),
        ({"id": "", "title": "t"}, "id"),
        ({"id": True, "title": "t"}, "id"),
        ({"id": "a"}, "title"),
        ({"id": "a", "title": "   "}, "title"),
        ({"id": "a", "title": "t", "price": -1}, "price"),
        ({"id": "a", "title": "t", "price": "abc"}, "price"),
        ({"id": "a", "title": "t", "price": math.nan}, "price"),
        ({"id": "a", "title": "t", "price": "NaN"}, "price"),
        ({"id": "a", "title": "t", "stock": 2.5}, "stock"),
        ({"id": "a", "title": "t", "stock": "2.5"}, "stock"),
        ({"id": "a", "title": "t", "sales": -3}, "sales"),
        ({"id": "a", "title": "t", "attributes": "red"}, "attributes"),
        ({"id": "a", "title": "t", "category": 5}, "category"),
    ],
)
def test_invalid_rows_name_the_field(row, field):
    assert error_of(**row).startswith(field)


def test_content_hash_ignores_signals_only():
    a = Product(id="a", title="t", price=1, sales=1, stock=1)
    b = a.model_copy(update={"price": 2.0, "sales": 5, "stock": 0})
    c = a.model_copy(update={"title": "t2"})
    assert a.content_hash() == b.content_hash() != c.content_hash()


def test_embedding_text_is_title_then_description():
    assert Product(id="a", title="T", description="D").embedding_text() == "T\nD"
    assert Product(id="a", title="T", description="").embedding_text() == "T"


def test_signal_update_needs_a_signal():
    with pytest.raises(ValidationError):
        SignalUpdate(id="a")
    assert SignalUpdate.model_validate({"id": 3, "stock": "0"}).stock == 0


def test_filters_reference_semantics():
    p = Product(id="a", title="t", brand="Casio", category=["手表"], price=100, stock=0)
    assert Filters(brand="Casio").matches(p)
    assert not Filters(brand=["Omega"]).matches(p)
    assert Filters(category=["手表", "手环"]).matches(p)
    assert Filters(price_min=50, price_max=100).matches(p)
    assert not Filters(price_max=99.9).matches(p)
    assert not Filters(in_stock=True).matches(p)
    assert Filters(in_stock=False).matches(p)
    assert not Filters(ids=["b"]).matches(p)
    assert not Filters(price_min=1).matches(Product(id="x", title="no price"))
    with pytest.raises(ValidationError):
        Filters(price_min=10, price_max=1)
    with pytest.raises(ValidationError):
        Filters(colour="red")
