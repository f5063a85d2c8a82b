"""Query-time synonyms, typo tolerance, pinyin and traditional/simplified folding on real stores.

Synonyms and typo tolerance are query-time expansion and run on both backends ("opensearch" when
OPENSEARCH_URL is set); pinyin and folding are the embedded store's analysis only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from middleware.backends.base import Backend
from middleware.backends.embedded import EmbeddedBackend
from middleware.cli import main
from middleware.config import Settings
from middleware.pipeline import Pipeline
from middleware.products import Product
from middleware.query_expansion import (
    SynonymError,
    SynonymRule,
    SynonymSet,
    SynonymStore,
    max_edits_for,
    parse_line,
    parse_synonyms,
    typo_corrections,
)
from middleware.schema import SearchRequest
from middleware.server.app import create_app
from tests.support.stores import throwaway_opensearch

PRODUCTS = [
    Product(id="sneak", title="Running Sneakers for men", category="shoes"),
    Product(id="boots", title="Leather hiking boots", category="shoes"),
    Product(id="couch", title="Grey fabric couch three seats", category="furniture"),
    Product(id="phone", title="华为 手机 Mate 60", category="电子"),
    Product(id="watch", title="机械 手表 男士", category="配件"),
    Product(id="tv", title="Samsung television 55 inch", category="electronics"),
]


NO_PLUGIN = (
    "OpenSearch analysis has no pinyin or traditional/simplified folding without the analysis-pinyin and"
    " analysis-stconvert plugins, which are not available here: embedded store only"
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedBackend]:
    backend = EmbeddedBackend(tmp_path / "store")
    backend.upsert(PRODUCTS, None)
    yield backend
    backend.close()


@pytest.fixture(params=["embedded", "opensearch"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "embedded":
        backend = EmbeddedBackend(tmp_path / "store")
        backend.upsert(PRODUCTS, None)
        yield backend
        backend.close()
        return
    with throwaway_opensearch() as backend:
        backend.upsert(PRODUCTS, None)
        backend.refresh()
        yield backend


def _embedded_only(backend: Backend) -> None:
    if not isinstance(backend, EmbeddedBackend):
        pytest.skip(NO_PLUGIN)


def _pipeline(store: Backend, tmp_path: Path, **settings) -> Pipeline:
    cfg = Settings(data_dir=tmp_path / "data", embedder="none", reranker="none", **settings)
    return Pipeline(cfg, store, owns_backend=False)


def _ids(pipeline: Pipeline, query: str) -> list[str]:
    return [h.id for h in pipeline.search(SearchRequest(query=query, size=10)).hits]


# ------------------------------------------------------------------------------------------ parsing


def test_parse_solr_lines():
    rules, errors = parse_synonyms(["# comment", "", "Couch, Sofa, settee", "tv => television  # trailing", " a,,b"])
    assert rules == [SynonymRule(("couch", "sofa", "settee")), SynonymRule(("tv",), ("television",))]
    assert [(e.line, "empty term" in e.message) for e in errors] == [(5, True)]


@pytest.mark.parametrize(
    ("line", "reason"),
    [("a => b => c", "more than one"), ("=> b", "both sides"), ("a =>", "both sides"), ("sofa", "at least two")],
)
def test_bad_lines_name_their_number(line: str, reason: str):
    with pytest.raises(SynonymError, match=reason) as err:
        parse_line(line, 7)
    assert err.value.line == 7 and str(err.value).startswith("line 7:")


def test_equivalence_adds_and_replacement_replaces():
    rules, _ = parse_synonyms(["couch, sofa", "tv => television", "手機, 电话"])
    synonyms = SynonymSet(rules)
    assert synonyms.apply("Sofa bed") == "sofa bed couch"
    assert synonyms.apply("big TV") == "big television"
    assert synonyms.apply("tvs") == "tvs"  # whole words only
    assert synonyms.apply("华为手机") == "华为手机 电话"  # folded to simplified, matched inside a Han run


def test_typo_edit_distance_scales_with_length():
    assert [max_edits_for(w) for w in ("boot", "sneakrs", "televisoin")] == [0, 1, 2]


# ------------------------------------------------------------------------------------- embedded store


def test_misspelt_word_finds_its_indexed_neighbour(any_store: Backend, tmp_path: Path):
    assert typo_corrections(any_store, "sneakrs") == ["sneakers"]
    assert typo_corrections(any_store, "sneakers boot") == []  # indexed, or too short to correct
    pipeline = _pipeline(any_store, tmp_path)
    assert _ids(pipeline, "sneakrs") == ["sneak"]
    assert _ids(pipeline, "televisoin") == ["tv"]
    assert _ids(_pipeline(any_store, tmp_path, typo_tolerance=False), "sneakrs") == []


def test_synonyms_edit_without_reindex(any_store: Backend, tmp_path: Path):
    pipeline = _pipeline(any_store, tmp_path)
    assert _ids(pipeline, "sofa") == []
    path = tmp_path / "data" / "synonyms.json"
    synonyms = SynonymStore(path)
    synonyms.replace(parse_synonyms(["sofa, couch"])[0])
    assert _ids(pipeline, "sofa") == ["couch"]
    synonyms.replace([])
    os.utime(path, ns=(0, 0))  # a rewrite within the clock's resolution still differs in mtime here
    assert _ids(pipeline, "sofa") == []


def test_replacement_drops_the_replaced_term(any_store: Backend, tmp_path: Path):
    pipeline = _pipeline(any_store, tmp_path)
    assert _ids(pipeline, "leather") == ["boots"]
    SynonymStore(tmp_path / "data" / "synonyms.json").replace(parse_synonyms(["leather => couch"])[0])
    assert _ids(pipeline, "leather") == ["couch"]


def test_pinyin_and_initials_find_chinese_titles(any_store: Backend, tmp_path: Path):
    _embedded_only(any_store)
    pipeline = _pipeline(any_store, tmp_path)
    assert _ids(pipeline, "shouji") == ["phone"]
    assert _ids(pipeline, "sj") == ["phone"]
    assert _ids(pipeline, "shoubiao") == ["watch"]


def test_traditional_query_finds_simplified_title(any_store: Backend, tmp_path: Path):
    _embedded_only(any_store)
    pipeline = _pipeline(any_store, tmp_path)
    assert _ids(pipeline, "手錶")[0] == "watch"  # the phone shares 手 only, below
    assert _ids(pipeline, "手機")[0] == "phone"
    any_store.upsert([Product(id="trad", title="復古 電腦 包")], None)
    assert _ids(pipeline, "电脑")[0] == "trad"


# ------------------------------------------------------------------------------------------ CLI, REST


def test_cli_import_dead_letters_bad_lines(tmp_path: Path, capsys):
    source = tmp_path / "synonyms.txt"
    source.write_text("# shoes\nsneakers, trainers\nbad => \nsofa, couch\n", encoding="utf-8")
    dead = tmp_path / "dead.jsonl"
    code = main(["--data-dir", str(tmp_path / "data"), "synonyms", "import", str(source), "--dead-letter", str(dead)])
    assert code == 3
    assert "imported 2 synonym rules" in capsys.readouterr().out
    rejected = [json.loads(line) for line in dead.read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["raw"]) for r in rejected] == [(3, "bad => ")]
    assert SynonymStore(tmp_path / "data" / "synonyms.json").lines() == ["sneakers, trainers", "sofa, couch"]
    assert main(["--data-dir", str(tmp_path / "data"), "synonyms", "import", str(tmp_path / "missing.txt")]) == 2


def test_rest_synonyms_closed_unless_writes_enabled(store: EmbeddedBackend, tmp_path: Path):
    closed = Settings(data_dir=tmp_path / "data", embedder="none", reranker="none")
    with TestClient(create_app(closed, Pipeline(closed, store, owns_backend=False))) as c:
        assert c.put("/v1/synonyms", json={"rules": ["sofa, couch"]}).status_code == 403
        assert c.get("/v1/synonyms").status_code == 403
    cfg = Settings(data_dir=tmp_path / "data", embedder="none", reranker="none", server={"enable_writes": True})
    with TestClient(create_app(cfg, Pipeline(cfg, store, owns_backend=False))) as c:
        assert c.put("/v1/synonyms", json={"rules": ["sofa, couch", "# note"]}).json() == {"rules": 1}
        assert c.get("/v1/synonyms").json() == {"rules": ["sofa, couch"], "count": 1}
        hits = c.post("/v1/search", json={"query": "sofa", "retrieval": "bm25"}).json()["hits"]
        assert [h["id"] for h in hits] == ["couch"]
        bad = c.put("/v1/synonyms", json={"rules": ["ok, fine", "a => b => c"]})
        assert bad.status_code == 400 and "rules[1]" in bad.json()["message"]
        missing = c.put("/v1/synonyms", json={"rule": []})
        assert missing.status_code in (400, 422) and "rules" in missing.text
        assert c.get("/v1/synonyms").json()["count"] == 1  # a refused body changes nothing
