"""A/B experiments: validation, the store, sticky assignment, and overlays through the real pipeline."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from middleware import experiments
from middleware.backends.embedded import EmbeddedBackend
from middleware.cli.search import load_demo_catalog
from middleware.config import Settings
from middleware.experiments import Experiment, ExperimentStore, experiment_error, experiments_path
from middleware.models import Embedder, Reranker
from middleware.pipeline import Pipeline
from middleware.products import Product
from middleware.rules import Rule
from middleware.schema import SearchRequest
from middleware.server.app import create_app

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def experiment(**values) -> Experiment:
    base = {
        "id": "exp1",
        "unit": "user",
        "variants": [{"name": "control", "traffic": 50}, {"name": "treatment", "traffic": 50, "overlay": {}}],
    }
    return Experiment.model_validate({**base, **values})


def error_of(**values) -> tuple[str, str]:
    with pytest.raises(ValidationError) as info:
        experiment(**values)
    return experiment_error(info.value)


# -------------------------------------------------------------------------------------------- validation


def test_unknown_overlay_keys_and_bad_traffic_are_errors_naming_them():
    field, message = error_of(
        variants=[{"name": "a", "traffic": 50}, {"name": "b", "traffic": 50, "overlay": {"k": 1}}]
    )
    assert field == "variants.1.overlay" and "'k'" in message and "rrf_k" in message
    field, message = error_of(
        variants=[{"name": "a", "traffic": 50}, {"name": "b", "traffic": 50, "overlay": {"business": {"w_sale": 1}}}]
    )
    assert field == "variants.1.overlay.business" and "'w_sale'" in message
    field, message = error_of(
        variants=[{"name": "a", "traffic": 50}, {"name": "b", "traffic": 50, "overlay": {"business": {"margin": 2}}}]
    )
    assert field == "variants.1.overlay.business.margin" and "1" in message
    field, message = error_of(variants=[{"name": "a", "traffic": 60}, {"name": "b", "traffic": 30}])
    assert field == "variants" and "sum to 100, got 90" in message
    field, _ = error_of(variants=[{"name": "a", "traffic": 50}, {"name": "a", "traffic": 50}])
    assert field == "variants"
    field, _ = error_of(variants=[{"name": "a", "traffic": 50.005}, {"name": "b", "traffic": 49.995}])
    assert field == "variants.0.traffic"
    field, _ = error_of(variants=[{"name": "a", "traffic": 100}])
    assert field == "variants"
    field, _ = error_of(unit="visitor")
    assert field == "unit"
    field, _ = error_of(active_from="2030-01-02", active_until="2030-01-01")
    assert field == "active_until"
    field, _ = error_of(variants=[{"name": "a", "traffic": 50}, {"name": "b", "traffic": 50, "overlay": {"rrf_k": 0}}])
    assert field == "variants.1.overlay.rrf_k"
    field, _ = error_of(id="no spaces")
    assert field == "id"


def test_overlays_these_settings_cannot_serve_are_refused():
    named = experiment(
        variants=[{"name": "a", "traffic": 50}, {"name": "b", "traffic": 50, "overlay": {"reranker": "big"}}]
    )
    with pytest.raises(ValueError, match=r"variants\.1\.overlay\.reranker: 'big'"):
        named.check_settings(Settings(embedder="none", reranker="none"))
    named.check_settings(Settings(embedder="none", reranker="none", rerankers={"big": "some/model"}))
    deep = experiment(
        variants=[{"name": "a", "traffic": 50}, {"name": "b", "traffic": 50, "overlay": {"rerank_k": 500}}]
    )
    with pytest.raises(ValueError, match=r"rerank_k: must be at most 200"):
        deep.check_settings(Settings(embedder="none", reranker="none"))


# ------------------------------------------------------------------------------------------- assignment


def test_assignment_is_sticky_and_follows_the_traffic_split():
    exp = experiment(
        variants=[{"name": "a", "traffic": 50}, {"name": "b", "traffic": 30}, {"name": "c", "traffic": 20}]
    )
    users = [f"user-{i}" for i in range(10_000)]
    first = [exp.variant_for(u).name for u in users]
    assert first == [exp.variant_for(u).name for u in users]  # sticky
    assert [Experiment.model_validate(exp.model_dump()).variant_for(u).name for u in users[:500]] == first[:500]
    counts = Counter(first)
    # binomial sd at n = 10,000 is at most 50 units: 2 points is four of them
    for name, share in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(counts[name] / len(users) - share) < 0.02, counts
    # another experiment id hashes independently: its split is not the same partition
    other = exp.model_copy(update={"id": "exp2"})
    same = sum(other.variant_for(u).name == v for u, v in zip(users, first, strict=True))
    assert same < 0.5 * len(users)
    assert experiments.bucket("exp1", "user-1") == experiments.bucket("exp1", "user-1")
    assert 0 <= experiments.bucket("exp1", "user-1") < experiments.BUCKETS


def test_requests_without_the_unit_id_are_not_exposed():
    settings = Settings(embedder="none", reranker="none")
    exp = experiment(unit="session")
    req = SearchRequest(query="x", user_id="u1")
    same, exposure = experiments.expose(exp, req, settings)
    assert exposure is None and same is req
    _, exposure = experiments.expose(exp, req.model_copy(update={"session_id": "s1"}), settings)
    assert exposure is not None and exposure.experiment == "exp1"
    assert exposure.variant == exp.variant_for("s1").name


def test_the_overlay_becomes_request_fields_and_business_merges_over_the_configured_weights():
    settings = Settings(embedder="none", reranker="none", business={"margin": 0.2})
    overlay = {"fusion": "minmax", "bm25_weight": 1, "knn_weight": 0, "rerank": False, "rules": False,
               "business": {"w_sales": 0.5}, "rrf_k": 10}  # fmt: skip
    exp = experiment(variants=[{"name": "a", "traffic": 0.01}, {"name": "b", "traffic": 99.99, "overlay": overlay}])
    unit = next(f"u{i}" for i in range(100) if exp.variant_for(f"u{i}").name == "b")
    req, exposure = experiments.expose(exp, SearchRequest(query="x", user_id=unit, rerank=True), settings)
    assert exposure == experiments.Exposure("exp1", "b")
    assert (req.fusion, req.bm25_weight, req.knn_weight, req.rerank, req.rules, req.rrf_k) == (
        "minmax", 1, 0, False, False, 10)  # fmt: skip
    assert req.business is not None and req.business.w_sales == 0.5 and req.business.margin == 0.2


# ---------------------------------------------------------------------------------------------- storage


def test_store_overlap_rule_stop_and_sharing(tmp_path: Path):
    path = experiments_path(tmp_path)
    store, other = ExperimentStore(path), ExperimentStore(path)
    store.put(experiment(active_from=NOW - timedelta(days=1)))
    assert [e.id for e in other.all()] == ["exp1"]  # a second process sees it
    assert other.active(NOW).id == "exp1" and other.active(NOW - timedelta(days=2)) is None
    with pytest.raises(ValueError, match="overlaps experiment 'exp1'"):
        store.put(experiment(id="exp2", unit="session"))
    # windows that do not meet may both be stored; a disabled one never overlaps
    store.put(experiment(id="exp0", active_from=NOW - timedelta(days=9), active_until=NOW - timedelta(days=1)))
    store.put(experiment(id="exp3", enabled=False))
    stopped = store.stop("exp1", now=NOW)
    assert stopped is not None and not stopped.enabled and stopped.active_until == NOW
    assert other.active(NOW) is None and other.get("exp1").active_until == NOW
    store.put(experiment(id="exp2", active_from=NOW))
    assert store.stop("nope") is None
    assert store.delete("exp3") and not store.delete("exp3")
    data = json.loads(path.read_text())
    assert [e["id"] for e in data["experiments"]] == ["exp0", "exp1", "exp2"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_unreadable_file_turns_experiments_off_not_searches(tmp_path: Path):
    path = experiments_path(tmp_path)
    path.write_text("{not json")
    assert ExperimentStore(path).active(NOW) is None


# ---------------------------------------------------------------------------------- through the pipeline

CATALOG = [
    Product(id="w1", title="手表 男士 机械", brand="Acme", category=["手表"], price=900, sales=50),
    Product(id="w2", title="手表 女士 石英 手表", brand="Acme", category=["手表"], price=400, sales=500),
    Product(id="w3", title="手表 运动 防水", brand="Zeta", category=["手表"], price=300, sales=5),
    Product(id="e1", title="蓝牙 耳机", brand="Sono", category=["耳机"], price=200, sales=300),
]


def unit_in(exp: Experiment, variant: str) -> str:
    return next(f"u{i}" for i in range(1000) if exp.variant_for(f"u{i}").name == variant)


def test_rules_off_variant_has_no_rules_report(tmp_path: Path):
    backend = EmbeddedBackend(tmp_path / "store")
    backend.upsert(CATALOG, None)
    pipeline = Pipeline(Settings(embedder="none", reranker="none", data_dir=tmp_path / "store"), backend)
    try:
        pipeline.rules.put(
            [Rule.model_validate({"id": "r1", "when": {"match": "any"}, "pin": [{"id": "e1", "position": 1}]})]
        )
        exp = experiment(
            variants=[{"name": "on", "traffic": 50}, {"name": "off", "traffic": 50, "overlay": {"rules": False}}]
        )
        pipeline.experiments.put(exp)
        anonymous = experiments.search(pipeline, SearchRequest(query="手表"))
        assert anonymous.experiment is None and anonymous.variant is None and anonymous.rules_report is not None
        on = experiments.search(pipeline, SearchRequest(query="手表", user_id=unit_in(exp, "on")))
        off = experiments.search(pipeline, SearchRequest(query="手表", user_id=unit_in(exp, "off")))
        assert (on.experiment, on.variant, off.experiment, off.variant) == ("exp1", "on", "exp1", "off")
        assert on.rules_report == {"applied": ["r1"], "missing_pins": []} and on.hits[0].id == "e1"
        assert off.rules_report is None and "e1" not in [h.id for h in off.hits]
        pipeline.experiments.stop("exp1")
        after = experiments.search(pipeline, SearchRequest(query="手表", user_id=unit_in(exp, "off")))
        assert after.experiment is None and after.rules_report is not None
    finally:
        pipeline.close()


@pytest.fixture(scope="module")
def models(tiny_embedder_dir, tiny_reranker_dir, model_cache_dir):
    embedder = Embedder(str(tiny_embedder_dir), cache_dir=model_cache_dir)
    reranker = Reranker(str(tiny_reranker_dir), cache_dir=model_cache_dir, precision="fp32")
    return embedder, reranker


@pytest.fixture(scope="module")
def demo_store(models, tmp_path_factory):
    embedder, _ = models
    products = load_demo_catalog(None)
    root = tmp_path_factory.mktemp("demo")
    backend = EmbeddedBackend(root / "store", dim=embedder.dim)
    backend.upsert(products, embedder.encode_documents([p.embedding_text() for p in products]))
    yield backend, root
    backend.close()


def test_rerank_fusion_and_named_reranker_overlays_change_the_search(
    demo_store, models, tiny_reranker_dir, model_cache_dir, tmp_path
):
    backend, _ = demo_store
    embedder, reranker = models
    settings = Settings(
        embedder="none",
        reranker="none",
        data_dir=tmp_path,
        rerank_k=10,
        rerankers={"tiny": str(tiny_reranker_dir)},
        reranker_precision="fp32",
        model_cache_dir=model_cache_dir,
    )
    variants = [
        {"name": "control", "traffic": 25},
        {"name": "no-rerank", "traffic": 25, "overlay": {"rerank": False}},
        {"name": "lexical", "traffic": 25, "overlay": {"rerank": False, "fusion": "minmax", "knn_weight": 0}},
        {"name": "semantic", "traffic": 25, "overlay": {"rerank": False, "fusion": "minmax", "bm25_weight": 0}},
    ]
    exp = experiment(variants=variants)
    query = "适合送女友的轻奢小众手表"
    pipeline = Pipeline(settings, backend, embedder, reranker, owns_backend=False)
    try:
        pipeline.experiments.put(exp)

        def run(variant: str) -> list[str]:
            resp = experiments.search(pipeline, SearchRequest(query=query, size=10, user_id=unit_in(exp, variant)))
            assert resp.variant == variant and resp.degraded == []
            return resp

        control, no_rerank = run("control"), run("no-rerank")
        assert control.reranked == 10 and no_rerank.reranked == 0
        lexical, semantic = run("lexical"), run("semantic")
        assert [h.id for h in lexical.hits] != [h.id for h in semantic.hits]

        # a variant naming a reranker the process has not loaded: it loads once, then serves
        bare = Pipeline(settings, backend, embedder, None, owns_backend=False)
        try:
            named = experiment(
                id="exp-named",
                variants=[
                    {"name": "none", "traffic": 50},
                    {"name": "tiny", "traffic": 50, "overlay": {"reranker": "tiny"}},
                ],
            )
            pipeline.experiments.stop("exp1")
            bare.experiments.put(named)
            tiny = experiments.search(bare, SearchRequest(query=query, size=5, user_id=unit_in(named, "tiny")))
            plain = experiments.search(bare, SearchRequest(query=query, size=5, user_id=unit_in(named, "none")))
            assert (tiny.variant, tiny.reranked, plain.variant, plain.reranked) == ("tiny", 10, "none", 0)
            first = bare.named_rerankers.get("tiny")
            assert bare.named_rerankers.get("tiny") is first
            with pytest.raises(ValueError, match="no reranker named 'big'"):
                bare.search(SearchRequest(query=query, reranker="big"))
        finally:
            bare.close()
    finally:
        pipeline.close()


# ------------------------------------------------------------------------------------------------- REST


def _app(tmp_path: Path, **server) -> tuple[TestClient, EmbeddedBackend]:
    backend = EmbeddedBackend(tmp_path / "store")
    backend.upsert(CATALOG, None)
    settings = Settings(embedder="none", reranker="none", data_dir=tmp_path / "store", server=server)
    return TestClient(create_app(settings, Pipeline(settings, backend))), backend


BODY = {
    "unit": "session",
    "variants": [{"name": "a", "traffic": 50}, {"name": "b", "traffic": 50, "overlay": {"rules": False}}],
}


def test_rest_experiments_are_closed_without_writes(tmp_path: Path):
    client, backend = _app(tmp_path)
    with client:
        assert client.put("/v1/experiments/e1", json=BODY).status_code == 403
        assert client.get("/v1/experiments").status_code == 403
        assert client.get("/v1/experiments/e1").status_code == 403
        assert client.delete("/v1/experiments/e1").status_code == 403
    backend.close()
    assert not experiments_path(tmp_path / "store").exists()


def test_rest_experiments_crud_exposure_and_bad_input(tmp_path: Path):
    client, backend = _app(tmp_path, enable_writes=True)
    with client:
        assert client.put("/v1/experiments/e1", json=BODY).json()["experiment"]["id"] == "e1"
        assert [e["id"] for e in client.get("/v1/experiments").json()["experiments"]] == ["e1"]
        assert client.get("/v1/experiments/e1").json()["unit"] == "session"
        exp = Experiment.model_validate({**BODY, "id": "e1"})
        for variant in ("a", "b"):
            session = unit_in(exp, variant)
            resp = client.post("/v1/search", json={"query": "手表", "session_id": session}).json()
            assert (resp["experiment"], resp["variant"]) == ("e1", variant)
        plain = client.post("/v1/search", json={"query": "手表", "user_id": "u1"}).json()
        assert plain["experiment"] is None and plain["variant"] is None
        for bad, field in [
            ({**BODY, "variants": [{"name": "a", "traffic": 50}, {"name": "b", "traffic": 50, "overlay": {"x": 1}}]},
             "variants.1.overlay"),
            ({**BODY, "variants": [{"name": "a", "traffic": 50}, {"name": "b", "traffic": 40}]}, "variants"),
            ({**BODY, "id": "other"}, "id"),
            ({**BODY, "variants": [{"name": "a", "traffic": 50}, {"name": "b", "traffic": 50,
                                                                   "overlay": {"reranker": "big"}}]},
             "variants.1.overlay.reranker"),
        ]:  # fmt: skip
            r = client.put("/v1/experiments/e2", json=bad)
            assert r.status_code == 400 and r.json()["param"] == field, r.json()
        r = client.put("/v1/experiments/e2", json=BODY)
        assert r.status_code == 409 and "'e1'" in r.json()["message"]
        assert client.put("/v1/experiments/e1", json={**BODY, "enabled": False}).status_code == 200
        assert client.put("/v1/experiments/e2", json=BODY).status_code == 200
        assert client.delete("/v1/experiments/e1").json() == {"deleted": 1}
        assert client.delete("/v1/experiments/e1").status_code == 404
        assert client.get("/v1/experiments/e1").status_code == 404
    backend.close()


class ServerFusingBackend(EmbeddedBackend):
    """The embedded store fusing its own two lists by RRF, as a backend with a configured search pipeline
    (OpenSearch's hybrid query) does: the path a request's own fusion must leave."""

    hybrid_calls = 0

    @property
    def fuses_server_side(self) -> bool:
        return True

    def hybrid(self, text, vector, filters, n):
        from middleware import fusion

        self.hybrid_calls += 1
        return fusion.rrf({"bm25": self.bm25(text, filters, n), "knn": self.knn(vector, filters, n)}, k=60)[:n]


def test_a_request_with_its_own_fusion_fuses_in_the_pipeline_not_on_the_server(models, tmp_path):
    embedder, _ = models
    products = load_demo_catalog(None)
    backend = ServerFusingBackend(tmp_path / "store", dim=embedder.dim)
    backend.upsert(products, embedder.encode_documents([p.embedding_text() for p in products]))
    pipeline = Pipeline(Settings(embedder="none", reranker="none", data_dir=tmp_path), backend, embedder, None)
    try:
        query = "适合送女友的轻奢小众手表"
        pipeline.search(SearchRequest(query=query, size=5))
        assert backend.hybrid_calls == 1
        lexical = pipeline.search(SearchRequest(query=query, size=5, fusion="minmax", knn_weight=0, explain=True))
        pipeline.search(SearchRequest(query=query, size=5, rrf_k=5))
        assert backend.hybrid_calls == 1
        assert all(h.explain.bm25 is not None for h in lexical.hits)  # fused by the request's weights
    finally:
        pipeline.close()


def test_exposures_reach_the_query_log_and_the_report_reads_them(tmp_path: Path, capsys):
    """Searches in an experiment over REST, clicks through POST /v1/events, then `shopsearch ab report`
    over the data directory's event log."""
    from middleware.cli import main

    data = tmp_path / "store"
    backend = EmbeddedBackend(data)
    backend.upsert(CATALOG, None)
    settings = Settings(
        embedder="none", reranker="none", data_dir=data, server={"enable_writes": True}, events={"writer_flush_ms": 10}
    )
    pipeline = Pipeline(settings, backend)
    exp = Experiment.model_validate({**BODY, "id": "e1"})
    served: dict[str, int] = {"a": 0, "b": 0}
    try:
        with TestClient(create_app(settings, pipeline)) as client:
            assert client.put("/v1/experiments/e1", json=BODY).status_code == 200
            for i in range(40):
                resp = client.post("/v1/search", json={"query": "手表", "session_id": f"s{i}", "size": 3}).json()
                assert resp["variant"] == exp.variant_for(f"s{i}").name
                served[resp["variant"]] += 1
                if i % 2 == 0:
                    event = {"query_id": resp["query_id"], "action": "click", "object_id": resp["hits"][0]["id"],
                             "position": 1, "session_id": f"s{i}", "timestamp": "2026-12-02T10:00:00Z"}  # fmt: skip
                    r = client.post("/v1/events", json={"events": [event]})
                    assert r.status_code == 200 and r.json()["trusted"] == 1, r.json()
            client.post("/v1/search", json={"query": "手表", "size": 3})  # not exposed: not in the report
    finally:
        pipeline.close()
        backend.close()
    assert main(["--data-dir", str(data), "ab", "report", "e1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    by_name = {v["name"]: v for v in rep["variants"]}
    assert {n: v["searches"] for n, v in by_name.items()} == served
    assert sum(v["clicks"] for v in by_name.values()) == 20 and rep["events_used"] == 20
    assert all(v["units"] == v["searches"] for v in by_name.values())  # one search a session here
