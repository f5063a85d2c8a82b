"""The seam between the pipeline and storage: one Protocol every backend implements."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from middleware.products import Candidate, Filters, Product, SignalUpdate


class BackendError(RuntimeError):
    """The backend could not answer (unreachable, timed out, refused). Expected, not a bug."""


class WriterBusy(BackendError):
    """The operation needs the store's one writer role, which another process holds."""


NO_EMBEDDER = "none"


@dataclass(frozen=True)
class EmbedderBinding:
    """The embedder whose vectors a store holds ("none": a lexical-only store)."""

    model: str
    dim: int | None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"embedder binding: model must be a non-empty string, got {self.model!r}")
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim <= 0):
            raise ValueError(f"embedder binding: dim must be a positive integer or None, got {self.dim!r}")
        if (self.model == NO_EMBEDDER) != (self.dim is None):
            raise ValueError(f"embedder binding: dim is None exactly for model {NO_EMBEDDER!r}, got {self!r}")

    def describe(self) -> str:
        return "no embedder (lexical only)" if self.dim is None else f"embedder {self.model!r} ({self.dim}-d)"


class EmbedderMismatch(BackendError):
    """The store holds vectors of another embedder; mixing two models' vectors would corrupt kNN."""

    def __init__(self, where: str, held: EmbedderBinding | str, wanted: EmbedderBinding | str, remedy: str) -> None:
        """`held`/`wanted`: a binding, or a description where there is none ("384-d vectors")."""
        held = held.describe() if isinstance(held, EmbedderBinding) else held
        wanted = wanted.describe() if isinstance(wanted, EmbedderBinding) else wanted
        super().__init__(
            f"{where} holds {held}, not {wanted}: vectors of different models cannot be mixed; "
            f"use the same SHOPSEARCH_EMBEDDER, or {remedy}"
        )


@dataclass(frozen=True)
class StoreStats:
    """What a store holds, the same fields for every backend."""

    backend: str  # "embedded" | "opensearch"
    products: int
    vectors: int
    dim: int | None
    size_bytes: int  # on disk (embedded) / store size in the cluster (opensearch)
    embedder: EmbedderBinding | None
    generation: int | None  # embedded store generation; None for opensearch
    details: dict[str, Any]  # engine-specific extras, for display only


# ---------------------------------------------------------------------- storefront primitives

SORT_FIELDS = ("price", "sales", "stock")  # numeric product fields a listing can be ordered by
TERM_FACET_FIELDS = ("brand", "category")
NUMERIC_FACET_FIELDS = ("price", "sales", "stock")
HIGHLIGHT_FIELDS = ("title", "description")


@dataclass(frozen=True)
class SortKey:
    """One sort criterion. `field`: one of SORT_FIELDS, or "_score" (lexical relevance).
    Products without the field sort last in either direction (OpenSearch's `missing: _last`)."""

    field: str
    descending: bool = False

    def __post_init__(self) -> None:
        if self.field != "_score" and self.field not in SORT_FIELDS:
            raise ValueError(f"sort field must be one of {('_score', *SORT_FIELDS)}, got {self.field!r}")


@dataclass(frozen=True)
class MatchSet:
    """The products a count, listing or facet is over: those matching `text` lexically (any of its
    tokens; every product when `text` is None) plus `ids`, all restricted by `filters`."""

    text: str | None = None
    filters: Filters | None = None
    ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.text is not None and not isinstance(self.text, str):
            raise ValueError(f"match.text must be a string or None, got {type(self.text).__name__}")
        if self.filters is not None and not isinstance(self.filters, Filters):
            raise ValueError(f"match.filters must be Filters or None, got {type(self.filters).__name__}")
        if isinstance(self.ids, str) or not all(isinstance(i, str) for i in self.ids):
            raise ValueError(f"match.ids must be a sequence of product id strings, got {self.ids!r:.80}")
        object.__setattr__(self, "ids", tuple(dict.fromkeys(self.ids)))


@dataclass(frozen=True)
class FacetSpec:
    """Value counts of a term field (the `size` most frequent), or, for a numeric field, counts per
    `ranges` bucket ([start, end), None open) or `stats`."""

    field: str
    size: int = 10
    ranges: tuple[tuple[float | None, float | None], ...] | None = None
    stats: bool = False

    def __post_init__(self) -> None:
        if self.field in TERM_FACET_FIELDS:
            if self.ranges is not None or self.stats:
                raise ValueError(f"facet {self.field!r}: ranges and stats are for numeric fields")
        elif self.field in NUMERIC_FACET_FIELDS:
            if (self.ranges is None) == (not self.stats):
                raise ValueError(f"facet {self.field!r}: give exactly one of ranges or stats")
        else:
            raise ValueError(
                f"facet field must be one of {TERM_FACET_FIELDS + NUMERIC_FACET_FIELDS}, got {self.field!r}"
            )
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"facet {self.field!r}: size must be a positive integer, got {self.size!r}")


@dataclass(frozen=True)
class FacetValue:
    value: str
    count: int


@dataclass(frozen=True)
class FacetRange:
    start: float | None  # inclusive; None: open
    end: float | None  # exclusive; None: open
    count: int


@dataclass(frozen=True)
class FacetStats:
    count: int  # products in the match set with a value
    min: float | None
    max: float | None
    sum: float
    avg: float | None


@dataclass(frozen=True)
class Facet:
    """One FacetSpec's answer; exactly one of values / ranges / stats is set, as asked."""

    spec: FacetSpec
    values: list[FacetValue] | None = None  # most frequent first, ties by value
    other: int = 0  # products whose values fell outside the `size` returned (OpenSearch's sum_other_doc_count)
    ranges: list[FacetRange] | None = None
    stats: FacetStats | None = None


@dataclass(frozen=True)
class HighlightTags:
    pre: str = "<em>"
    post: str = "</em>"
    fragment_chars: int = 100  # a fragment around the matches, about this long
    fragments: int = 3  # at most this many per field

    def __post_init__(self) -> None:
        for name in ("fragment_chars", "fragments"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"highlight: tags.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.pre, str) or not isinstance(self.post, str):
            raise ValueError("highlight: tags.pre and tags.post must be strings")


def check_highlight_fields(fields: Sequence[str]) -> list[str]:
    """The fields asked for, each one of HIGHLIGHT_FIELDS (ValueError naming the first that is not)."""
    fields = list(fields)
    for name in fields:
        if name not in HIGHLIGHT_FIELDS:
            raise ValueError(f"highlight: fields must be among {HIGHLIGHT_FIELDS}, got {name!r}")
    return fields


@dataclass(frozen=True)
class TermCount:
    term: str
    doc_freq: int  # products holding the word (title words) or the value (brand, category)
    kind: Literal["term", "brand", "category"] = field(default="term")


@runtime_checkable
class Backend(Protocol):
    """Storage + retrieval. Scores are higher-is-better; candidates carry their Product."""

    def bm25(self, text: str, filters: Filters | None, n: int) -> list[Candidate]:
        """Lexical top-n, filters applied inside the query. Candidate.bm25 set, ranks["bm25"] set."""
        ...

    def knn(self, vector: np.ndarray, filters: Filters | None, n: int) -> list[Candidate]:
        """Vector top-n (inner product on normalised vectors), filters applied inside the search."""
        ...

    def get(self, ids: Sequence[str]) -> list[Product]:
        """Products by id, in the order asked, missing ids skipped."""
        ...

    def upsert(self, products: Sequence[Product], vectors: np.ndarray | None) -> None:
        """Insert or replace by id, atomically for the batch. vectors: float32 [len(products), dim]."""
        ...

    def delete(self, ids: Sequence[str]) -> int:
        """Remove by id; returns how many existed."""
        ...

    def update_signals(self, updates: Sequence[SignalUpdate]) -> list[str]:
        """Apply price/sales/stock changes without touching text or vectors; returns ids not found."""
        ...

    def iter_ids(self) -> Iterator[str]:
        """Every product id (for pruning a snapshot)."""
        ...

    def content_hashes(self, ids: Sequence[str]) -> dict[str, str]:
        """Product.content_hash() of stored products (to skip unchanged rows on re-index)."""
        ...

    def count(self) -> int: ...

    def embedder_binding(self) -> EmbedderBinding | None:
        """The recorded binding, or None for a store never bound."""
        ...

    def bind_embedder(self, binding: EmbedderBinding) -> None:
        """Record it on an unbound store; EmbedderMismatch when another is recorded and the store has products."""
        ...

    def stats(self) -> StoreStats:
        """Products, vectors, vector dimension, size on disk / in the cluster, the embedder binding."""
        ...

    def count_matches(self, match: MatchSet) -> int:
        """The exact number of products in the match set."""
        ...

    def listing(self, match: MatchSet, sort: Sequence[SortKey], offset: int, n: int) -> list[Candidate]:
        """The match set ordered by `sort`, then by id; positions [offset, offset + n). bm25 set on text matches."""
        ...

    def facets(self, match: MatchSet, specs: Sequence[FacetSpec]) -> list[Facet]:
        """One Facet per spec, in order, counted over the match set (never the whole store)."""
        ...

    def highlight(
        self, text: str, ids: Sequence[str], fields: Sequence[str], tags: HighlightTags
    ) -> dict[str, dict[str, list[str]]]:
        """{id: {field: fragments}} where `text`'s tokens occur; HTML-escaped except the tags."""
        ...

    def prefix_terms(self, prefix: str, n: int) -> list[TermCount]:
        """Up to n indexed words of titles, brands and categories starting with `prefix`, most frequent first."""
        ...

    def fuzzy_terms(self, word: str, max_edits: int, n: int) -> list[TermCount]:
        """Up to n indexed title words within `max_edits` (1 or 2) edits of `word`, nearest then most frequent."""
        ...

    def force_merge(self) -> tuple[int, int]:
        """Merge the lexical index's segments into as few as the engine makes; (segments before, after)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class HybridBackend(Protocol):
    """A backend that can also fuse BM25 and kNN itself (OpenSearch's hybrid query + search pipeline)."""

    @property
    def fuses_server_side(self) -> bool:
        """True when configured to fuse on the server; the pipeline then calls hybrid()."""
        ...

    def hybrid(self, text: str, vector: np.ndarray, filters: Filters | None, n: int) -> list[Candidate]:
        """Fused top-n: Candidate.fused set (bm25/knn may be None)."""
        ...
