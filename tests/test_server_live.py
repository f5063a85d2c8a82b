"""The service under uvicorn on a loopback port: the official opensearch-py client, back-pressure,
a bounded load check, and pass-through to an upstream OpenSearch (osmem-server, in memory)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from opensearchpy import OpenSearch
from opensearchpy.exceptions import AuthorizationException, NotFoundError, RequestError

from middleware.cli.search import load_demo_catalog
from tests.test_server_support import (
    LiveServer,
    SlowReranker,
    make_app,
    make_settings,
    server_models,
    server_store,
)

__all__ = ["server_models", "server_store"]

QUERY = "适合送女友的轻奢小众手表"


@pytest.fixture(scope="module")
def live(server_store, server_models):
    settings = make_settings(api_keys=["k-123"])
    with LiveServer(make_app(server_store, *server_models, settings=settings)) as server:
        yield server


def test_opensearch_py_client_against_the_service(live):
    client = OpenSearch(hosts=[live.url], http_auth=("storefront", "k-123"), timeout=30)
    info = client.info()
    assert info["version"]["distribution"] == "opensearch"
    body = {
        "query": {"bool": {"must": {"match": {"title": QUERY}}, "filter": [{"term": {"category": "手表"}}]}},
        "size": 5,
        "_source": ["title", "category", "price"],
    }
    result = client.search(index="products", body=body)
    hits = result["hits"]["hits"]
    assert len(hits) == 5 and all("手表" in h["_source"]["category"] for h in hits)
    page = client.search(index="products", body={**body, "from": 1, "size": 2})["hits"]["hits"]
    assert [h["_id"] for h in page] == [h["_id"] for h in hits[1:3]]
    assert client.count(index="products")["count"] == 28
    assert client.get(index="products", id="w01")["_source"]["id"] == "w01"
    with pytest.raises(NotFoundError):
        client.get(index="products", id="missing")
    assert [d["found"] for d in client.mget(index="products", body={"ids": ["w01", "x"]})["docs"]] == [True, False]
    assert client.indices.exists(index="products")
    assert client.cluster.health()["status"] == "green"
    assert client.cat.indices(format="json")[0]["index"] == "products"
    both = client.msearch(body=[{"index": "products"}, {"query": {"match": {"title": "手表"}}, "size": 2},
                                {"index": "products"}, {"query": {"match": {"title": "耳机"}}, "size": 3}])  # fmt: skip
    assert [len(r["hits"]["hits"]) for r in both["responses"]] == [2, 3]
    with pytest.raises(AuthorizationException):
        client.indices.delete(index="products")
    with pytest.raises(AuthorizationException):
        client.index(index="products", id="evil", body={"title": "x"})
    with pytest.raises(RequestError):  # refused by name: no upstream to pass it to
        client.search(index="products", body={"query": {"match_all": {}}, "aggs": {"b": {"terms": {"field": "color"}}}})
    assert client.count(index="products")["count"] == 28  # nothing was deleted or written


def test_opensearch_py_without_the_key_is_refused(live):
    from opensearchpy.exceptions import AuthenticationException

    with pytest.raises(AuthenticationException):
        OpenSearch(hosts=[live.url]).search(index="products", body={"query": {"match": {"title": "x"}}})


def test_a_full_queue_answers_429_at_once(server_store, server_models):
    app = make_app(
        server_store, server_models[0], SlowReranker(server_models[1], delay_s=3.0), max_queue=1, warm_up=False
    )
    with LiveServer(app) as server:
        first: dict = {}

        def slow_search() -> None:
            first["response"] = httpx.post(f"{server.url}/v1/search", json={"query": QUERY}, timeout=30)

        t = threading.Thread(target=slow_search)
        t.start()
        deadline = time.monotonic() + 10
        while "shopsearch_searches_in_flight 1.0" not in httpx.get(f"{server.url}/metrics").text:
            assert time.monotonic() < deadline, "the first search never started"
            time.sleep(0.02)
        started = time.perf_counter()
        refused = httpx.post(f"{server.url}/v1/search", json={"query": "耳机"}, timeout=30)
        refused_after = time.perf_counter() - started
        proxy_refused = httpx.post(f"{server.url}/products/_search", json={"query": {"match": {"title": "x"}}})
        t.join(timeout=30)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused_after < 2.0  # not queued behind the 3 s search
        assert proxy_refused.status_code == 429
        assert proxy_refused.json()["error"]["type"] == "rejected_execution_exception"
        assert first["response"].status_code == 200
        assert 'shopsearch_rejected_total{reason="queue_full"} 2.0' in httpx.get(f"{server.url}/metrics").text


def test_bounded_loopback_load(server_store, server_models):
    """A fixed number of concurrent searches within a time limit: every one answered, none failed."""
    app = make_app(server_store, *server_models, max_queue=64)
    queries = ["手表", "蓝牙耳机", "保温杯", "口红", "机械键盘", "羽绒服", QUERY, "running shoes"]
    total, concurrency, limit_s = 160, 16, 120.0

    async def run(url: str) -> list[int]:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one(i: int) -> int:
                async with sem:
                    if i % 2:
                        r = await client.post("/v1/search", json={"query": queries[i % len(queries)], "size": 5})
                    else:
                        body = {"query": {"match": {"title": queries[i % len(queries)]}}, "size": 5}
                        r = await client.post("/products/_search", json=body)
                    return r.status_code

            return await asyncio.gather(*(one(i) for i in range(total)))

    with LiveServer(app) as server:
        started = time.perf_counter()
        statuses = asyncio.run(asyncio.wait_for(run(server.url), timeout=limit_s))
        elapsed = time.perf_counter() - started
        metrics = httpx.get(f"{server.url}/metrics").text
    assert statuses.count(200) == total, {s: statuses.count(s) for s in set(statuses)}
    assert elapsed < limit_s
    assert "shopsearch_batch_size_count" in metrics


# -------------------------------------------------------------------------------------- upstream


@pytest.fixture
def upstream(osmem_clone):
    """An in-memory OpenSearch with the demo catalog in `products` and one more index."""
    client = OpenSearch(hosts=[osmem_clone.url])
    for p in load_demo_catalog(None):
        client.index(index="products", id=p.id, body=p.model_dump(mode="json"))
    client.index(index="products-archive", id="old1", body={"title": "旧款 手表", "brand": "OLD"})
    client.indices.refresh(index="products")
    client.indices.refresh(index="products-archive")
    return osmem_clone


def test_pass_through_to_an_upstream_opensearch(server_store, server_models, upstream):
    app = make_app(server_store, *server_models, upstream_url=upstream.url)
    with LiveServer(app) as server:
        c = httpx.Client(base_url=server.url, timeout=30)
        aggs = c.post("/products/_search", json={"size": 0, "aggs": {"brands": {"terms": {"field": "brand.keyword"}}}})
        assert aggs.status_code == 200, aggs.text
        assert aggs.headers["x-shopsearch-passthrough"] == "1"
        assert aggs.json()["hits"]["total"]["value"] == 28 and "aggregations" in aggs.json()

        text = c.post("/products/_search", json={"query": {"match": {"title": QUERY}}, "size": 3})
        assert "x-shopsearch-passthrough" not in text.headers and "server-timing" in text.headers

        other = c.get("/products-archive/_doc/old1")  # an allowed index the embedded store does not hold
        assert other.status_code == 200 and other.json()["_source"]["brand"] == "OLD"
        assert c.post("/products-archive/_search", json={"query": {"match": {"title": "手表"}}}).json()["hits"]["hits"]
        assert c.get("/products-archive/_count").json()["count"] == 1
        ndjson = '{"index": "products"}\n{"size": 0, "query": {"match_all": {}}}\n'
        ms = c.post("/_msearch", content=ndjson, headers={"content-type": "application/x-ndjson"})
        assert ms.headers["x-shopsearch-passthrough"] == "1"
        assert ms.json()["responses"][0]["hits"]["total"]["value"] == 28

        # limits and refusals hold for passed-through requests too
        assert c.post("/products/_search", json={"query": {"match_all": {}}, "size": 1000}).status_code == 400
        script = {"query": {"script_score": {"query": {"match_all": {}}, "script": {"source": "1"}}}}
        assert c.post("/products/_search", json=script).status_code == 400
        assert c.delete("/products-archive").status_code == 403
        assert c.post("/secret/_search", json={"query": {"match_all": {}}}).status_code == 403
        c.close()
    assert OpenSearch(hosts=[upstream.url]).count(index="products-archive")["count"] == 1


def test_writes_pass_through_only_when_enabled(server_store, server_models, upstream):
    app = make_app(server_store, *server_models, upstream_url=upstream.url, enable_writes=True)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.put("/products-archive/_doc/new1", json={"title": "新款"}, params={"refresh": "true"})
        assert r.status_code in (200, 201), r.text
        assert c.get("/products-archive/_count").json()["count"] == 2
        assert c.put("/secret/_doc/1", json={"title": "x"}).status_code == 403  # still inside the allowed set
        assert c.put("/products-archive/_doc/..%2F..%2Fx", json={}).status_code == 400
        # an id holding "/" stays one id on its way to the cluster and back
        put = c.put("/products-archive/_doc/a%2Fb%3Fc", json={"title": "斜杠"}, params={"refresh": "true"})
        assert put.status_code in (200, 201), put.text
        got = c.get("/products-archive/_doc/a%2Fb%3Fc")
        assert got.status_code == 200 and got.json()["_id"] == "a/b?c", got.text
        assert c.delete("/products-archive/_doc/a%2Fb%3Fc", params={"refresh": "true"}).status_code == 200
        assert c.get("/products-archive/_doc/a%2Fb%3Fc").status_code == 404


def test_unreachable_upstream_is_503_not_500(server_store, server_models):
    from tests.test_server_support import free_port

    app = make_app(server_store, *server_models, upstream_url=f"http://127.0.0.1:{free_port()}")
    with LiveServer(app) as server:
        r = httpx.post(f"{server.url}/products/_search", json={"query": {"match_all": {}}})
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable_exception"
        assert r.json()["status"] == 503
