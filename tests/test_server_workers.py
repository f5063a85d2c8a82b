"""`shopsearch serve --workers 2` as real processes on one loopback port, over one embedded store:
a write through the REST API is seen by every worker's searches (BM25 and kNN) within a second, and
each worker's readiness is false until its models load. Tiny random models: plumbing only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_models_server import CLI, REPO, free_port

WORKER = "x-shopsearch-worker"
KEY = "k-workers-1"


class WorkersServer:
    """`shopsearch serve --workers N` in a child process; `url`, `wait_ready()`, `close()`."""

    def __init__(self, tmp: Path, env: dict[str, str], workers: int = 2) -> None:
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"workers-server-{self.port}.log"
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **env}
        argv = [sys.executable, "-c", CLI, "--data-dir", str(tmp / "data"), "serve"]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*argv, "--workers", str(workers), "--port", str(self.port)],
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp,
            )

    def readiness(self) -> httpx.Response | None:
        try:  # no shared client: each call is a new connection, so any worker may answer it
            return httpx.get(self.url + "/readyz", timeout=2)
        except httpx.TransportError:
            return None

    def wait_workers(
        self, ready: bool, timeout_s: float = 120.0, until: Callable[[httpx.Response], bool] = lambda r: True
    ) -> dict[str, httpx.Response]:
        """The last readiness answer of each worker, once every worker's readiness is `ready` (and `until` holds)."""
        seen: dict[str, httpx.Response] = {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            answer = self.readiness()
            if answer is not None:
                seen[answer.headers[WORKER]] = answer
                if len(seen) == self.workers and all(
                    (r.status_code == 200) == ready and until(r) for r in seen.values()
                ):
                    return seen
            time.sleep(0.05)
        states = {pid: r.status_code for pid, r in seen.items()}
        raise AssertionError(f"workers never all ready={ready} ({states}): {self.log.read_text()[-3000:]}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def serve_env(embedder: Path | str, cache: Path) -> dict[str, str]:
    return {
        "SHOPSEARCH_EMBEDDER": str(embedder),
        "SHOPSEARCH_RERANKER": "none",
        "SHOPSEARCH_MODEL_CACHE_DIR": str(cache),
        "SHOPSEARCH_SERVER__API_KEYS": KEY,
        "SHOPSEARCH_SERVER__ENABLE_WRITES": "true",
    }


@pytest.fixture(scope="module")
def server(tiny_embedder_dir: Path, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    srv = WorkersServer(tmp_path_factory.mktemp("workers"), serve_env(tiny_embedder_dir, model_cache_dir))
    try:
        srv.wait_workers(ready=True)
        yield srv
    finally:
        srv.close()


def _post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url, json=body, headers={"x-api-key": KEY}, timeout=10)


def _searches_until_every_worker_sees(srv: WorkersServer, body: dict[str, Any], product_id: str) -> dict[str, float]:
    """Searches on new connections (8 at a time) until every worker has answered with `product_id`;
    the seconds after the call of each worker's first such answer (when it was received). A worker
    that has answered with it never answers without it again."""
    first: dict[str, float] = {}
    started = time.monotonic()

    def timed_search(_: int) -> tuple[float, float, httpx.Response]:
        sent = time.monotonic()
        r = _post(srv.url + "/v1/search", body)
        return sent, time.monotonic(), r

    with ThreadPoolExecutor(8) as pool:
        while len(first) < srv.workers and time.monotonic() - started < 10:
            for sent, received, r in pool.map(timed_search, range(8)):
                assert r.status_code == 200, r.text
                worker, found = r.headers[WORKER], product_id in [h["id"] for h in r.json()["hits"]]
                # concurrent requests may have been served before the first one that found it: only a
                # request sent after that answer arrived must find it too
                assert found or worker not in first or sent < started + first[worker], f"{worker} lost {product_id}"
                if found:
                    first[worker] = min(first.get(worker, received - started), received - started)
    return first


def test_a_write_through_one_worker_is_searchable_in_every_worker_within_a_second(server: WorkersServer) -> None:
    seed = [{"id": f"s{i}", "title": f"保温杯 {i} 号", "category": ["杯子"]} for i in range(5)]
    assert _post(server.url + "/v1/products", {"products": seed}).json() == {"upserted": 5}
    for round_, title in enumerate(["钛合金露营折叠椅", "月光宝盒复古台灯"]):
        new_id = f"new-{round_}"
        wrote = _post(server.url + "/v1/products", {"products": [{"id": new_id, "title": title}]})
        assert wrote.status_code == 200 and wrote.json() == {"upserted": 1}
        bm25 = _searches_until_every_worker_sees(server, {"query": title, "retrieval": "bm25"}, new_id)
        knn = _searches_until_every_worker_sees(
            server, {"query": "随便什么", "retrieval": "vector", "filters": {"ids": [new_id]}}, new_id
        )
        assert len(bm25) == len(knn) == 2, (bm25, knn)  # both workers answered, each saw the write
        assert max(bm25.values()) <= 1.0 and max(knn.values()) <= 1.0, (bm25, knn)


def test_a_delete_through_one_worker_leaves_every_worker(server: WorkersServer) -> None:
    assert (
        _post(server.url + "/v1/products", {"products": [{"id": "gone", "title": "即将下架的雨伞"}]}).status_code == 200
    )
    assert _post(server.url + "/v1/products/delete", {"ids": ["gone"]}).json()["deleted"] == 1
    answers: dict[str, list[list[str]]] = {}
    deadline = time.monotonic() + 10
    with ThreadPoolExecutor(8) as pool:
        while len(answers) < server.workers and time.monotonic() < deadline:
            for body in ({"query": "即将下架的雨伞", "retrieval": "bm25"}, {"query": "雨伞", "retrieval": "vector"}):
                for r in pool.map(lambda _, b=body: _post(server.url + "/v1/search", b), range(8)):
                    answers.setdefault(r.headers[WORKER], []).append([h["id"] for h in r.json()["hits"]])
    assert len(answers) == 2 and all("gone" not in ids for lists in answers.values() for ids in lists), answers


def test_each_worker_is_unready_until_its_models_load_then_ready(
    tiny_embedder_dir: Path, model_cache_dir: Path, tmp_path: Path
) -> None:
    """The full service, as the models-only one: readiness false with the reason, retried until it loads."""
    model = tmp_path / "models" / "tiny-bge-zh"  # not there yet
    srv = WorkersServer(tmp_path, serve_env(model, model_cache_dir))
    try:
        unready = srv.wait_workers(ready=False, until=lambda r: r.json()["checks"]["startup"] != "loading")
        for answer in unready.values():
            assert answer.status_code == 503 and answer.json()["ready"] is False
            assert answer.json()["checks"]["startup"] != "loading" and "tiny-bge-zh" in answer.text
        refused = _post(srv.url + "/v1/search", {"query": "手表"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        shutil.copytree(tiny_embedder_dir, model)
        ready = srv.wait_workers(ready=True)
        assert set(ready) == set(unready)  # the same processes, recovered without a restart
        assert all(r.json()["checks"]["embedder"] == "ok" for r in ready.values())
    finally:
        srv.close()


def test_workers_flag_is_checked_before_anything_starts(tmp_path: Path) -> None:
    from middleware.cli import main

    assert main(["--data-dir", str(tmp_path), "serve", "--workers", "0", "--port", str(free_port())]) == 2
    code = main(["--data-dir", str(tmp_path), "serve", "--models-only", "--workers", "2", "--port", str(free_port())])
    assert code == 2


def test_workers_refuse_contradictory_cluster_credentials_in_one_line(capsys, tmp_path: Path, monkeypatch) -> None:
    """Checked by the command before any worker starts (a worker would only retry them)."""
    from middleware.cli import main

    (tmp_path / "pw").write_text("from-file\n")
    monkeypatch.setenv("SHOPSEARCH_SERVER__UPSTREAM_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SHOPSEARCH_OPENSEARCH__USERNAME", "admin")
    monkeypatch.setenv("SHOPSEARCH_OPENSEARCH__PASSWORD", "inline")
    monkeypatch.setenv("SHOPSEARCH_OPENSEARCH__PASSWORD_FILE", str(tmp_path / "pw"))
    argv = ["--data-dir", str(tmp_path), "serve", "--workers", "2", "--port", str(free_port()), "--embedder", "none"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "opensearch.password" in err and "from-file" not in err
