"""Merchandising rules and collapse through the real pipeline over the embedded store (BM25 only)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from middleware.backends.embedded import EmbeddedBackend
from middleware.cli import main
from middleware.config import Settings
from middleware.pipeline import Pipeline
from middleware.products import Filters, Product
from middleware.rules import Rule, RuleStore, rules_path
from middleware.schema import SearchRequest
from middleware.server.app import create_app

CATALOG = [
    Product(id="w1", title="手表 男士 机械", brand="Acme", category=["手表"], price=900, sales=50),
    Product(id="w2", title="手表 女士 石英 手表", brand="Acme", category=["手表"], price=400, sales=500),
    Product(id="w3", title="手表 运动 防水", brand="Zeta", category=["手表"], price=300, sales=5),
    Product(id="w4", title="手表 智能", brand="Zeta", category=["手表"], price=1500, sales=80),
    Product(id="w5", title="手表 复古", brand="Omni", category=["手表"], price=700, sales=10),
    Product(id="w9", title="手表 手表 手表 特价", brand="Omni", category=["手表"], price=100, sales=900),
    Product(id="e1", title="蓝牙 耳机", brand="Sono", category=["耳机"], price=200, sales=300),
    # one family in three colours
    Product(id="g1", title="手表 经典 黑色", brand="Kin", category=["手表"], sales=40, attributes={"group_id": "G"}),
    Product(id="g2", title="手表 经典 白色", brand="Kin", category=["手表"], sales=400, attributes={"group_id": "G"}),
    Product(id="g3", title="手表 经典 金色", brand="Kin", category=["手表"], sales=4, attributes={"group_id": "G"}),
]


@pytest.fixture()
def env(tmp_path: Path):
    backend = EmbeddedBackend(tmp_path / "store")
    backend.upsert(CATALOG, None)
    settings = Settings(embedder="none", reranker="none", data_dir=tmp_path / "store")
    pipeline = Pipeline(settings, backend)
    yield pipeline, pipeline.rules
    pipeline.close()


def search(pipeline: Pipeline, query: str = "手表", **extra) -> dict:
    req = SearchRequest(query=query, size=20, explain=True, **extra)
    return pipeline.search(req).model_dump(mode="json")


def ids(resp: dict) -> list[str]:
    return [h["id"] for h in resp["hits"]]


def rule(**values) -> Rule:
    return Rule.model_validate({"id": "r1", "when": {"query": "手表", "match": "contains"}, **values})


def test_pins_place_products_and_report_missing_ones(env):
    pipeline, store = env
    base = ids(search(pipeline))
    assert "e1" not in base and len(base) >= 6
    store.put([rule(pin=[{"id": "e1", "position": 1}, {"id": base[-1], "position": 3}, {"id": "nope", "position": 2}])])
    resp = search(pipeline)
    got = ids(resp)
    assert got[0] == "e1" and got[2] == base[-1]  # fetched from the store / moved up from the bottom
    assert sorted(got) == sorted([*base, "e1"])
    assert resp["rules_report"]["applied"] == ["r1"]
    assert resp["rules_report"]["missing_pins"] == [{"rule": "r1", "id": "nope", "reason": "no such product"}]
    assert resp["hits"][0]["explain"]["rules"] == ["pin:r1 position 1"]
    assert resp["hits"][1]["explain"]["rules"] is None
    # a pinned product the request's filters exclude is reported, not placed
    filtered = search(pipeline, filters=Filters(category=["手表"]))
    assert "e1" not in ids(filtered)
    assert {"rule": "r1", "id": "e1", "reason": "excluded by the request's filters"} in filtered["rules_report"][
        "missing_pins"
    ]


def test_hide_removes_from_every_page(env):
    pipeline, store = env
    assert "w9" in ids(search(pipeline))
    store.put([rule(hide=["w9"])])
    assert "w9" not in ids(search(pipeline))
    # later pages continue past the ranked head: the hidden product stays out there too
    pages = [ids(pipeline.search(SearchRequest(query="手表", size=2, from_=f)).model_dump()) for f in range(0, 12, 2)]
    assert "w9" not in [i for page in pages for i in page]
    assert search(pipeline, rules=False)["rules_report"] is None
    assert "w9" in ids(search(pipeline, rules=False))


def test_boost_multiplies_the_final_score_and_resorts(env):
    pipeline, store = env
    base = search(pipeline)
    finals = {h["id"]: h["explain"]["final"] for h in base["hits"]}
    zeta = [i for i in ids(base) if i in {"w3", "w4"}]
    assert ids(base)[:2] != zeta
    store.put([rule(boost=[{"filter": {"brand": ["Zeta"]}, "factor": 50}])])
    resp = search(pipeline)
    assert ids(resp)[:2] == zeta
    for hit in resp["hits"]:
        expected = finals[hit["id"]] * (50 if hit["id"] in zeta else 1)
        assert hit["explain"]["final"] == pytest.approx(expected)
        assert hit["explain"]["rules"] == (["boost:r1 x50"] if hit["id"] in zeta else None)
    scores = [h["score"] for h in resp["hits"]]
    assert scores == sorted(scores, reverse=True)


def test_bury_moves_matching_products_last(env):
    pipeline, store = env
    base = ids(search(pipeline))
    store.put([rule(bury=[{"filter": {"brand": ["Acme"]}}])])
    got = ids(search(pipeline))
    acme = [i for i in base if i in {"w1", "w2"}]
    assert got[-2:] == acme and got[:-2] == [i for i in base if i not in acme]


def test_time_window_enabled_and_query_matching(env):
    pipeline, store = env
    base = ids(search(pipeline))
    now = datetime.now(UTC)
    pin = [{"id": "e1", "position": 1}]
    store.put(
        [
            rule(id="past", pin=pin, active_until=(now - timedelta(hours=1)).isoformat()),
            rule(id="future", pin=pin, active_from=(now + timedelta(hours=1)).isoformat()),
            rule(id="off", pin=pin, enabled=False),
            rule(id="exact", pin=pin, when={"query": "ＷＡＴＣＨ  手表", "match": "exact"}),  # NFKC + casefold
            rule(id="cat", pin=pin, when={"match": "any", "filters": {"category": ["手表"]}}),
        ]
    )
    assert ids(search(pipeline)) == base  # none of them fires for "手表" without filters
    assert ids(search(pipeline, query=" watch   手表 "))[0] == "e1"  # the exact one does
    resp = search(pipeline, query="复古", filters=Filters(category=["手表"]))
    assert resp["rules_report"]["applied"] == ["cat"]
    # now inside the window
    store.put([rule(id="past", pin=pin, active_from=(now - timedelta(hours=1)).isoformat())])
    assert ids(search(pipeline))[0] == "e1"


def test_rules_survive_a_restart_and_are_shared(env, tmp_path):
    pipeline, store = env
    other = RuleStore(rules_path(pipeline.settings.data_dir))  # another worker over the same data dir
    other.put([rule(hide=["w9"])])
    assert "w9" not in ids(search(pipeline))  # the pipeline's store re-read the file
    assert [r.id for r in RuleStore(store.path).all()] == ["r1"]
    assert other.delete("r1") and not other.delete("r1")
    assert "w9" in ids(search(pipeline))


def test_collapse_keeps_the_best_variant_and_counts_them(env):
    pipeline, _ = env
    base = search(pipeline)
    family = [h for h in base["hits"] if h["id"] in {"g1", "g2", "g3"}]
    assert len(family) == 3
    best = max(family, key=lambda h: h["score"])
    resp = search(pipeline, collapse="group_id")
    kept = [h for h in resp["hits"] if h["id"] in {"g1", "g2", "g3"}]
    assert [h["id"] for h in kept] == [best["id"]] and kept[0]["variants"] == 3
    assert all(h["variants"] == 1 for h in resp["hits"] if h["id"] != best["id"])
    assert len(resp["hits"]) == len(base["hits"]) - 2
    assert base["hits"][0]["variants"] is None


def _app(tmp_path: Path, **server) -> tuple[TestClient, EmbeddedBackend]:
    backend = EmbeddedBackend(tmp_path / "store")
    backend.upsert(CATALOG, None)
    settings = Settings(embedder="none", reranker="none", data_dir=tmp_path / "store", server=server)
    return TestClient(create_app(settings, Pipeline(settings, backend))), backend


def test_rest_rules_are_closed_without_writes(tmp_path):
    client, backend = _app(tmp_path)
    with client:
        r = client.put("/v1/rules/r1", json={"hide": ["w9"]})
        assert r.status_code == 403 and "enable_writes" in r.json()["message"]
        assert client.delete("/v1/rules/r1").status_code == 403
        assert client.get("/v1/rules").json() == {"rules": []}
    backend.close()
    assert not rules_path(tmp_path / "store").exists()


def test_rest_rules_crud_and_bad_input(tmp_path):
    client, backend = _app(tmp_path, enable_writes=True)
    with client:
        body = {"when": {"query": "手表"}, "pin": [{"id": "e1", "position": 1}]}
        assert client.put("/v1/rules/r1", json=body).json()["rule"]["id"] == "r1"
        assert [r["id"] for r in client.get("/v1/rules").json()["rules"]] == ["r1"]
        assert client.get("/v1/rules/r1").json()["pin"] == [{"id": "e1", "position": 1}]
        hits = client.post("/v1/search", json={"query": "手表", "explain": True}).json()["hits"]
        assert hits[0]["id"] == "e1" and hits[0]["explain"]["rules"] == ["pin:r1 position 1"]
        off = client.post("/v1/search", json={"query": "手表", "rules": False}).json()
        assert off["hits"][0]["id"] != "e1" and off["rules_report"] is None
        for bad, field in [
            ({"pin": [{"id": "e1", "position": 0}]}, "pin.0.position"),
            ({"when": {"match": "sometimes"}, "hide": ["w1"]}, "when.match"),
            ({"when": {"match": "exact"}, "hide": ["w1"]}, "when.query"),
            ({"boost": [{"filter": {"colour": ["red"]}, "factor": 2}]}, "boost.0.filter.colour"),
            ({"hide": ["w1"], "active_from": "2030-01-02", "active_until": "2030-01-01"}, "active_until"),
            ({"hide": ["w1"], "id": "other"}, "id"),
            ([1, 2], "rule"),
        ]:
            r = client.put("/v1/rules/r2", json=bad)
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["param"] == field, (bad, r.json())
        collapsed = client.post("/v1/search", json={"query": "手表", "collapse": "group_id", "size": 20}).json()
        assert sorted(h["variants"] for h in collapsed["hits"])[-1] == 3
        refused = client.post("/v1/search", json={"query": "手表", "collapse": "group_id", "sort": [{"price": "asc"}]})
        assert refused.status_code == 400 and refused.json()["param"] == "collapse"
        assert client.delete("/v1/rules/r1").json() == {"deleted": 1}
        assert client.delete("/v1/rules/r1").status_code == 404
        assert client.get("/v1/rules/r1").status_code == 404
        rules_path(tmp_path / "store").write_text("{broken", encoding="utf-8")
        broken = client.get("/v1/rules")
        assert broken.status_code == 500 and "rules file" in broken.json()["message"]
        assert client.post("/v1/search", json={"query": "手表"}).json()["degraded"] == ["rules"]
    backend.close()


def test_cli_import_dead_letters_bad_lines(tmp_path, capsys):
    data_dir = tmp_path / "data"
    lines = [
        json.dumps({"id": "a", "when": {"query": "手表"}, "hide": ["w9"]}),
        "{not json",
        json.dumps({"id": "b", "pin": [{"id": "w1", "position": -1}]}),
        "",
        json.dumps({"id": "c", "when": {"match": "any"}, "bury": [{"filter": {"brand": "Acme"}}]}),
        json.dumps({"id": "a", "hide": ["w1"]}),
    ]
    src = tmp_path / "rules.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dead = tmp_path / "rejects.jsonl"
    code = main(["--data-dir", str(data_dir), "rules", "import", str(src), "--dead-letter", str(dead)])
    assert code == 3
    assert "stored 2 rules, rejected 3" in capsys.readouterr().out
    records = [json.loads(line) for line in dead.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in records] == [2, 3, 6]
    assert records[0]["reason"].startswith("invalid JSON")
    assert records[1]["reason"].startswith("pin.0.position:")
    assert "also on line 1" in records[2]["reason"]
    assert [r.id for r in RuleStore(rules_path(data_dir)).all()] == ["a", "c"]
    assert main(["--data-dir", str(data_dir), "rules", "list"]) == 0
    assert [json.loads(x)["id"] for x in capsys.readouterr().out.splitlines()] == ["a", "c"]
    assert main(["--data-dir", str(data_dir), "rules", "delete", "a"]) == 0
    assert main(["--data-dir", str(data_dir), "rules", "delete", "a"]) == 2


def test_collapse_outside_a_ranked_query_is_refused(env):
    pipeline, _ = env
    from middleware.paging import InvalidRequest

    with pytest.raises(InvalidRequest) as err:
        pipeline.search(SearchRequest(query="手表", sort=[{"price": "asc"}], collapse="group_id"))
    assert err.value.param == "collapse"
    with pytest.raises(InvalidRequest):
        pipeline.search(SearchRequest(filters=Filters(category=["手表"]), collapse="group_id"))


def test_an_unreadable_rules_file_degrades_to_the_business_order(env):
    pipeline, store = env
    base = ids(search(pipeline))
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_text("{broken", encoding="utf-8")
    resp = search(pipeline)
    assert ids(resp) == base and "rules" in resp["degraded"]


# ------------------------------------------------------------------ category pages and sorted pages

WATCHES = Filters(category=["手表"])


def browse(pipeline: Pipeline, size: int = 20, **extra) -> dict:
    req = SearchRequest.model_validate({"filters": WATCHES, "size": size, "explain": True, **extra})
    return pipeline.search(req).model_dump(mode="json")


def test_a_category_page_honours_pins_and_hides_and_keeps_its_order(env):
    """Pins at their positions, hidden products out (and not counted), the rest in the business order;
    boost and bury are reported as not applied."""
    pipeline, store = env
    base = ids(browse(pipeline, rules=False))
    assert len(base) == 9 and base[0] == "w9"
    category_rule = {"id": "cat", "when": {"match": "any", "filters": {"category": ["手表"]}}}
    store.put(
        [
            Rule.model_validate(
                {
                    **category_rule,
                    "pin": [{"id": "w3", "position": 1}, {"id": "w5", "position": 4}, {"id": "e1", "position": 2}],
                    "hide": ["w9", "w5"],  # w5 is also pinned: the pin wins
                    "boost": [{"filter": {"brand": ["Zeta"]}, "factor": 2}],
                }
            )
        ]
    )
    resp = browse(pipeline)
    rest = [i for i in base if i not in {"w9", "w3", "w5"}]
    assert ids(resp) == ["w3", rest[0], rest[1], "w5", *rest[2:]]
    assert resp["total"] == 8  # w9 hidden: the total and the pages agree
    assert resp["hits"][0]["explain"]["rules"] == ["pin:cat position 1"]
    report = resp["rules_report"]
    assert report["applied"] == ["cat"]
    assert report["missing_pins"] == [{"rule": "cat", "id": "e1", "reason": "excluded by the request's filters"}]
    assert [(n["rule"], n["action"]) for n in report["not_applied"]] == [("cat", "boost")]
    # every page of the pinned listing, none repeated, none skipped
    pages = [ids(browse(pipeline, size=3, **{"from": f})) for f in range(0, 9, 3)]
    assert [i for page in pages for i in page] == ids(resp)


def test_a_sorted_page_keeps_the_order_asked_for_and_hides(env):
    pipeline, store = env
    store.put([rule(hide=["w9"], pin=[{"id": "w4", "position": 1}])])
    resp = search(pipeline, sort=[{"price": "asc"}])
    prices = {p.id: p.price for p in CATALOG}
    got = ids(resp)
    assert "w9" not in got and got[0] != "w4"
    assert [prices[i] for i in got if prices[i] is not None] == sorted(p for i in got if (p := prices[i]) is not None)
    assert resp["total"] == len(got)
    assert resp["rules_report"]["not_applied"] == [
        {"rule": "r1", "action": "pin", "reason": "a sorted page keeps the order asked for"}
    ]
    sorted_browse = browse(pipeline, sort=[{"price": "desc"}])
    assert "w9" in ids(sorted_browse)  # the rule is for queries containing 手表, not for the category page
