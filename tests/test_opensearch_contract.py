"""Every request body the OpenSearch backend sends, checked against the official API spec (strict mode).

Strict: unknown keys are rejected (see tests/support/opensearch_spec.py), so the broken-body
tests below prove the check has teeth. Skips only when the spec file is absent.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from middleware.backends import opensearch_bodies as bodies
from middleware.backends.base import BackendError, EmbedderBinding
from middleware.backends.opensearch_client import client_kwargs, redact_url
from middleware.config import FusionSettings, OpenSearchSettings, Settings
from middleware.products import Filters, Product, SignalUpdate
from tests.support.opensearch_spec import KNOWN_GAPS, SpecNotFoundError, find_spec, load_contract

REPO = Path(__file__).resolve().parents[1]
DIM = 8
CFG = OpenSearchSettings()
ALL_FILTERS = Filters(category=["连衣裙"], brand=["Acme"], price_min=10, price_max=99.5, in_stock=True, ids=["1", "2"])
VEC = np.linspace(-1, 1, DIM, dtype=np.float32)


@pytest.fixture(scope="module")
def contract():
    try:
        path = find_spec()
    except SpecNotFoundError as err:
        pytest.skip(f"OpenSearch API spec absent: {err}")
    return load_contract(str(path))


def _variants() -> dict[str, OpenSearchSettings]:
    return {
        "hnsw": CFG,
        "fp16": CFG.model_copy(update={"vector_compression": "fp16"}),
        "on_disk": CFG.model_copy(update={"vector_mode": "on_disk"}),
        "tuned": CFG.model_copy(update={"hnsw_m": 32, "hnsw_ef_construction": 256, "hnsw_ef_search": 64}),
        "lucene": CFG.model_copy(update={"knn_engine": "lucene"}),
        "lucene-on_disk": CFG.model_copy(update={"knn_engine": "lucene", "vector_mode": "on_disk"}),
    }


def _valid_bodies() -> list[tuple[str, str, Any]]:
    """(case id, request body name in the spec, body)."""
    cases: list[tuple[str, str, Any]] = []
    for name, body in bodies.component_templates(CFG, DIM, "smartcn").items():
        cases.append((f"component-{name}", "cluster.put_component_template", body))
    for name, body in bodies.component_templates(CFG, None, "ik_smart").items():
        cases.append((f"component-novector-{name}", "cluster.put_component_template", body))
    cases.append(("index-template", "indices.put_index_template", bodies.index_template(CFG, with_vector=True)))
    for variant, cfg in _variants().items():
        cases.append((f"create-{variant}", "indices.create", bodies.create_index(cfg, DIM, "smartcn")))
    cases.append(
        (
            "create-bulkload-aliases",
            "indices.create",
            bodies.create_index(CFG, DIM, "standard", bulk_load=True, aliases=True),
        )
    )
    cases.append(("create-bm25-only", "indices.create", bodies.create_index(CFG, None, "standard")))
    bound = EmbedderBinding("bge-small-zh-v1.5", DIM)
    cases.append(("create-with-embedder", "indices.create", bodies.create_index(CFG, DIM, "smartcn", embedder=bound)))
    meta = bodies.put_mapping_meta(dict(bodies.OWNER_META), EmbedderBinding("none", None))
    cases.append(("put-mapping-embedder", "indices.put_mapping", meta))
    cases.append(("restore-settings", "indices.put_settings", bodies.restore_settings(CFG)))
    for technique in ("min_max", "l2", "z_score", "rrf"):
        cfg = CFG.model_copy(update={"hybrid_normalization": technique})
        cases.append((f"pipeline-{technique}", "search_pipeline.put", bodies.search_pipeline(cfg, FusionSettings())))
    cases.append(("bm25", "search", bodies.bm25_search("红色连衣裙", None, 10)))
    cases.append(("bm25-filters", "search", bodies.bm25_search("红色连衣裙", ALL_FILTERS, 10)))
    cases.append(("knn", "search", bodies.knn_search(VEC, None, 10, 100)))
    cases.append(("knn-filters", "search", bodies.knn_search(VEC, ALL_FILTERS, 10, 100)))
    cases.append(("hybrid-filters", "search", bodies.hybrid_search("连衣裙", VEC, ALL_FILTERS, 20, 100)))
    cases.append(("scan", "search", bodies.scan_all()))
    cases.append(("count-vectors", "count", bodies.exists_query(bodies.VECTOR_FIELD)))
    cases.append(("mget", "mget", bodies.ids_search(["1", "2"])))
    cases.append(("partial-update", "update", bodies.partial_update(SignalUpdate(id="1", price=9.9, stock=0))))
    cases.append(
        (
            "alias-swap",
            "indices.update_aliases",
            bodies.alias_swap("p", "p-w", "p-v2", old_read=["p-v1"], old_write=["p-v1"]),
        )
    )
    cases.append(("alias-first", "indices.update_aliases", bodies.alias_swap("p", "p-w", "p-v1")))
    cases.append(("analyze", "indices.analyze", bodies.analyze("smartcn", "红色连衣裙")))
    cases += _storefront_bodies()
    return cases


def _storefront_bodies() -> list[tuple[str, str, Any]]:
    """The storefront primitives' bodies (count, listing pages, facets, highlight, prefix/fuzzy terms)."""
    query = bodies.match_set_query("红色 dress", ALL_FILTERS, ["1", "2"])
    sort = bodies.sort_clauses([("price", False), ("sales", True), ("_score", True)])
    aggs = {
        "brand": bodies.facet_aggregation("brand", 5, None, False),
        "category": bodies.facet_aggregation("category", 10, None, False),
        "price": bodies.facet_aggregation("price", None, ((None, 10.0), (10.0, 50.0), (50.0, None)), False),
        "sales": bodies.facet_aggregation("sales", None, None, True),
    }
    return [
        ("count-match-set", "count", bodies.count_body("红色 dress", ALL_FILTERS, ["1"])),
        ("count-browse", "count", bodies.count_body(None, None)),
        ("listing-page", "search", bodies.listing_search(query, sort, 20, offset=40)),
        ("listing-after", "search", bodies.listing_search(query, sort, 20, search_after=[9.5, 3, 1.2, "a"])),
        ("listing-skip", "search", bodies.listing_search(query, sort, 100, search_after=[1, 2], source=False)),
        ("facets", "search", bodies.facets_search(query, aggs)),
        (
            "highlight",
            "search",
            bodies.highlight_search("红色 dress", ["1", "2"], ["title", "description"], "<em>", "</em>", 100, 3),
        ),
        ("prefix-terms", "search", bodies.prefix_terms_search("Sn(.*", 10)),
        ("fuzzy-terms", "search", bodies.fuzzy_terms_search("sneakrs", 2, 20)),
    ]


VALID = _valid_bodies()


@pytest.mark.parametrize(("name", "body"), [(c[1], c[2]) for c in VALID], ids=[c[0] for c in VALID])
def test_body_matches_spec(contract, name: str, body: Any) -> None:
    assert contract.request_body_errors(name, body) == []


def _products() -> list[Product]:
    return [
        Product(
            id=1, title="红色连衣裙", brand="Acme", category=["连衣裙"], price=99, stock=3, attributes={"颜色": "红"}
        ),
        Product(id="b-2", title="蓝色衬衫", description="纯棉", stock=None),
    ]


def _bulk_pairs(with_vectors: bool = True) -> list[bodies.BulkPair]:
    vectors = np.ones((2, DIM), dtype=np.float32) if with_vectors else None
    pairs = list(bodies.bulk_index_actions("p-write", _products(), vectors, require_alias=True))
    pairs += list(bodies.bulk_index_actions("p-v2", _products(), vectors, require_alias=False))
    pairs += list(bodies.bulk_update_actions("p-write", [SignalUpdate(id="1", sales=5)], require_alias=True))
    pairs += list(bodies.bulk_delete_actions("p-write", ["1"]))
    return pairs


def test_bulk_pairs_match_spec_and_mapping(contract) -> None:
    assert contract.bulk_errors(_bulk_pairs(), bodies.mappings(CFG, DIM, "smartcn")) == []
    assert contract.bulk_errors(_bulk_pairs(False), bodies.mappings(CFG, None, "smartcn")) == []


# ---------------------------------------------------------------- broken bodies must fail


def _broken() -> list[tuple[str, str, Any]]:
    cases = []

    def mutate(case_id: str, name: str, body: Any, edit) -> None:
        body = copy.deepcopy(body)
        edit(body)
        cases.append((case_id, name, body))

    create = bodies.create_index(CFG, DIM, "smartcn")
    vector = lambda b: b["mappings"]["properties"]["vector"]  # noqa: E731
    mutate("knn-engine-typo-key", "indices.create", create, lambda b: vector(b)["method"].update(engin="faiss"))
    mutate("knn-engine-unknown", "indices.create", create, lambda b: vector(b)["method"].update(engine="faiss2"))
    mutate("knn-dimension-string", "indices.create", create, lambda b: vector(b).update(dimension="8"))
    mutate(
        "knn-param-typo", "indices.create", create, lambda b: vector(b)["method"]["parameters"].update(ef_constrution=1)
    )
    mutate("knn-space-typo", "indices.create", create, lambda b: vector(b).update(space_type="inner_product"))
    mutate(
        "text-analyser", "indices.create", create, lambda b: b["mappings"]["properties"]["title"].update(analyser="x")
    )
    mutate(
        "unknown-field-type",
        "indices.create",
        create,
        lambda b: b["mappings"]["properties"]["price"].update(type="dubble"),
    )
    mutate("settings-not-object", "indices.create", create, lambda b: b.update(settings=["knn"]))
    mutate("mappings-typo", "indices.create", create, lambda b: b.update(mapping=b.pop("mappings")))
    tmpl = bodies.index_template(CFG, with_vector=True)
    mutate(
        "template-composed-typo", "indices.put_index_template", tmpl, lambda b: b.update(composed=b.pop("composed_of"))
    )
    mutate("template-priority-str", "indices.put_index_template", tmpl, lambda b: b.update(priority="high"))
    pipe = bodies.search_pipeline(CFG, FusionSettings())
    proc = lambda b: b["phase_results_processors"][0]["normalization-processor"]  # noqa: E731
    mutate(
        "pipeline-technique", "search_pipeline.put", pipe, lambda b: proc(b)["normalization"].update(technique="minmax")
    )
    mutate(
        "pipeline-weights-str",
        "search_pipeline.put",
        pipe,
        lambda b: proc(b)["combination"]["parameters"].update(weights="0.3,0.7"),
    )
    mutate(
        "pipeline-key-typo",
        "search_pipeline.put",
        pipe,
        lambda b: proc(b).update(normalisation=proc(b).pop("normalization")),
    )
    rrf = bodies.search_pipeline(CFG.model_copy(update={"hybrid_normalization": "rrf"}), FusionSettings())
    mutate(
        "rrf-technique",
        "search_pipeline.put",
        rrf,
        lambda b: b["phase_results_processors"][0]["score-ranker-processor"]["combination"].update(technique="rfr"),
    )
    bm25 = bodies.bm25_search("x", ALL_FILTERS, 10)
    mm = lambda b: b["query"]["bool"]["must"][0]["multi_match"]  # noqa: E731
    mutate("bm25-fields-typo", "search", bm25, lambda b: mm(b).update(feilds=mm(b).pop("fields")))
    mutate("bm25-type-unknown", "search", bm25, lambda b: mm(b).update(type="most_field"))
    mutate(
        "bm25-filter-typo",
        "search",
        bm25,
        lambda b: b["query"]["bool"].update(filters=b["query"]["bool"].pop("filter")),
    )
    mutate("bm25-size-str", "search", bm25, lambda b: b.update(size="ten"))
    mutate(
        "bm25-range-typo", "search", bm25, lambda b: b["query"]["bool"]["filter"][2]["range"]["price"].update(gtee=1)
    )
    knn = bodies.knn_search(VEC, ALL_FILTERS, 10, 100)
    inner = lambda b: b["query"]["knn"]["vector"]  # noqa: E731
    mutate("knn-k-str", "search", knn, lambda b: inner(b).update(k="ten"))
    mutate("knn-vector-str", "search", knn, lambda b: inner(b).update(vector="0.1,0.2"))
    mutate("knn-filters-typo", "search", knn, lambda b: inner(b).update(filters=inner(b).pop("filter")))
    mutate("knn-method-param-typo", "search", knn, lambda b: inner(b).update(method_parameters={"efsearch": 10}))
    hybrid = bodies.hybrid_search("x", VEC, None, 10, 100)
    mutate(
        "hybrid-query-typo",
        "search",
        hybrid,
        lambda b: b["query"]["hybrid"].update(query=b["query"]["hybrid"].pop("queries")),
    )
    upd = bodies.partial_update(SignalUpdate(id="1", price=1))
    mutate("update-docs", "update", upd, lambda b: b.update(docs=b.pop("doc")))
    swap = bodies.alias_swap("p", "p-w", "p-v2", old_read=["p-v1"], old_write=["p-v1"])
    mutate("alias-is-write", "indices.update_aliases", swap, lambda b: b["actions"][-1]["add"].update(is_write=True))
    mutate(
        "alias-two-ops",
        "indices.update_aliases",
        swap,
        lambda b: b["actions"][0].update(add={"index": "x", "alias": "y"}),
    )
    mutate("alias-op-typo", "indices.update_aliases", swap, lambda b: b["actions"].append({"delete": {"index": "x"}}))
    mutate("analyze-typo", "indices.analyze", bodies.analyze("smartcn", "x"), lambda b: b.update(analyser="x"))
    listing = bodies.listing_search(bodies.match_set_query("x", None), bodies.sort_clauses([("price", True)]), 10)
    mutate("sort-option-typo", "search", listing, lambda b: b["sort"][0]["price"].update(missin="_last"))
    mutate("sort-order-unknown", "search", listing, lambda b: b["sort"][1]["id"].update(order="up"))
    mutate("score-sort-typo", "search", listing, lambda b: b["sort"].insert(0, {"_score": {"ordre": "desc"}}))
    hl = bodies.highlight_search("x", ["1"], ["title"], "<em>", "</em>", 100, 3)
    mutate("highlight-tags-str", "search", hl, lambda b: b["highlight"].update(pre_tag="<em>"))
    mutate("highlight-encoder-unknown", "search", hl, lambda b: b["highlight"].update(encoder="xml"))
    facets = bodies.facets_search({"match_all": {}}, {"b": bodies.facet_aggregation("brand", 5, None, False)})
    mutate("terms-agg-typo", "search", facets, lambda b: b["aggs"]["b"]["terms"].update(sise=5))
    fuzzy = bodies.fuzzy_terms_search("x", 1, 5)
    mutate("suggest-typo", "search", fuzzy, lambda b: b["suggest"]["fuzzy"]["term"].update(max_edit=1))
    return cases


BROKEN = _broken()


@pytest.mark.parametrize(("name", "body"), [(c[1], c[2]) for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_body_fails(contract, name: str, body: Any) -> None:
    assert contract.request_body_errors(name, body), "a broken body passed the strict check"


@pytest.mark.parametrize(
    ("case", "pair"),
    [
        ("action-typo", ({"index": {"_index": "p", "_id": "1", "requires_alias": True}}, {"id": "1", "title": "t"})),
        ("two-ops", ({"index": {"_id": "1"}, "delete": {"_id": "1"}}, {"id": "1"})),
        ("doc-unmapped-field", ({"index": {"_id": "1"}}, {"id": "1", "titel": "t"})),
        ("doc-price-str", ({"index": {"_id": "1"}}, {"id": "1", "price": "cheap"})),
        ("doc-vector-dim", ({"index": {"_id": "1"}}, {"id": "1", "vector": [0.1] * (DIM - 1)})),
        ("update-docs-typo", ({"update": {"_id": "1"}}, {"docs": {"price": 1}})),
        ("update-doc-unmapped", ({"update": {"_id": "1"}}, {"doc": {"prize": 1}})),
        ("delete-with-source", ({"delete": {"_id": "1"}}, {"id": "1"})),
    ],
)
def test_broken_bulk_pair_fails(contract, case: str, pair: bodies.BulkPair) -> None:
    assert contract.bulk_errors([pair], bodies.mappings(CFG, DIM, "smartcn"))


def test_known_gaps_are_real_gaps() -> None:
    """Each allow-list entry patches something the raw spec really lacks (z_score today)."""
    try:
        raw = json.loads(find_spec().read_text(encoding="utf-8"))
    except SpecNotFoundError as err:
        pytest.skip(f"OpenSearch API spec absent: {err}")
    techniques = raw["components"]["schemas"]["search_pipeline._common___ScoreNormalizationTechnique"]["enum"]
    assert "z_score" not in techniques
    schemas = raw["components"]["schemas"]
    assert "oneOf" in schemas["_common___SortCombinations"]
    assert "unevaluatedProperties" not in schemas["_common___SortOptions"]
    assert "accuracy" not in schemas["_core.search___TermSuggester"]["allOf"][1]["properties"]
    assert len(KNOWN_GAPS) <= 5, "the allow-list must stay short and explicit"


def test_spec_location_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SHOPSEARCH_OPENSEARCH_SPEC", str(tmp_path))
    with pytest.raises(SpecNotFoundError, match="SHOPSEARCH_OPENSEARCH_SPEC"):
        find_spec()


# ---------------------------------------------------------------- body semantics


def test_knn_mapping_follows_settings() -> None:
    cfg = CFG.model_copy(update={"hnsw_m": 24, "hnsw_ef_construction": 200, "hnsw_ef_search": 80})
    field = bodies.create_index(cfg, 1024, "smartcn")["mappings"]["properties"]["vector"]
    assert field["dimension"] == 1024 and field["space_type"] == "innerproduct"
    assert field["method"] == {
        "name": "hnsw",
        "engine": "faiss",
        "parameters": {"m": 24, "ef_construction": 200, "ef_search": 80},
    }
    fp16 = bodies.vector_field(CFG.model_copy(update={"vector_compression": "fp16"}), 4)
    assert fp16["method"]["parameters"]["encoder"] == {"name": "sq", "parameters": {"type": "fp16"}}
    assert bodies.vector_field(CFG.model_copy(update={"vector_mode": "on_disk"}), 4)["mode"] == "on_disk"
    with pytest.raises(ValueError, match="cannot be combined"):
        bodies.vector_field(CFG.model_copy(update={"vector_compression": "fp16", "vector_mode": "on_disk"}), 4)


def test_lucene_engine_mapping_has_no_ef_search_and_no_fp16() -> None:
    """lucene refuses ef_search in the mapping and has no fp16 encoder (both checked on the test node)."""
    lucene = CFG.model_copy(update={"knn_engine": "lucene", "hnsw_m": 24, "hnsw_ef_construction": 200})
    field = bodies.vector_field(lucene, 4)
    assert field["method"] == {"name": "hnsw", "engine": "lucene", "parameters": {"m": 24, "ef_construction": 200}}
    assert field["space_type"] == "innerproduct"
    with pytest.raises(ValueError, match=r"opensearch\.knn_engine=faiss"):
        bodies.vector_field(lucene.model_copy(update={"vector_compression": "fp16"}), 4)


def test_text_fields_analysed_twice_and_queried_together() -> None:
    props = bodies.mappings(CFG, None, "ik_smart")["properties"]
    for name in bodies.TEXT_FIELDS:
        assert props[name]["analyzer"] == "ik_smart"
        assert props[name]["fields"]["cjk"] == {"type": "text", "analyzer": "cjk"}
    assert props["brand"]["fields"]["keyword"]["type"] == "keyword"
    fields = bodies.bm25_search("x", None, 5)["query"]["bool"]["must"][0]["multi_match"]["fields"]
    assert "title^3" in fields and "title.cjk^3" in fields and "description.cjk" in fields
    assert "vector" not in props


def test_filters_inside_knn_clause_and_hybrid() -> None:
    body = bodies.knn_search(VEC, Filters(brand="Acme"), 7, 100)
    assert set(body["query"]) == {"knn"}, "filters must not be a post-filter around the knn clause"
    assert body["query"]["knn"]["vector"]["filter"] == {"bool": {"filter": [{"terms": {"brand.keyword": ["Acme"]}}]}}
    assert body["query"]["knn"]["vector"]["method_parameters"]["ef_search"] == 100
    assert bodies.knn_search(VEC, None, 500, 100)["query"]["knn"]["vector"]["method_parameters"]["ef_search"] == 500
    hybrid = bodies.hybrid_search("x", VEC, Filters(brand="Acme"), 7, 100)["query"]["hybrid"]["queries"]
    assert "multi_match" in json.dumps(hybrid[0]) and "knn" in hybrid[1]
    with pytest.raises(ValueError, match="NaN"):
        bodies.knn_search(np.array([np.nan, 1.0]), None, 3, 10)


def test_exclude_is_must_not_inside_both_retrievals() -> None:
    f = Filters(category="shoes", exclude=[{"brand": "Acme"}, {"price_min": 500, "in_stock": True}])
    negative = {
        "bool": {
            "must_not": [
                {"bool": {"filter": [{"terms": {"brand.keyword": ["Acme"]}}]}},
                {
                    "bool": {
                        "filter": [
                            {"range": {"price": {"gte": 500.0}}},
                            bodies.filter_clauses(Filters(in_stock=True))[0],
                        ]
                    }
                },
            ]
        }
    }
    assert bodies.filter_clauses(f) == [{"terms": {"category.keyword": ["shoes"]}}, negative]
    assert negative in bodies.knn_search(VEC, f, 7, 100)["query"]["knn"]["vector"]["filter"]["bool"]["filter"]
    assert negative in bodies.bm25_search("x", f, 5)["query"]["bool"]["filter"]
    hybrid = json.dumps(bodies.hybrid_search("x", VEC, f, 7, 100)["query"]["hybrid"]["queries"])
    assert hybrid.count(json.dumps(negative)) == 2  # in the BM25 and in the kNN leg


def test_pipeline_weights_sum_to_one() -> None:
    weights = bodies.normalized_weights(FusionSettings(bm25_weight=1, knn_weight=2))
    assert abs(sum(weights) - 1) < 1e-9 and weights[0] < weights[1]
    assert bodies.normalized_weights(FusionSettings(bm25_weight=0, knn_weight=0)) == [0.5, 0.5]


def test_partial_update_only_sets_given_signals() -> None:
    assert bodies.partial_update(SignalUpdate(id="1", stock=0)) == {"doc": {"stock": 0}}


def test_index_templates_dir_matches_builders() -> None:
    """index_templates/*.json are the builders' output for the defaults (regenerate: `shopsearch
    opensearch templates --out index_templates`)."""
    from middleware.cli.opensearch import template_files

    expected = template_files(Settings(_env_file=None), 1024, "smartcn")
    on_disk = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in (REPO / "index_templates").glob("*.json")}
    assert on_disk == expected


# ---------------------------------------------------------------- connection settings


def test_client_kwargs_secrets(tmp_path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    cfg = OpenSearchSettings(url="https://a:9200,https://b:9200", username="shop", password_file=secret)
    kwargs = client_kwargs(cfg)
    assert kwargs["hosts"] == ["https://a:9200", "https://b:9200"]
    assert kwargs["http_auth"] == ("shop", "s3cret") and kwargs["verify_certs"] is True
    key = client_kwargs(OpenSearchSettings(api_key="k3y"))
    assert key["headers"] == {"Authorization": "ApiKey k3y"} and "http_auth" not in key
    with pytest.raises(BackendError, match="not both"):
        client_kwargs(OpenSearchSettings(username="u", password="p", api_key="k"))
    with pytest.raises(BackendError, match="cannot read") as err:
        client_kwargs(OpenSearchSettings(username="u", password_file=tmp_path / "missing"))
    assert "s3cret" not in str(err.value)
    assert redact_url("https://user:s3cret@host:9200/x") == "https://host:9200/x"


# ---------------------------------------------------------------- docker compose


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert set(services) >= {"opensearch", "middleware", "dashboards"}
    opensearch, middleware, dashboards = services["opensearch"], services["middleware"], services["dashboards"]
    dockerfile = REPO / opensearch["build"]["dockerfile"]
    text = dockerfile.read_text(encoding="utf-8")
    version = opensearch["build"]["args"]["OPENSEARCH_VERSION"]
    assert f"ARG OPENSEARCH_VERSION={version}" in text and "analysis-smartcn" in text
    assert version in opensearch["image"] and dashboards["image"].endswith(f":{version}")
    assert opensearch["environment"]["DISABLE_SECURITY_PLUGIN"] == "true"
    assert "9200:9200" in opensearch["ports"] and "healthcheck" in opensearch
    assert dashboards["profiles"] == ["dashboards"]
    env = middleware["environment"]
    assert env["SHOPSEARCH_OPENSEARCH__URL"] == "http://opensearch:9200"
    assert Settings(_env_file=None, opensearch={"url": env["SHOPSEARCH_OPENSEARCH__URL"]}).opensearch.url
    port = env["SHOPSEARCH_SERVER__PORT"]
    assert f"{port}:{port}" in middleware["ports"] and "healthcheck" in middleware
    assert middleware["depends_on"]["opensearch"]["condition"] == "service_healthy"
    mw = (REPO / middleware["build"]["dockerfile"]).read_text(encoding="utf-8")
    assert mw.index("torch==2.13.0") < mw.index('pip install ".[cpu]"')


def test_query_text_bounded_to_the_clause_limit() -> None:
    assert bodies.bounded_text("red dress") == "red dress"
    long_words = " ".join(f"w{i}" for i in range(5000))
    cut = bodies.bounded_text(long_words)
    assert cut.split() == long_words.split()[: bodies.MAX_QUERY_TOKENS]
    cjk = bodies.bounded_text("连衣裙" * 1000)
    assert len(cjk) == bodies.MAX_QUERY_TOKENS
    fields = len(bodies.bm25_fields())
    assert fields * bodies.MAX_QUERY_TOKENS < bodies.MAX_CLAUSES
    query = bodies.match_set_query(long_words, None)
    assert query["bool"]["must"][0]["bool"]["should"][0]["multi_match"]["query"] == cut
    assert bodies.bm25_clause(long_words, None)["bool"]["must"][0]["multi_match"]["query"] == cut
