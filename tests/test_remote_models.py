"""Models behind HTTP model servers.

Two kinds of peers, both real HTTP servers on loopback:
- infinity-emb (an independent server, its own virtualenv: tests/remote/setup-infinity) serving the
  packaged all-MiniLM-L6-v2 and a tiny random cross-encoder (plumbing only: its scores mean nothing);
- small in-process HTTP servers (tests/remote/peers.py) answering what a strict or broken server
  would: a 401, NaN vectors, a 503 burst, a TEI-shaped answer.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from middleware.backends.embedded import EmbeddedBackend
from middleware.cli import main as cli_main
from middleware.cli.search import load_demo_catalog
from middleware.config import Settings
from middleware.models import Embedder, Reranker, load_embedder, load_reranker
from middleware.models.remote import RemoteEmbedder, RemoteModelError, RemoteReranker, redact_url
from middleware.pipeline import Pipeline
from middleware.schema import SearchRequest
from tests.remote.infinity import (
    EMBEDDER_NAME,
    INSTALL_HINT,
    REQUIRE_ENV,
    RERANKER_NAME,
    InfinityServer,
    infinity_executable,
)
from tests.remote.peers import HttpPeer
from tests.remote.relay import Relay

TEXTS = [
    "小众设计师珐琅表盘女士手表 礼盒装",
    "适合送女友的轻奢小众手表",
    "wireless noise cancelling headphones, 30h battery",
    "不锈钢保温杯 500ml 长效保温",
    "儿童益智积木玩具 3-6岁",
    "running shoes for men, breathable mesh",
    "蓝牙耳机 降噪 运动",
    "a",
    "手" * 300,  # longer than MiniLM's 256 tokens: both sides truncate
]
FAST = {"timeout_s": 2.0, "max_retries": 1, "backoff_s": 0.05}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def ok(body: Any) -> tuple[int, Any, dict[str, str]]:
    return 200, body, {}


def fixed_vectors_route(vectors_for: Any) -> Any:
    """An OpenAI-style route answering `vectors_for(texts)`."""

    def route(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        if path.endswith("/models"):
            return ok({"data": [{"id": "m"}]})
        vectors = vectors_for(body["input"])
        return ok({"data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)]})

    return route


# ------------------------------------------------------------------------- small real HTTP peers


@pytest.fixture(scope="module")
def tiny_embedder(tiny_embedder_dir: Path, model_cache_dir: Path) -> Embedder:
    return Embedder(str(tiny_embedder_dir), cache_dir=model_cache_dir)


@pytest.fixture(scope="module")
def tiny_reranker(tiny_reranker_dir: Path, model_cache_dir: Path) -> Reranker:
    return Reranker(str(tiny_reranker_dir), cache_dir=model_cache_dir, precision="fp32")


@pytest.fixture
def tei_peer(tiny_embedder: Embedder, tiny_reranker: Reranker) -> Iterator[HttpPeer]:
    """TEI's routes, computed by our in-process tiny models on exactly the text received."""

    def route(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        if path == "/info":
            return ok({"model_id": "tiny-bge-zh", "model_type": {"embedding": {"pooling": "cls"}}})
        if path == "/embed":
            return ok(tiny_embedder.encode_documents(body["inputs"]).tolist())
        if path == "/rerank":
            assert body["raw_scores"] is True
            logits = tiny_reranker.score_logits(body["query"], body["texts"])
            items = [{"index": i, "score": float(s)} for i, s in enumerate(logits)]
            return ok(sorted(items, key=lambda item: -item["score"]))  # TEI answers best first
        return 404, {"error": "no route"}, {}

    with HttpPeer(route) as peer:
        yield peer


def test_tei_embedder_adds_the_query_instruction_itself_and_batches(tei_peer: HttpPeer, tiny_embedder: Embedder):
    remote = RemoteEmbedder(tei_peer.url, api="tei", max_batch_size=3, **FAST)
    assert remote.model_id == "tiny-bge-zh" and remote.dim == tiny_embedder.dim
    assert remote.query_instruction == tiny_embedder.query_instruction != ""  # a bge zh name: the BGE prefix
    tei_peer.requests.clear()

    queries = remote.encode_queries(TEXTS[:7])
    docs = remote.encode_documents(TEXTS[:7])
    assert queries.dtype == np.float32 and queries.shape == (7, remote.dim)
    assert np.allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)
    assert cosines(queries, tiny_embedder.encode_queries(TEXTS[:7])).min() >= 0.9999
    assert cosines(docs, tiny_embedder.encode_documents(TEXTS[:7])).min() >= 0.9999
    sent = [body["inputs"] for _m, path, _h, body in tei_peer.requests if path == "/embed"]
    # the client-side batch cap; a call's batches go out concurrently, so in any order
    assert sorted(len(batch) for batch in sent[:3]) == sorted(len(batch) for batch in sent[3:]) == [1, 3, 3]
    assert all(text.startswith(remote.query_instruction) for batch in sent[:3] for text in batch)
    assert sorted(t for batch in sent[3:] for t in batch) == sorted(TEXTS[:7])  # documents go as they are


def test_openai_answers_are_put_back_in_input_order():
    rng = np.random.default_rng(0)
    table = {t: rng.normal(size=8).tolist() for t in ["shopsearch dimension probe", *TEXTS]}

    def route(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        items = [{"index": i, "embedding": table[t]} for i, t in enumerate(body["input"])]
        return ok({"data": items[::-1], "model": body["model"]})  # any order: `index` says where

    with HttpPeer(route) as peer:
        remote = RemoteEmbedder(peer.url, model="m", **FAST)
        got = remote.encode_documents(TEXTS)
    want = np.array([table[t] for t in TEXTS], dtype=np.float32)
    assert np.allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)
    assert remote.query_instruction == ""  # "m" is no bge zh model


def test_tei_reranker_applies_the_sigmoid_to_raw_logits(tei_peer: HttpPeer, tiny_reranker: Reranker):
    remote = RemoteReranker(tei_peer.url, api="tei", max_batch_size=4, **FAST)
    docs = TEXTS[:7]
    assert np.allclose(remote.score("手表", docs), tiny_reranker.score("手表", docs), atol=1e-6)
    pairs = [("手表", d) for d in docs[:3]] + [("耳机", d) for d in docs[3:]]
    assert np.allclose(remote.score_pairs(pairs), tiny_reranker.score_pairs(pairs), atol=1e-6)
    ranked = remote.rerank("手表", docs, top_n=3)
    assert [i for i, _ in ranked] == [i for i, _ in tiny_reranker.rerank("手表", docs, top_n=3)]


def test_settings_choose_the_remote_clients(tei_peer: HttpPeer):
    settings = Settings(
        embedder=tei_peer.url, embedder_api="tei", reranker=tei_peer.url, reranker_api="tei", remote_models=FAST
    )
    embedder, reranker = load_embedder(settings), load_reranker(settings)
    assert isinstance(embedder, RemoteEmbedder) and isinstance(reranker, RemoteReranker)
    with pytest.raises(RemoteModelError, match="embedder_model: the OpenAI embeddings API needs") as err:
        load_embedder(Settings(embedder=tei_peer.url, embedder_api="openai"))
    assert err.value.setting == "embedder_model"


def test_api_keys_are_sent_and_refusals_name_the_key_setting():
    def route(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        if headers.get("authorization") != "Bearer s3cret":
            return 401, {"error": {"message": "invalid api key"}}, {}
        return fixed_vectors_route(lambda texts: [[1.0, 2.0]] * len(texts))(method, path, headers, body)

    with HttpPeer(route) as peer:
        with pytest.raises(RemoteModelError, match=r"embedder_api_key: .* wants an API key \(401\)") as err:
            RemoteEmbedder(peer.url, model="m", **FAST)
        assert err.value.setting == "embedder_api_key"
        with pytest.raises(
            RemoteModelError, match=r"embedder_api_key: .* refused the API key \(401: invalid api key\)"
        ):
            RemoteEmbedder(peer.url, model="m", api_key="wrong", **FAST)
        assert RemoteEmbedder(peer.url, model="m", api_key="s3cret", **FAST).dim == 2
        with pytest.raises(RemoteModelError, match=r"reranker_api_key: .* wants an API key"):
            RemoteReranker(peer.url, api="tei", **FAST)


def test_nan_or_wrong_length_vectors_are_errors():
    state = {"answer": "nan"}

    def vectors(texts: list[str]) -> list[list[float]]:
        if texts == ["shopsearch dimension probe"]:
            return [[0.5, 0.5, 0.5]]
        if state["answer"] == "nan":
            return [[0.1, float("nan"), 0.2] for _ in texts]
        if state["answer"] == "short":
            return [[0.1, 0.2] for _ in texts]
        return [[0.0, 0.0, 0.0] for _ in texts]

    def route(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        data = [{"index": i, "embedding": v} for i, v in enumerate(vectors(body["input"]))]
        # json.dumps writes NaN as a bare NaN token, as some servers do
        return 200, json.dumps({"data": data}).encode(), {}

    with HttpPeer(route) as peer:
        remote = RemoteEmbedder(peer.url, model="m", **FAST)
        with pytest.raises(RemoteModelError, match="returned NaN or infinite values"):
            remote.encode_documents(["x", "y"])
        state["answer"] = "short"
        with pytest.raises(RemoteModelError, match=r"vectors of length \[2\], expected 3-d, as at startup"):
            remote.encode_queries(["x"])
        state["answer"] = "zero"
        with pytest.raises(RemoteModelError, match="all-zero vector"):
            remote.encode_documents(["x"])


def test_nan_vectors_store_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`shopsearch index` against a server whose vectors turn NaN after startup: nothing is written."""

    def vectors(texts: list[str]) -> list[list[float]]:
        return [[0.5, 0.5, 0.5] if t == "shopsearch dimension probe" else [float("nan")] * 3 for t in texts]

    catalog = tmp_path / "catalog.jsonl"
    products = load_demo_catalog(None)[:5]
    catalog.write_text("".join(json.dumps(p.model_dump(mode="json"), ensure_ascii=False) + "\n" for p in products))
    data_dir = tmp_path / "store"

    def route(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        data = [{"index": i, "embedding": v} for i, v in enumerate(vectors(body["input"]))]
        return 200, json.dumps({"data": data}).encode(), {}

    with HttpPeer(route) as peer:
        monkeypatch.setenv("SHOPSEARCH_EMBEDDER_MODEL", "m")
        monkeypatch.setenv("SHOPSEARCH_REMOTE_MODELS__TIMEOUT_S", "2")
        code = cli_main(["--data-dir", str(data_dir), "index", str(catalog), "--embedder", peer.url])
    assert code != 0
    store = EmbeddedBackend(data_dir)
    try:
        assert store.count() == 0
    finally:
        store.close()


def test_429_and_503_are_retried_with_backoff():
    calls: list[float] = []
    plan = [(503, {}), (429, {"retry-after": "0.2"})]

    def route(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        calls.append(time.monotonic())
        if plan:
            status, extra = plan.pop(0)
            return status, {"error": "busy"}, dict(extra)
        return fixed_vectors_route(lambda texts: [[1.0, 0.0]] * len(texts))(method, path, headers, body)

    with HttpPeer(route) as peer:
        remote = RemoteEmbedder(peer.url, model="m", timeout_s=3.0, max_retries=2, backoff_s=0.05)
        assert remote.dim == 2 and len(calls) == 3
        assert calls[2] - calls[1] >= 0.2  # Retry-After was honoured
        plan.extend([(503, {})] * 3)
        with pytest.raises(RemoteModelError, match=r"answered 503 \(overloaded or restarting\) after 2 retries"):
            remote.encode_documents(["x"])


def test_a_slow_server_costs_at_most_the_timeout():
    def route(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        time.sleep(1.5)
        return ok({"data": []})

    with HttpPeer(route) as peer:
        started = time.monotonic()
        with pytest.raises(RemoteModelError, match=r"embedder: .* did not answer within 0.3s"):
            RemoteEmbedder(peer.url, model="m", timeout_s=0.3, max_retries=3, backoff_s=0.05)
        assert time.monotonic() - started < 1.2


def test_urls_that_are_no_model_server_say_so():
    def html(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        return 200, b"<html>hello</html>", {"content-type": "text/html"}

    def not_found(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        return 404, {"detail": "Not Found"}, {}

    with HttpPeer(html) as peer, pytest.raises(RemoteModelError, match=r"embedder: .*/embeddings did not answer JSON"):
        RemoteEmbedder(peer.url, model="m", **FAST)
    with HttpPeer(not_found) as peer:
        with pytest.raises(RemoteModelError, match=r"embedder: .* has no POST /embed route \(404\)"):
            RemoteEmbedder(peer.url, api="tei", model="m", **FAST)
        with pytest.raises(RemoteModelError, match=r"reranker: .* has no POST /v1/rerank route \(404\)"):
            RemoteReranker(peer.url, api="cohere", model="r", **FAST)
        closed_port = peer.port
    with pytest.raises(
        RemoteModelError, match=r"embedder: cannot reach http://127.0.0.1:\d+/v1 \(.*refused\) after 1 retries"
    ):
        RemoteEmbedder(f"http://127.0.0.1:{closed_port}/v1", model="m", **FAST)


def test_tls_errors_name_the_certificate_settings():
    with HttpPeer(fixed_vectors_route(lambda texts: [[1.0]] * len(texts))) as peer:
        url = peer.url.replace("http://", "https://")  # a TLS client against a plain-HTTP server
        with pytest.raises(RemoteModelError, match=r"embedder: TLS error talking to .*remote_models.ca_certs"):
            RemoteEmbedder(url, model="m", **FAST)


def test_credentials_in_the_url_never_reach_messages():
    assert redact_url("https://user:pw@models.example:8443/v1") == "https://models.example:8443/v1"
    with pytest.raises(RemoteModelError) as err:
        RemoteEmbedder("http://user:pw@127.0.0.1:9/v1", model="m", timeout_s=0.5, max_retries=0)
    assert "pw" not in str(err.value) and "127.0.0.1:9/v1" in str(err.value)


def test_cohere_answers_missing_documents_are_errors():
    def route(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        return ok({"results": [{"index": 0, "relevance_score": 0.9}]})  # always one result

    with HttpPeer(route) as peer:
        remote = RemoteReranker(peer.url, api="cohere", model="r", **FAST)  # the probe has one document
        with pytest.raises(RemoteModelError, match=r"not a cohere rerank answer \(scores for 1 of 2 documents\)"):
            remote.score("q", ["a", "b"])


def test_models_check_reports_each_problem_on_one_line(
    tmp_path: Path, tiny_embedder: Embedder, capsys: pytest.CaptureFixture[str]
):
    data_dir = tmp_path / "store"
    products = load_demo_catalog(None)[:3]
    store = EmbeddedBackend(data_dir, dim=tiny_embedder.dim)
    store.upsert(products, tiny_embedder.encode_documents([p.embedding_text() for p in products]))
    store.close()

    def route(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        if headers.get("authorization") != "Bearer k":
            return 403, {"error": "forbidden"}, {}
        return fixed_vectors_route(lambda texts: [[1.0] * 8] * len(texts))(method, path, headers, body)

    base = ["--data-dir", str(data_dir), "models", "check", "--reranker", "none"]
    with HttpPeer(route) as peer:
        env = {"SHOPSEARCH_EMBEDDER_MODEL": "m", "SHOPSEARCH_REMOTE_MODELS__TIMEOUT_S": "2"}
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            assert cli_main([*base, "--embedder", peer.url]) == 1
            out = capsys.readouterr().out.splitlines()
            assert out[0].startswith("embedder: FAIL embedder_api_key: ") and "(403" in out[0]
            mp.setenv("SHOPSEARCH_EMBEDDER_API_KEY", "k")
            assert cli_main([*base, "--embedder", peer.url]) == 1
            out = capsys.readouterr().out.splitlines()
            assert out[0].startswith("embedder: FAIL 'm' at ") and f"holds {tiny_embedder.dim}-d vectors" in out[0]
            assert "gives 8-d vectors" in out[0] and out[1] == "reranker: none (fused order)"
            assert cli_main(["--data-dir", str(tmp_path / "empty"), *base[2:], "--embedder", peer.url]) == 0
            assert capsys.readouterr().out.startswith("embedder: ok 'm' at ")


# ------------------------------------------------------------------------------ infinity-emb


@pytest.fixture(scope="module")
def infinity(tiny_reranker_dir: Path) -> Iterator[InfinityServer]:
    if infinity_executable() is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    from tests.remote.infinity import minilm_dir

    with InfinityServer({EMBEDDER_NAME: minilm_dir(), RERANKER_NAME: tiny_reranker_dir}) as server:
        print(f"infinity ready in {server.startup_s:.1f}s")
        yield server


@pytest.fixture(scope="module")
def local_minilm(infinity: InfinityServer, model_cache_dir: Path) -> Embedder:
    return Embedder(str(infinity.models[EMBEDDER_NAME]), cache_dir=model_cache_dir)


def test_infinity_embeddings_match_the_in_process_minilm(infinity: InfinityServer, local_minilm: Embedder):
    remote = RemoteEmbedder(infinity.url, api="openai", model=EMBEDDER_NAME, max_batch_size=4)
    assert remote.dim == local_minilm.dim == 384 and remote.model_id == EMBEDDER_NAME
    for encode in ("encode_queries", "encode_documents"):
        got, want = getattr(remote, encode)(TEXTS), getattr(local_minilm, encode)(TEXTS)
        sims = cosines(got, want)
        print(f"{encode}: cosine min {sims.min():.7f} max {sims.max():.7f}")
        assert sims.min() >= 0.9999


def test_infinity_rerank_route_matches_the_in_process_reranker(infinity: InfinityServer, tiny_reranker: Reranker):
    remote = RemoteReranker(infinity.root, api="cohere", model=RERANKER_NAME, max_batch_size=4)
    docs = TEXTS[:7]
    assert np.allclose(remote.score("送女友的手表", docs), tiny_reranker.score("送女友的手表", docs), atol=1e-4)


def test_infinity_wrong_model_names_are_named(infinity: InfinityServer):
    with pytest.raises(RemoteModelError, match=r"embedder_model: 'bge-large-zh-v1.5' is not served by .*minilm"):
        RemoteEmbedder(infinity.url, model="bge-large-zh-v1.5")
    with pytest.raises(RemoteModelError, match=r"reranker_model: .* does not serve 'minilm'") as err:
        RemoteReranker(infinity.root, api="cohere", model=EMBEDDER_NAME)
    assert err.value.setting == "reranker_model"


def test_search_degrades_to_bm25_while_the_model_server_is_away_and_recovers(
    infinity: InfinityServer, local_minilm: Embedder, tmp_path: Path
):
    products = load_demo_catalog(None)
    store = EmbeddedBackend(tmp_path / "store", dim=local_minilm.dim)
    store.upsert(products, local_minilm.encode_documents([p.embedding_text() for p in products]))
    relay = Relay(("127.0.0.1", infinity.port))
    remote = RemoteEmbedder(
        f"http://127.0.0.1:{relay.port}/v1", model=EMBEDDER_NAME, timeout_s=1.5, max_retries=2, backoff_s=0.05
    )
    pipeline = Pipeline(Settings(deadline_ms=800), store, remote, None)
    # the embed wait may use the whole budget; BM25 results are assembled after it (a few ms)
    answered_in_time = 800 + 100
    request = SearchRequest(query="送女友的轻奢小众手表", size=5)
    try:
        healthy = pipeline.search(request)
        assert healthy.degraded == [] and len(healthy.hits) == 5

        relay.down()  # nothing listens: connection refused
        away = pipeline.search(request)
        assert {"embed", "knn"} <= set(away.degraded) and away.hits and away.took_ms < answered_in_time

        relay.up()
        relay.delay_s = 3.0  # overloaded: slower than the search's deadline
        slow = pipeline.search(request)
        assert {"embed", "knn"} <= set(slow.degraded) and slow.hits and slow.took_ms < answered_in_time

        relay.delay_s = 0.0
        time.sleep(1.6)  # the slow call still in flight runs out (remote_models.timeout_s) first
        back = pipeline.search(request)
        assert back.degraded == [] and [h.id for h in back.hits] == [h.id for h in healthy.hits]
    finally:
        pipeline.close()
        relay.close()
        remote.close()


def test_models_check_against_infinity(infinity: InfinityServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    args = ["--data-dir", str(tmp_path / "empty"), "models", "check", "--embedder", infinity.url]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHOPSEARCH_EMBEDDER_MODEL", EMBEDDER_NAME)
        mp.setenv("SHOPSEARCH_RERANKER_API", "cohere")
        mp.setenv("SHOPSEARCH_RERANKER_MODEL", RERANKER_NAME)
        assert cli_main([*args, "--reranker", infinity.root]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith(f"embedder: ok 'minilm' at {infinity.url} (openai), 384-d")
        assert lines[1].startswith(f"reranker: ok 'tiny-reranker' at {infinity.root} (cohere)")
        mp.setenv("SHOPSEARCH_EMBEDDER_MODEL", "minilm-typo")
        assert cli_main([*args, "--reranker", "none"]) == 1
        assert capsys.readouterr().out.startswith("embedder: FAIL embedder_model: 'minilm-typo' is not served by")
