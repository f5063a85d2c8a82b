"""The records every stage passes around: Product, Filters, SignalUpdate, Candidate."""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from dataclasses import dataclass, field
from typing import Annotated, Any

import pydantic_core
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

# Text bounds. One long row must not stall a load: analysis (jieba) and tokenisation cost grow with
# the text, and a multi-megabyte description once took minutes for a single row.
# - The free-text description is CUT to MAX_DESCRIPTION_CHARS (the row is kept, and the loader reports
#   the cut): the models read a few hundred tokens of it at most, and BM25 gains nothing from the tail,
#   while rejecting would drop a product that is on sale.
# - Fields used as exact values (title, brand, categories, url, image, attributes) are REJECTED past
#   their bound, naming the field: a cut value would be a different value (a brand filter would miss it,
#   a URL would be broken), and such lengths mean a broken export, not a real product.
MAX_TITLE_CHARS = 2000
MAX_DESCRIPTION_CHARS = 10_000
MAX_LABEL_CHARS = 512  # brand, and each category
MAX_CATEGORIES = 64
MAX_URL_CHARS = 8192
MAX_ATTRIBUTES_JSON_CHARS = 65_536
MAX_QUERY_CHARS = 10_000  # a search query's bound (SearchRequest, the REST API, the OpenSearch proxy)


# Product ids: 1 to MAX_ID_CHARS characters after trimming, no control characters. Everything else is
# valid, "/", "?", "#", "%" and spaces included: the REST and OpenSearch-compatible routes take the id as
# one URL-encoded path segment (or a path tail) and decode it, so any valid id is reachable.
MAX_ID_CHARS = 512


def _product_id(value: Any) -> str:
    # ints are accepted (many catalogs use numeric ids) and stringified; bools are not ids
    if isinstance(value, bool):
        raise ValueError("id must be a string or an integer, not a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if not isinstance(value, str):
        raise ValueError(f"id must be a string or an integer, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise ValueError("id must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"id must be at most {MAX_ID_CHARS} characters")
    for position, char in enumerate(value, start=1):
        # control characters break log lines, CSV exports and HTTP paths; lone surrogates are not UTF-8
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise ValueError(f"id must not contain control characters (U+{ord(char):04X} at position {position})")
    return value


def _finite(value: Any) -> Any:
    # lax numeric strings ("89.00") pass through to pydantic; NaN/inf never do
    if isinstance(value, str):
        value = value.strip()
        if value.lower() in {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "-infinity"}:
            raise ValueError("must be a finite number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


def _count(value: Any) -> Any:
    value = _finite(value)
    # "12.0" and 12.0 are whole numbers; "12.5" is not a count
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError("must be a whole number") from None
        if not number.is_integer():
            raise ValueError("must be a whole number, not a fraction")
        return int(number)
    return value


ProductId = Annotated[str, BeforeValidator(_product_id)]
Price = Annotated[NonNegativeFloat, BeforeValidator(_finite)]
# counts are stored as 64-bit integers (SQLite INTEGER, OpenSearch long): larger is bad input, not a crash
MAX_COUNT = 2**63 - 1
Count = Annotated[NonNegativeInt, BeforeValidator(_count), Field(le=MAX_COUNT)]


class Product(BaseModel):
    """One catalog item. Unknown keys are ignored; bad values raise naming the field."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, allow_inf_nan=False)

    id: ProductId
    title: str = Field(min_length=1, max_length=MAX_TITLE_CHARS)
    description: str | None = None  # cut to MAX_DESCRIPTION_CHARS (see `truncated`)
    brand: str | None = Field(None, max_length=MAX_LABEL_CHARS)
    category: list[Annotated[str, Field(max_length=MAX_LABEL_CHARS)]] = Field(
        default_factory=list, max_length=MAX_CATEGORIES
    )
    price: Price | None = None
    sales: Count = 0
    stock: Count | None = None  # None: stock not tracked, treated as in stock
    attributes: dict[str, Any] = Field(default_factory=dict)
    url: str | None = Field(None, max_length=MAX_URL_CHARS)
    image: str | None = Field(None, max_length=MAX_URL_CHARS)
    # field -> original length, for fields cut on validation (not stored: a stored product is already cut)
    # None, not a default_factory: pydantic inspects a factory's signature for every instance, which was
    # most of the cost of reading products back from the store
    _truncated: dict[str, int] | None = PrivateAttr(default=None)

    @field_validator("category", mode="before")
    @classmethod
    def _category_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [value.strip()] if value.strip() else []
        return value

    @field_validator("description", "brand", "url", "image", mode="before")
    @classmethod
    def _optional_text(cls, value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):  # empty CSV/Parquet cells
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("attributes", mode="after")
    @classmethod
    def _bounded_attributes(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value:
            size = len(json.dumps(value, ensure_ascii=False, default=str))
            if size > MAX_ATTRIBUTES_JSON_CHARS:
                raise ValueError(f"at most {MAX_ATTRIBUTES_JSON_CHARS} characters as JSON, got {size}")
        return value

    @model_validator(mode="after")
    def _empty_to_none(self) -> Product:
        for name in ("description", "brand", "url", "image"):
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)
        if self.description is not None and len(self.description) > MAX_DESCRIPTION_CHARS:
            self._truncated = {**(self._truncated or {}), "description": len(self.description)}
            object.__setattr__(self, "description", self.description[:MAX_DESCRIPTION_CHARS].rstrip())
        return self

    @classmethod
    def from_stored_json(cls, doc: str | bytes) -> Product:
        """A product from JSON that `model_dump_json` of a validated Product wrote (a store's own row),
        without validating it again. Search results read back a hundred rows per query, and validation
        (or `model_construct`, a Python loop over the fields) costs several times the JSON parse.
        A key the model no longer has is dropped and a field the row lacks takes its default, as
        `model_construct` does. Untrusted JSON goes through `model_validate_json`."""
        values = pydantic_core.from_json(doc)  # pydantic's own JSON parser: twice as fast as json.loads
        if not isinstance(values, dict):
            raise ValueError(f"a stored product must be a JSON object, got {type(values).__name__}")
        if values.keys() != _FIELD_NAMES:  # a row written by another version of this model
            given = {name: values[name] for name in _FIELD_NAMES if name in values}
            return cls.model_construct(_fields_set=set(given), **given)
        product = cls.__new__(cls)
        # the instance state pydantic documents for BaseModel: field values, the fields set, extras, privates
        object.__setattr__(product, "__dict__", values)
        object.__setattr__(product, "__pydantic_fields_set__", set(values))
        object.__setattr__(product, "__pydantic_extra__", None)
        object.__setattr__(product, "__pydantic_private__", dict(_PRIVATE_DEFAULTS))
        return product

    @property
    def truncated(self) -> dict[str, int]:
        """Fields cut to their bound when this product was validated: field -> original length."""
        return dict(self._truncated or {})

    @property
    def in_stock(self) -> bool:
        return self.stock is None or self.stock > 0

    def embedding_text(self) -> str:
        """The text the embedder sees for this product: title, then description."""
        if self.description:
            return f"{self.title}\n{self.description}"
        return self.title

    def search_text(self) -> str:
        """Everything BM25 indexes besides the title."""
        parts = [self.description or "", self.brand or "", " ".join(self.category)]
        return " ".join(p for p in parts if p)

    def content_hash(self) -> str:
        """Changes when anything but the business signals changes (the rerank-cache version)."""
        raw = _HASH_JSON.encode(self.model_dump(exclude=_SIGNAL_FIELDS))
        return hashlib.sha1(raw.encode("utf-8")).hexdigest()[:16]


_FIELD_NAMES = frozenset(Product.model_fields)
_SIGNAL_FIELDS = frozenset({"sales", "stock", "price"})
# json.dumps(..., ensure_ascii=False, sort_keys=True, default=str) without building an encoder per call
_HASH_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True, default=str)
_PRIVATE_DEFAULTS = {name: attr.get_default() for name, attr in Product.__private_attributes__.items()}


def describe_validation_error(err: ValidationError) -> str:
    """One line naming each bad field: `price: Input should be greater than or equal to 0`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "row"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


class SignalUpdate(BaseModel):
    """A change to business signals only: never touches text or vectors."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    id: ProductId
    price: Price | None = None
    sales: Count | None = None
    stock: Count | None = None

    @model_validator(mode="after")
    def _something(self) -> SignalUpdate:
        if self.price is None and self.sales is None and self.stock is None:
            raise ValueError("a signal update needs at least one of price, sales, stock")
        return self


MAX_EXCLUDE = 64  # exclude clauses in one Filters


class Filters(BaseModel):
    """Restrictions applied inside both retrievals (never after them).

    The fields restrict together (AND). `exclude` is the negative side (OpenSearch's bool.must_not):
    clauses of the same shapes, each restricting its fields together, and a product matching any one
    of them is left out, e.g. `{"category": ["shoes"], "exclude": [{"brand": ["Acme"]}, {"price_min": 500}]}`:
    shoes, but no Acme and nothing from 500 up. An exclude clause has no exclude of its own."""

    model_config = ConfigDict(extra="forbid")

    category: list[str] | None = None  # any of
    brand: list[str] | None = None  # any of
    price_min: Price | None = None
    price_max: Price | None = None
    in_stock: bool | None = None  # True: only stock > 0 (or untracked)
    ids: list[str] | None = None
    exclude: list[Filters] | None = Field(None, max_length=MAX_EXCLUDE)  # none of these (each its fields together)

    @field_validator("category", "brand", "ids", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("exclude", mode="before")
    @classmethod
    def _one_clause(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("exclude", mode="after")
    @classmethod
    def _flat_clauses(cls, value: list[Filters] | None) -> list[Filters] | None:
        for i, clause in enumerate(value or []):
            if clause.exclude is not None:
                raise ValueError(f"exclude[{i}] must not hold an exclude of its own")
            if (
                not any(v is not None for k, v in clause.model_dump().items() if k != "in_stock")
                and not clause.in_stock
            ):
                raise ValueError(f"exclude[{i}] restricts no field: it would exclude every product")
        return value or None

    @model_validator(mode="after")
    def _range(self) -> Filters:
        if self.price_min is not None and self.price_max is not None and self.price_min > self.price_max:
            raise ValueError("price_min must not exceed price_max")
        return self

    def is_empty(self) -> bool:
        return not any(v is not None for v in self.model_dump().values())

    def matches(self, product: Product) -> bool:
        """Reference semantics every backend must agree with."""
        if self.category is not None and not set(self.category) & set(product.category):
            return False
        if self.brand is not None and product.brand not in self.brand:
            return False
        if self.price_min is not None and (product.price is None or product.price < self.price_min):
            return False
        if self.price_max is not None and (product.price is None or product.price > self.price_max):
            return False
        if self.in_stock and not product.in_stock:
            return False
        if self.ids is not None and product.id not in self.ids:
            return False
        return not any(clause.matches(product) for clause in self.exclude or ())


@dataclass(slots=True)
class Candidate:
    """A product on its way through the pipeline, with one score per stage reached."""

    id: str
    product: Product | None = None
    bm25: float | None = None
    knn: float | None = None
    fused: float | None = None
    rerank: float | None = None
    relevance: float | None = None  # 0–1, what the business score starts from
    sales_bonus: float | None = None
    stock_penalty: float | None = None
    business: float | None = None  # sales_bonus - stock_penalty
    final: float | None = None
    ranks: dict[str, int] = field(default_factory=dict)  # 1-based rank in each retrieval

    def scores(self) -> dict[str, float | None]:
        return {
            "bm25": self.bm25,
            "knn": self.knn,
            "fused": self.fused,
            "rerank": self.rerank,
            "relevance": self.relevance,
            "sales_bonus": self.sales_bonus,
            "stock_penalty": self.stock_penalty,
            "business": self.business,
            "final": self.final,
        }
