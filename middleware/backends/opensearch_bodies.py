"""Pure builders for every request body the OpenSearch backend sends.

No client, no I/O: each function returns plain JSON-able dicts, so the contract tests can check every body
against the official OpenSearch API specification (see `tests/support/opensearch_spec.py`), and `index_templates/*.json`
are these same bodies rendered for the default settings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from middleware.backends.base import EmbedderBinding
from middleware.config import FusionSettings, OpenSearchSettings
from middleware.products import Filters, Product, SignalUpdate

VECTOR_FIELD = "vector"
# text fields analysed twice: words (smartcn / IK / standard) + a `cjk` bigram sub-field
TEXT_FIELDS: tuple[str, ...] = ("title", "description", "brand", "category")
KEYWORD_SUBFIELD_FIELDS: tuple[str, ...] = ("brand", "category")
FIELD_BOOSTS: dict[str, float] = {"title": 3.0, "description": 1.0, "brand": 1.0, "category": 1.0}
WORD_ANALYZERS: tuple[str, ...] = ("smartcn", "ik_smart", "standard")  # "auto" tries them in this order
TEMPLATE_VERSION = 1  # bump when a template body changes: `init` compares it with what the cluster holds
OWNER_META = {"owner": "shopsearch", "template_version": TEMPLATE_VERSION}
EMBEDDER_META_KEY = "shopsearch"  # mapping _meta: {"shopsearch": {"embedder": ..., "dim": ...}}


# ---------------------------------------------------------------- names


def read_alias(cfg: OpenSearchSettings) -> str:
    return cfg.read_alias or cfg.index_prefix


def write_alias(cfg: OpenSearchSettings) -> str:
    return cfg.write_alias or f"{cfg.index_prefix}-write"


def index_name(cfg: OpenSearchSettings, version: int) -> str:
    return f"{cfg.index_prefix}-v{version}"


def index_pattern(cfg: OpenSearchSettings) -> str:
    return f"{cfg.index_prefix}-v*"


def component_template_names(cfg: OpenSearchSettings, *, with_vector: bool) -> list[str]:
    base = f"{cfg.index_prefix}-shopsearch"
    names = [f"{base}-settings", f"{base}-text"]
    if with_vector:
        names.append(f"{base}-vector")
    return names


def index_template_name(cfg: OpenSearchSettings) -> str:
    return f"{cfg.index_prefix}-shopsearch"


# ---------------------------------------------------------------- templates and index


def index_settings(cfg: OpenSearchSettings, *, with_vector: bool, bulk_load: bool = False) -> dict[str, Any]:
    """Index settings. `bulk_load`: no refresh, no replicas (a full build; restored afterwards)."""
    index: dict[str, Any] = {
        "number_of_shards": cfg.shards,
        "number_of_replicas": 0 if bulk_load else cfg.replicas,
        "refresh_interval": "-1" if bulk_load else cfg.refresh_interval,
    }
    if with_vector:
        index["knn"] = True
    return {"index": index}


def restore_settings(cfg: OpenSearchSettings) -> dict[str, Any]:
    """Settings put back after a bulk load (the dynamic ones only)."""
    return {"index": {"number_of_replicas": cfg.replicas, "refresh_interval": cfg.refresh_interval}}


def _text_field(word_analyzer: str, *, keyword: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {"cjk": {"type": "text", "analyzer": "cjk"}}
    if keyword:
        fields["keyword"] = {"type": "keyword", "ignore_above": 256}
    return {"type": "text", "analyzer": word_analyzer, "fields": fields}


def text_mappings(word_analyzer: str) -> dict[str, Any]:
    """Everything but the vector: the Product JSON, indexed for BM25 and filters."""
    properties: dict[str, Any] = {"id": {"type": "keyword"}}
    for name in TEXT_FIELDS:
        properties[name] = _text_field(word_analyzer, keyword=name in KEYWORD_SUBFIELD_FIELDS)
    properties.update(
        {
            "price": {"type": "double"},
            "sales": {"type": "long"},
            "stock": {"type": "long"},
            # stored in _source for the Product, not indexed: free-form per catalog
            "attributes": {"type": "object", "enabled": False},
            "url": {"type": "keyword", "index": False, "doc_values": False},
            "image": {"type": "keyword", "index": False, "doc_values": False},
            "content_hash": {"type": "keyword", "index": False},
        }
    )
    return {
        # strict: a misspelled field is a write error, never a silent new mapping
        "dynamic": "strict",
        "_meta": dict(OWNER_META),
        "properties": properties,
    }


def vector_field(cfg: OpenSearchSettings, dim: int) -> dict[str, Any]:
    """knn_vector: HNSW on the configured engine, inner product (vectors are L2-normalised by the embedder)."""
    if dim < 1:
        raise ValueError(f"vector dimension must be positive, got {dim}")
    if cfg.vector_compression == "fp16" and cfg.vector_mode == "on_disk":
        raise ValueError(
            "opensearch.vector_compression=fp16 and vector_mode=on_disk cannot be combined: "
            "on_disk chooses its own quantisation; pick one"
        )
    if cfg.vector_compression == "fp16" and cfg.knn_engine == "lucene":
        raise ValueError(
            "opensearch.vector_compression=fp16 needs opensearch.knn_engine=faiss: "
            "the lucene engine has no fp16 encoder"
        )
    parameters: dict[str, Any] = {"m": cfg.hnsw_m, "ef_construction": cfg.hnsw_ef_construction}
    if cfg.knn_engine == "faiss":
        # lucene refuses ef_search in the mapping; every query passes it as method_parameters anyway
        parameters["ef_search"] = cfg.hnsw_ef_search
    if cfg.vector_compression == "fp16":
        parameters["encoder"] = {"name": "sq", "parameters": {"type": "fp16"}}
    field: dict[str, Any] = {
        "type": "knn_vector",
        "dimension": dim,
        "space_type": "innerproduct",
        "method": {"name": "hnsw", "engine": cfg.knn_engine, "parameters": parameters},
    }
    if cfg.vector_mode == "on_disk":
        field["mode"] = "on_disk"
    return field


def vector_mappings(cfg: OpenSearchSettings, dim: int) -> dict[str, Any]:
    # The vector stays in the stored _source: a partial `_update` rebuilds the document from _source,
    # so a mapping-level `_source.excludes` would silently drop the vector on every signal update
    # (the osmem suite caught this). Reads leave it out instead (`_source.excludes` per request).
    return {"properties": {VECTOR_FIELD: vector_field(cfg, dim)}}


def mappings(cfg: OpenSearchSettings, dim: int | None, word_analyzer: str) -> dict[str, Any]:
    body = text_mappings(word_analyzer)
    if dim:
        body["properties"] = {**body["properties"], **vector_mappings(cfg, dim)["properties"]}
    return body


def component_templates(cfg: OpenSearchSettings, dim: int | None, word_analyzer: str) -> dict[str, dict[str, Any]]:
    """name -> PUT _component_template body (settings, text mapping, and the vector when dim is set)."""
    names = component_template_names(cfg, with_vector=bool(dim))
    bodies: dict[str, dict[str, Any]] = {
        names[0]: {
            "template": {"settings": index_settings(cfg, with_vector=bool(dim))},
            "version": TEMPLATE_VERSION,
            "_meta": dict(OWNER_META),
        },
        names[1]: {
            "template": {"mappings": text_mappings(word_analyzer)},
            "version": TEMPLATE_VERSION,
            "_meta": dict(OWNER_META),
        },
    }
    if dim:
        bodies[names[2]] = {
            # k-NN validates a component template on its own: its vector mapping needs index.knn beside it
            "template": {"settings": {"index": {"knn": True}}, "mappings": vector_mappings(cfg, dim)},
            "version": TEMPLATE_VERSION,
            "_meta": dict(OWNER_META),
        }
    return bodies


def index_template(cfg: OpenSearchSettings, *, with_vector: bool) -> dict[str, Any]:
    """PUT _index_template body: every `<prefix>-v*` index gets the component templates."""
    return {
        "index_patterns": [index_pattern(cfg)],
        "composed_of": component_template_names(cfg, with_vector=with_vector),
        "priority": 200,
        "version": TEMPLATE_VERSION,
        "_meta": dict(OWNER_META),
    }


def create_index(
    cfg: OpenSearchSettings,
    dim: int | None,
    word_analyzer: str,
    *,
    bulk_load: bool = False,
    aliases: bool = False,
    embedder: EmbedderBinding | None = None,
) -> dict[str, Any]:
    """PUT <index> body, complete on its own (it does not rely on the templates being installed).

    `aliases`: attach the read and write aliases at creation (the very first index only; a rebuild
    swaps them with `alias_swap`). `embedder`: recorded in the mapping's `_meta`.
    """
    body: dict[str, Any] = {
        "settings": index_settings(cfg, with_vector=bool(dim), bulk_load=bulk_load),
        "mappings": mappings(cfg, dim, word_analyzer),
    }
    if embedder is not None:
        body["mappings"]["_meta"].update(embedder_meta(embedder))
    if aliases:
        body["aliases"] = {read_alias(cfg): {}, write_alias(cfg): {"is_write_index": True}}
    return body


def embedder_meta(binding: EmbedderBinding) -> dict[str, Any]:
    """The mapping `_meta` entry recording which embedder an index's vectors come from."""
    return {EMBEDDER_META_KEY: {"embedder": binding.model, "dim": binding.dim}}


def put_mapping_meta(current_meta: dict[str, Any], binding: EmbedderBinding) -> dict[str, Any]:
    """PUT <index>/_mapping body recording the embedder. `_meta` is replaced whole: keep what it held."""
    return {"_meta": {**current_meta, **embedder_meta(binding)}}


def normalized_weights(fusion: FusionSettings) -> list[float]:
    """[bm25, knn] weights summing to 1 (the normalization processor requires it)."""
    total = fusion.bm25_weight + fusion.knn_weight
    if total <= 0:
        return [0.5, 0.5]
    return [round(fusion.bm25_weight / total, 6), round(1.0 - round(fusion.bm25_weight / total, 6), 6)]


def search_pipeline(cfg: OpenSearchSettings, fusion: FusionSettings) -> dict[str, Any]:
    """PUT _search/pipeline body for the hybrid query: sub-query order is [bm25, knn]."""
    if cfg.hybrid_normalization == "rrf":
        processor: dict[str, Any] = {
            "score-ranker-processor": {"combination": {"technique": "rrf", "rank_constant": fusion.rrf_k}}
        }
    else:
        processor = {
            "normalization-processor": {
                "normalization": {"technique": cfg.hybrid_normalization},
                "combination": {
                    "technique": "arithmetic_mean",
                    "parameters": {"weights": normalized_weights(fusion)},
                },
            }
        }
    return {
        "description": f"shopsearch hybrid retrieval ({cfg.hybrid_normalization}); bm25 first, knn second",
        "phase_results_processors": [processor],
    }


def analyze(analyzer: str, text: str) -> dict[str, Any]:
    """POST _analyze body: used at startup to see which word analyzer the cluster has."""
    return {"analyzer": analyzer, "text": text}


# ---------------------------------------------------------------- queries


def filter_clauses(filters: Filters | None) -> list[dict[str, Any]]:
    """Filters as bool.filter clauses; same semantics as `Filters.matches`."""
    if filters is None:
        return []
    clauses: list[dict[str, Any]] = []
    if filters.category is not None:
        clauses.append({"terms": {"category.keyword": list(filters.category)}})
    if filters.brand is not None:
        clauses.append({"terms": {"brand.keyword": list(filters.brand)}})
    if filters.price_min is not None or filters.price_max is not None:
        bounds: dict[str, float] = {}
        if filters.price_min is not None:
            bounds["gte"] = filters.price_min
        if filters.price_max is not None:
            bounds["lte"] = filters.price_max
        clauses.append({"range": {"price": bounds}})
    if filters.in_stock:
        # stock not tracked (field absent) counts as in stock
        clauses.append(
            {
                "bool": {
                    "should": [
                        {"range": {"stock": {"gt": 0}}},
                        {"bool": {"must_not": [{"exists": {"field": "stock"}}]}},
                    ],
                    "minimum_should_match": 1,
                }
            }
        )
    if filters.ids is not None:
        clauses.append({"terms": {"id": list(filters.ids)}})
    if filters.exclude:
        # a product matching any exclude clause (each its fields together) is left out
        negative = [{"bool": {"filter": filter_clauses(clause)}} for clause in filters.exclude]
        clauses.append({"bool": {"must_not": negative}})
    return clauses


def bm25_fields() -> list[str]:
    """Each text field twice: its words and its CJK bigrams, same boost."""
    fields = []
    for name, boost in FIELD_BOOSTS.items():
        suffix = "" if boost == 1.0 else f"^{boost:g}"
        fields += [f"{name}{suffix}", f"{name}.cjk{suffix}"]
    return fields


# A query's tokens: Lucene counts every leaf clause of the whole query against
# indices.query.bool.max_clause_count (1,024 by default), and each token is one clause per queried
# field (8 of them), so longer text (a pasted document) is cut to what fits, with room for the filters.
MAX_CLAUSES = 1024
MAX_QUERY_TOKENS = (MAX_CLAUSES - 64) // (2 * len(FIELD_BOOSTS))
# over-counts what the analyzers make (a word or one CJK character each), so the cut is always safe
_TOKEN_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+")


def bounded_text(text: str) -> str:
    """`text` cut after its MAX_QUERY_TOKENS-th token (pasted documents), unchanged when shorter."""
    for i, match in enumerate(_TOKEN_RE.finditer(text), start=1):
        if i == MAX_QUERY_TOKENS:
            return text[: match.end()]
    return text


def bm25_clause(text: str, filters: Filters | None) -> dict[str, Any]:
    """The lexical query: words and bigram sub-fields summed (most_fields), filters in bool.filter."""
    query: dict[str, Any] = {
        "bool": {
            "must": [{"multi_match": {"query": bounded_text(text), "fields": bm25_fields(), "type": "most_fields"}}],
        }
    }
    clauses = filter_clauses(filters)
    if clauses:
        query["bool"]["filter"] = clauses
    return query


def _source_spec() -> dict[str, Any]:
    return {"excludes": [VECTOR_FIELD]}


def bm25_search(text: str, filters: Filters | None, n: int) -> dict[str, Any]:
    return {
        "size": n,
        "query": bm25_clause(text, filters),
        "_source": _source_spec(),
        "track_total_hits": False,
    }


def _vector_list(vector: np.ndarray | Sequence[float]) -> list[float]:
    arr = np.asarray(vector, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError("query vector contains NaN or infinite values")
    return [float(x) for x in arr]


def knn_clause(vector: np.ndarray | Sequence[float], filters: Filters | None, k: int, ef_search: int) -> dict[str, Any]:
    """k-NN with the filters INSIDE the clause (efficient filtering), not as a post-filter."""
    inner: dict[str, Any] = {
        "vector": _vector_list(vector),
        "k": k,
        # ef_search below k would cap recall: never search a smaller beam than asked for
        "method_parameters": {"ef_search": max(ef_search, k)},
    }
    clauses = filter_clauses(filters)
    if clauses:
        inner["filter"] = {"bool": {"filter": clauses}}
    return {"knn": {VECTOR_FIELD: inner}}


def knn_search(vector: np.ndarray | Sequence[float], filters: Filters | None, n: int, ef_search: int) -> dict[str, Any]:
    return {
        "size": n,
        "query": knn_clause(vector, filters, n, ef_search),
        "_source": _source_spec(),
        "track_total_hits": False,
    }


def hybrid_search(
    text: str,
    vector: np.ndarray | Sequence[float],
    filters: Filters | None,
    n: int,
    ef_search: int,
) -> dict[str, Any]:
    """One hybrid query (bm25 then knn), normalised and combined by the search pipeline."""
    return {
        "size": n,
        "query": {
            "hybrid": {
                "queries": [bm25_clause(text, filters), knn_clause(vector, filters, n, ef_search)],
                "pagination_depth": n,
            }
        },
        "_source": _source_spec(),
    }


def scan_all() -> dict[str, Any]:
    """Every document id, in index order (the cheapest scroll order), no source."""
    return {"query": {"match_all": {}}, "_source": False, "sort": ["_doc"]}


def exists_query(field_name: str) -> dict[str, Any]:
    """_count body: documents having a field (e.g. how many carry a vector)."""
    return {"query": {"exists": {"field": field_name}}}


def ids_search(ids: Sequence[str]) -> dict[str, Any]:
    """mget body: products by id, vectors left out."""
    return {"ids": list(ids)}


# ---------------------------------------------------------------- documents and bulk


def document(product: Product, vector: np.ndarray | Sequence[float] | None) -> dict[str, Any]:
    """The indexed document: the Product JSON (the source of truth for reads) + hash + vector."""
    doc = product.model_dump(mode="json")
    doc["content_hash"] = product.content_hash()
    if vector is not None:
        doc[VECTOR_FIELD] = _vector_list(vector)
    return doc


BulkPair = tuple[dict[str, Any], dict[str, Any] | None]


def bulk_index_actions(
    index: str,
    products: Sequence[Product],
    vectors: np.ndarray | None,
    *,
    require_alias: bool,
) -> Iterable[BulkPair]:
    """(action line, source line) pairs for `_bulk` index operations."""
    if vectors is not None and len(vectors) != len(products):
        raise ValueError(f"got {len(products)} products but {len(vectors)} vectors")
    for i, product in enumerate(products):
        meta: dict[str, Any] = {"_index": index, "_id": product.id}
        if require_alias:
            meta["require_alias"] = True
        yield {"index": meta}, document(product, None if vectors is None else vectors[i])


def signal_doc(update: SignalUpdate) -> dict[str, Any]:
    """The partial document of a signal update: only the fields it sets."""
    return update.model_dump(exclude={"id"}, exclude_none=True)


def partial_update(update: SignalUpdate) -> dict[str, Any]:
    """POST <index>/_update/<id> body."""
    return {"doc": signal_doc(update)}


def bulk_update_actions(index: str, updates: Sequence[SignalUpdate], *, require_alias: bool) -> Iterable[BulkPair]:
    for update in updates:
        meta: dict[str, Any] = {"_index": index, "_id": update.id, "retry_on_conflict": 3}
        if require_alias:
            meta["require_alias"] = True
        yield {"update": meta}, partial_update(update)


def bulk_delete_actions(index: str, ids: Sequence[str]) -> Iterable[BulkPair]:
    for product_id in ids:
        yield {"delete": {"_index": index, "_id": product_id}}, None


def alias_swap(
    read: str,
    write: str,
    new_index: str,
    *,
    old_read: Sequence[str] = (),
    old_write: Sequence[str] = (),
) -> dict[str, Any]:
    """POST _aliases body: both aliases move to the new index in ONE atomic call.

    `old_read` / `old_write`: the indexes holding each alias now (removing an alias an index does not
    hold fails the whole call, so each list is exact).
    """
    actions: list[dict[str, Any]] = []
    for old in old_read:
        actions.append({"remove": {"index": old, "alias": read}})
    for old in old_write:
        actions.append({"remove": {"index": old, "alias": write}})
    actions.append({"add": {"index": new_index, "alias": read}})
    actions.append({"add": {"index": new_index, "alias": write, "is_write_index": True}})
    return {"actions": actions}


# ---------------------------------------------------------------- storefront primitives

TEXT_QUERY_NAME = "text"  # the named lexical clause: a hit listing it in `matched_queries` is a text match
TERMS_FIELD = "title.cjk"  # prefix/fuzzy terms: unstemmed lowercase words (CJK: bigrams), as typed by shoppers
TERMS_SOURCE_FIELD = "title"
FACET_FIELDS: dict[str, str] = {"brand": "brand.keyword", "category": "category.keyword"}
SORT_TIEBREAK = "id"
# Longer prefixes match nothing: the case-insensitive value regexp must stay under the index's
# max_regex_length (1,000 by default), and no shopper types 100 characters to get a completion.
MAX_PREFIX_CHARS = 100
MAX_TERMS = 10_000  # prefix/fuzzy terms asked for beyond this are capped to it
# Lucene RegExp operators (terms `include`): every other character stands for itself
_REGEXP_SPECIAL = set('.?+*|{}[]()"\\#@&<>~^$')


def match_set_query(text: str | None, filters: Filters | None, ids: Sequence[str] = ()) -> dict[str, Any]:
    """(text OR ids) AND filters. Text matching is bm25's (any token, same fields); `text` None matches
    every product (ids then add nothing). The ids clause scores 0, so `_score` is the text's BM25 alone."""
    query: dict[str, Any] = {"bool": {}}
    if text is not None:
        should: list[dict[str, Any]] = [
            {
                "multi_match": {
                    "query": bounded_text(text),
                    "fields": bm25_fields(),
                    "type": "most_fields",
                    "_name": TEXT_QUERY_NAME,
                }
            }
        ]
        if ids:
            should.append({"constant_score": {"filter": {"ids": {"values": list(ids)}}, "boost": 0.0}})
        query["bool"]["must"] = [{"bool": {"should": should, "minimum_should_match": 1}}]
    clauses = filter_clauses(filters)
    if clauses:
        query["bool"]["filter"] = clauses
    if not query["bool"]:
        return {"match_all": {}}
    return query


def count_body(text: str | None, filters: Filters | None, ids: Sequence[str] = ()) -> dict[str, Any]:
    """POST _count body: the exact size of the match set."""
    return {"query": match_set_query(text, filters, ids)}


def sort_clauses(keys: Sequence[tuple[str, bool]]) -> list[dict[str, Any]]:
    """(field, descending) pairs → sort clauses: missing values last either way, then the id."""
    out: list[dict[str, Any]] = []
    for name, descending in keys:
        order = "desc" if descending else "asc"
        if name == "_score":
            out.append({"_score": {"order": order}})
        else:
            out.append({name: {"order": order, "missing": "_last"}})
    out.append({SORT_TIEBREAK: {"order": "asc"}})
    return out


def listing_search(
    query: dict[str, Any],
    sort: list[dict[str, Any]],
    size: int,
    *,
    offset: int = 0,
    search_after: list[Any] | None = None,
    source: bool = True,
) -> dict[str, Any]:
    """One page of a listing: from/size within the result window, search_after beyond it.
    `source` False: a page skipped on the way to a deep offset, only its sort values come back."""
    body: dict[str, Any] = {
        "size": size,
        "query": query,
        "sort": sort,
        "track_scores": source,
        "track_total_hits": False,
        "_source": _source_spec() if source else False,
    }
    if not source:
        body["stored_fields"] = "_none_"
    if search_after is not None:
        body["search_after"] = search_after
    elif offset:
        body["from"] = offset
    return body


def facet_aggregation(field_name: str, size: int | None, ranges: Any, stats: bool) -> dict[str, Any]:
    """One FacetSpec as an aggregation: terms (count desc, value asc), keyed range buckets, or stats."""
    if field_name in FACET_FIELDS:
        return {
            "terms": {
                "field": FACET_FIELDS[field_name],
                "size": size,
                # exact counts on any shard count up to this many distinct values per shard
                "shard_size": max(10_000, size or 0),
                "order": [{"_count": "desc"}, {"_key": "asc"}],
            }
        }
    if stats:
        return {"stats": {"field": field_name}}
    buckets: list[dict[str, Any]] = []
    for i, (start, end) in enumerate(ranges):
        if field_name != "price":  # long fields: OpenSearch cuts fractional bounds; x >= a iff x >= ceil(a)
            start = None if start is None else math.ceil(start)
            end = None if end is None else math.ceil(end)
        bucket: dict[str, Any] = {"key": str(i)}
        if start is not None:
            bucket["from"] = start
        if end is not None:
            bucket["to"] = end
        buckets.append(bucket)
    return {"range": {"field": field_name, "ranges": buckets, "keyed": True}}


def facets_search(query: dict[str, Any], aggs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"size": 0, "query": query, "aggs": aggs, "track_total_hits": False}


def highlight_search(
    text: str,
    ids: Sequence[str],
    fields: Sequence[str],
    pre: str,
    post: str,
    fragment_chars: int,
    fragments: int,
) -> dict[str, Any]:
    """The products among `ids` that `text` matches, with highlights of each field and its cjk sub-field;
    `encoder: html` escapes the product text (never the tags)."""
    return {
        "size": len(ids),
        "query": match_set_query(text, Filters(ids=list(ids))),
        "_source": False,
        "track_total_hits": False,
        "highlight": {
            "encoder": "html",  # the unified highlighter: the default one
            "pre_tags": [pre],
            "post_tags": [post],
            "fragment_size": fragment_chars,
            "number_of_fragments": fragments,
            "fields": {name: {} for field_name in fields for name in (field_name, f"{field_name}.cjk")},
        },
    }


def regexp_literal(text: str, *, ignore_case: bool) -> str:
    """`text` as a Lucene RegExp matching it literally (operators escaped), letters in either case when asked."""
    out = []
    for char in text:
        variants = list(dict.fromkeys([char, char.lower(), char.upper()])) if ignore_case else [char]
        escaped = ["".join("\\" + c if c in _REGEXP_SPECIAL else c for c in v) for v in variants]
        if len(escaped) == 1:
            out.append(escaped[0])
        elif all(len(v) == 1 for v in variants):
            out.append("[" + "".join(escaped) + "]")  # letters only: no class operator among them
        else:
            out.append("(" + "|".join(escaped) + ")")  # a case form of several characters (ß → SS)
    return "".join(out)


def prefix_terms_search(prefix: str, size: int) -> dict[str, Any]:
    """Title words (of TERMS_FIELD) and brand/category values starting with `prefix`, with document counts.

    Title words: a `significant_text` aggregation over the products holding such a word (a `prefix`
    query), re-analysing their titles; its heuristic is the foreground count, and since every product
    holding a matching word is in the foreground, that count is the word's exact document frequency.
    Brands and categories: `terms` aggregations with a case-insensitive literal `include` regexp.
    """
    token = prefix.lower()
    value_pattern = regexp_literal(prefix, ignore_case=True) + ".*"
    aggs: dict[str, Any] = {
        "term": {
            "filter": {"prefix": {TERMS_FIELD: token}},
            "aggs": {
                "words": {
                    "significant_text": {
                        "field": TERMS_FIELD,
                        "source_fields": [TERMS_SOURCE_FIELD],
                        "include": regexp_literal(token, ignore_case=False) + ".*",
                        "size": size,
                        "shard_size": max(10_000, size),
                        "min_doc_count": 1,
                        "shard_min_doc_count": 1,
                        "script_heuristic": {
                            "script": {"lang": "painless", "source": "params._subset_freq.longValue()"}
                        },
                    }
                }
            },
        }
    }
    for kind, field_name in FACET_FIELDS.items():
        aggs[kind] = {
            "terms": {
                "field": field_name,
                "include": value_pattern,
                # OpenSearch 2.19's global-ordinals path fails (index_out_of_bounds) when no value matches
                "execution_hint": "map",
                "size": size,
                "shard_size": max(10_000, size),
                "order": [{"_count": "desc"}, {"_key": "asc"}],
            }
        }
    return {"size": 0, "query": {"match_all": {}}, "aggs": aggs, "track_total_hits": False}


def fuzzy_terms_search(word: str, max_edits: int, size: int) -> dict[str, Any]:
    """Title words (of TERMS_FIELD) within `max_edits` of `word`: the `term` suggester (any first letter,
    any word length, suggestions even for a word that is indexed), plus the word's own document count."""
    token = word.lower()
    return {
        "size": 0,
        "query": {"term": {TERMS_FIELD: token}},
        "track_total_hits": True,
        "suggest": {
            "text": word,
            "fuzzy": {
                "term": {
                    "field": TERMS_FIELD,
                    "suggest_mode": "always",
                    "max_edits": max_edits,
                    "prefix_length": 0,
                    "min_word_length": 1,
                    "accuracy": 0.0,
                    "size": size,
                    "max_inspections": 50,
                    "max_term_freq": 1.0,
                    "sort": "score",
                    "string_distance": "damerau_levenshtein",
                },
            },
        },
    }
