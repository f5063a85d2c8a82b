import math

import pytest
from pydantic import ValidationError

from middleware.products import MAX_DESCRIPTION_CHARS, Filters, Product, SignalUpdate, describe_validation_error


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


STORED_ROWS = [
    {"id": "p1", "title": "Husky 26 in. Tool Chest"},
    {
        "id": 42,
        "title": "  女士 轻奢 小众 手表  ",
        "description": "x" * (MAX_DESCRIPTION_CHARS + 50),  # cut on validation: the stored row holds the cut text
        "brand": "",
        "category": "watches",
        "price": "89.00",
        "sales": "12",
        "stock": 0,
        "attributes": {"group_id": "g1", "colour": ["red", "blue"], "size": {"eu": 38}},
        "url": "https://shop.example/p/42?a=1",
        "image": None,
    },
]


@pytest.mark.parametrize("row", STORED_ROWS)
def test_a_stored_row_reads_back_as_the_validated_product(row):
    product = Product.model_validate(row)
    stored = product.model_dump_json()
    read = Product.from_stored_json(stored)
    assert isinstance(read, Product)
    assert read == Product.model_validate_json(stored)  # what validating the row again gives
    assert read.model_dump() == product.model_dump()
    assert read.model_dump_json() == stored
    assert read.content_hash() == product.content_hash()
    assert read.in_stock == product.in_stock
    assert read.truncated == {}  # the stored text is what was kept, not what was cut
    # a copy with an update is a product of its own: the row it was read from is unchanged
    changed = read.model_copy(update={"stock": 5})
    assert changed.stock == 5 and read.stock == product.stock


def test_a_row_from_another_model_version_keeps_known_fields_and_defaults_the_rest():
    row = '{"id": "p1", "title": "Lamp", "retired_field": 1, "price": 3.5}'
    read = Product.from_stored_json(row)
    assert read == Product(id="p1", title="Lamp", price=3.5)
    assert not hasattr(read, "retired_field")


def test_a_stored_row_that_is_not_an_object_is_refused():
    with pytest.raises(ValueError, match="JSON object"):
        Product.from_stored_json("[1, 2]")
