"""The learning loop end to end on tiny models: searches in an A/B experiment over REST, shoppers'
events through POST /v1/events, analytics over the event log, click pairs from that log, a reranker
trained on them, the trained reranker served as a new experiment's variant, and the A/B report."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from middleware.backends.embedded import EmbeddedBackend
from middleware.cli import main
from middleware.config import Settings
from middleware.experiments import Experiment
from middleware.models import Embedder, Reranker
from middleware.pipeline import Pipeline
from middleware.products import Product
from middleware.server.app import create_app
from middleware.tuning.data import read_pairs

CATALOG = [
    Product(id="w1", title="手表 女士 石英 轻奢", brand="Lumi", category=["手表"], price=900, sales=50),
    Product(id="w2", title="手表 男士 运动 防水", brand="Acme", category=["手表"], price=400, sales=500),
    Product(id="w3", title="手表 机械 商务", brand="Zeta", category=["手表"], price=1300, sales=5),
    Product(id="w4", title="手表 儿童 电子", brand="Kido", category=["手表"], price=100, sales=80),
    Product(id="e1", title="蓝牙 耳机 降噪", brand="Sono", category=["耳机"], price=200, sales=300),
    Product(id="e2", title="有线 耳机 运动", brand="Acme", category=["耳机"], price=60, sales=900),
    Product(id="e3", title="耳机 头戴 游戏", brand="Zeta", category=["耳机"], price=350, sales=40),
    Product(id="s1", title="跑步鞋 男士 透气", brand="Acme", category=["鞋"], price=500, sales=700),
    Product(id="s2", title="跑步鞋 女士 轻便", brand="Lumi", category=["鞋"], price=550, sales=60),
]
# what each query's shoppers are after: they click it wherever it is shown, and buy it every third time
WANTED = {"手表": "w2", "耳机": "e1", "跑步鞋": "s2", "运动": "e2"}
EXPERIMENT = {
    "id": "rerank-ab",
    "unit": "session",
    "variants": [{"name": "rerank", "traffic": 50}, {"name": "no-rerank", "traffic": 50, "overlay": {"rerank": False}}],
}
SESSIONS = 48


@pytest.fixture
def loop_models(tiny_embedder_dir, tiny_reranker_dir, model_cache_dir):
    embedder = Embedder(str(tiny_embedder_dir), cache_dir=model_cache_dir)
    reranker = Reranker(str(tiny_reranker_dir), cache_dir=model_cache_dir, precision="fp32")
    return embedder, reranker


def _serve(settings: Settings, backend: EmbeddedBackend, embedder, reranker) -> tuple[TestClient, Pipeline]:
    pipeline = Pipeline(settings, backend, embedder, reranker, owns_backend=False)
    return TestClient(create_app(settings, pipeline)), pipeline


def test_events_analytics_pairs_training_and_ab_report(
    loop_models, tiny_reranker_dir: Path, model_cache_dir: Path, tmp_path: Path, capsys, monkeypatch
):
    embedder, reranker = loop_models
    data = tmp_path / "store"
    monkeypatch.setenv("SHOPSEARCH_MODEL_CACHE_DIR", str(model_cache_dir))
    backend = EmbeddedBackend(data, dim=embedder.dim)
    backend.upsert(CATALOG, embedder.encode_documents([p.embedding_text() for p in CATALOG]))
    base = {
        "embedder": "none",
        "reranker": "none",
        "data_dir": data,
        "rerank_k": 10,
        "reranker_precision": "fp32",
        "model_cache_dir": model_cache_dir,
        "server": {"enable_writes": True},
        "events": {"writer_flush_ms": 10},
    }
    settings = Settings(**base)
    served = Counter()
    clicks_at = Counter()
    actions = Counter()
    queries = list(WANTED)
    try:
        client, pipeline = _serve(settings, backend, embedder, reranker)
        with client:
            assert client.put("/v1/experiments/rerank-ab", json=EXPERIMENT).status_code == 200
            for i in range(SESSIONS):
                session, query = f"s{i}", queries[i % len(queries)]
                resp = client.post("/v1/search", json={"query": query, "session_id": session, "size": 5}).json()
                assert resp["experiment"] == "rerank-ab" and resp["query_id"]
                served[resp["variant"]] += 1
                assert resp["reranked"] == (0 if resp["variant"] == "no-rerank" else min(10, resp["total"]))
                hits = [h["id"] for h in resp["hits"]]
                events = [
                    {"query_id": resp["query_id"], "action": "impression", "object_id": h, "position": p,
                     "session_id": session, "timestamp": "2026-12-02T10:00:00Z"}
                    for p, h in enumerate(hits, 1)
                ]  # fmt: skip
                wanted = WANTED[query]
                if wanted in hits:
                    position = hits.index(wanted) + 1
                    done = ["click", "purchase"] if i % 3 == 0 else ["click"]
                    for action in done:
                        event = {**events[0], "action": action, "object_id": wanted, "position": position}
                        events.append({**event, "value": 9.5} if action == "purchase" else event)
                    clicks_at[position] += 1
                for e in events:
                    actions[e["action"]] += 1
                reply = client.post("/v1/events", json={"events": events})
                assert reply.status_code == 200 and reply.json()["trusted"] == len(events), reply.json()
            # a forged click on a search that never happened is counted, not trusted
            forged = {"query_id": "nope", "action": "click", "object_id": "w3", "timestamp": "2026-12-02T10:00:00Z"}
            assert client.post("/v1/events", json={"events": [forged]}).json()["trusted"] == 0
        pipeline.close()
        assert sum(clicks_at.values()) > SESSIONS // 2  # the wanted products are mostly on the first page

        # analytics over the data directory's event log
        assert main(["--data-dir", str(data), "analytics", "--json", "--png", str(tmp_path / "ctr.png")]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["searches"] == SESSIONS and report["events_by_action"] == dict(sorted(actions.items()))
        assert {r["query"]: r["searches"] for r in report["top_queries"]} == {q: SESSIONS // 4 for q in queries}
        assert {r["position"]: r["clicks"] for r in report["ctr_by_position"] if r["clicks"]} == dict(clicks_at)
        assert report["untrusted_events"]["total"] == 1
        assert (tmp_path / "ctr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # click pairs straight from the live log (texts from the store), then a reranker trained on them
        pairs = tmp_path / "pairs"
        argv = ["--data-dir", str(data), "tune", "make-pairs", "--from-events", "--output-dir", str(pairs)]
        assert main([*argv, "--dev-fraction", "0", "--min-query-searches", "2"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["source"] == "event log"
        train = read_pairs(pairs / "train.jsonl")
        texts = {p.id: p.embedding_text() for p in CATALOG}
        positives = {r["query"]: r["pos_ids"] for r in train}
        assert positives and all(WANTED[q] in ids for q, ids in positives.items())
        assert all(texts[WANTED[r["query"]]] in r["pos"] for r in train)
        # negatives are what shoppers passed over above their click, never what they were after
        assert any(r["neg"] for r in train) and not any(WANTED[r["query"]] in r["neg_ids"] for r in train)
        trained = tmp_path / "rr-clicks"
        argv = ["tune", "train-reranker", "--input", str(pairs / "train.jsonl"), "--output-dir", str(trained)]
        assert main([*argv, "--base", str(tiny_reranker_dir), "--max-steps", "2", "--batch-size", "8"]) == 0
        capsys.readouterr()

        # the A/B report of the first experiment: every exposed search and every click accounted for
        assert main(["--data-dir", str(data), "ab", "report", "rerank-ab", "--json"]) == 0
        ab = json.loads(capsys.readouterr().out)
        by_name = {v["name"]: v for v in ab["variants"]}
        assert {n: v["searches"] for n, v in by_name.items()} == dict(served)
        assert sum(v["clicks"] for v in by_name.values()) == sum(clicks_at.values())
        assert main(["--data-dir", str(data), "ab", "stop", "rerank-ab"]) == 0

        # the click-trained reranker goes live as the next experiment's variant
        settings = Settings(**base, rerankers={"clicks": str(trained)})
        client, pipeline = _serve(settings, backend, embedder, None)
        nxt = {
            "id": "clicks-rr",
            "unit": "session",
            "variants": [
                {"name": "base", "traffic": 50},
                {"name": "clicks", "traffic": 50, "overlay": {"reranker": "clicks"}},
            ],
        }
        session = next(
            f"t{i}" for i in range(1000) if Experiment.model_validate(nxt).variant_for(f"t{i}").name == "clicks"
        )
        with client:
            assert client.put("/v1/experiments/clicks-rr", json=nxt).status_code == 200
            resp = client.post("/v1/search", json={"query": "手表", "session_id": session, "size": 5}).json()
        pipeline.close()
        assert (resp["variant"], resp["degraded"]) == ("clicks", []) and resp["reranked"] == min(10, resp["total"]) > 0
    finally:
        backend.close()
