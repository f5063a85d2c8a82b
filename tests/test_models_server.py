"""`shopsearch serve --models-only` as a real process on a loopback port, driven by our own remote
clients over all four APIs (OpenAI and TEI embeddings, TEI and Cohere rerank), against the same tiny
models in process. Tiny random models: plumbing and parity only, their rankings mean nothing."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from middleware.models import Embedder, Reranker
from middleware.models.remote import RemoteEmbedder, RemoteModelError, RemoteReranker

REPO = Path(__file__).resolve().parents[1]
KEY = "k-models-1"
CLI = "import sys; from middleware.cli import main; sys.exit(main())"
TEXTS = ["送女友的轻奢小众手表", "蓝牙降噪耳机", "儿童 保温杯 316", "running shoes", "机械键盘 红轴", "a", "加湿器"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ModelServer:
    """`shopsearch serve --models-only` in a child process; `url`, `wait_ready()`, `close()`."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"models-server-{self.port}.log"
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **env}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CLI, "serve", "--models-only", "--port", str(self.port)],
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp,
            )

    def readiness(self) -> httpx.Response | None:
        try:
            return httpx.get(self.url + "/readyz", timeout=2)
        except httpx.TransportError:
            return None

    def wait(self, ready: bool, timeout_s: float = 90.0) -> httpx.Response:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            answer = self.readiness()
            if answer is not None and (answer.status_code == 200) == ready:
                return answer
            time.sleep(0.2)
        raise AssertionError(f"readiness never became {ready}: {self.log.read_text()[-2000:]}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def model_env(embedder: Path | str, reranker: Path | str, cache: Path) -> dict[str, str]:
    return {
        "SHOPSEARCH_EMBEDDER": str(embedder),
        "SHOPSEARCH_RERANKER": str(reranker),
        "SHOPSEARCH_RERANKER_PRECISION": "fp32",
        "SHOPSEARCH_MODEL_CACHE_DIR": str(cache),
        "SHOPSEARCH_SERVER__API_KEYS": KEY,
        "SHOPSEARCH_SERVER__BATCH_MAX_WAIT_MS": "5",
    }


@pytest.fixture(scope="module")
def server(
    tiny_embedder_dir: Path, tiny_reranker_dir: Path, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelServer]:
    srv = ModelServer(
        tmp_path_factory.mktemp("models-only"), model_env(tiny_embedder_dir, tiny_reranker_dir, model_cache_dir)
    )
    try:
        srv.wait(ready=True)
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def local_embedder(tiny_embedder_dir: Path, model_cache_dir: Path) -> Embedder:
    return Embedder(str(tiny_embedder_dir), cache_dir=model_cache_dir)


@pytest.fixture(scope="module")
def local_reranker(tiny_reranker_dir: Path, model_cache_dir: Path) -> Reranker:
    return Reranker(str(tiny_reranker_dir), cache_dir=model_cache_dir, precision="fp32")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("api", ["openai", "tei"])
def test_remote_embedder_against_models_only_server_matches_in_process(
    server: ModelServer, local_embedder: Embedder, api: str
):
    url = server.url + "/v1" if api == "openai" else server.url
    model = local_embedder.model_id if api == "openai" else None
    remote = RemoteEmbedder(url, api=api, model=model, api_key=KEY)  # type: ignore[arg-type]
    try:
        assert remote.model_id == local_embedder.model_id and remote.dim == local_embedder.dim
        # the client adds the instruction on queries; the server embeds exactly what it receives
        assert remote.query_instruction == local_embedder.query_instruction != ""
        queries, docs = remote.encode_queries(TEXTS), remote.encode_documents(TEXTS)
        assert cosines(queries, local_embedder.encode_queries(TEXTS)).min() >= 0.9999
        assert cosines(docs, local_embedder.encode_documents(TEXTS)).min() >= 0.9999
        assert cosines(queries, docs).min() < 0.9999  # the instruction really changed the query vectors
    finally:
        remote.close()


@pytest.mark.parametrize("api", ["tei", "cohere"])
def test_remote_reranker_against_models_only_server_matches_in_process(
    server: ModelServer, local_reranker: Reranker, api: str
):
    model = local_reranker.model_id if api == "cohere" else None
    remote = RemoteReranker(server.url, api=api, model=model, api_key=KEY)  # type: ignore[arg-type]
    try:
        assert np.allclose(remote.score("手表", TEXTS), local_reranker.score("手表", TEXTS), atol=1e-5)
        pairs = [("手表", TEXTS[0]), ("耳机", TEXTS[1]), ("手表", TEXTS[2])]
        assert np.allclose(remote.score_pairs(pairs), local_reranker.score_pairs(pairs), atol=1e-5)
    finally:
        remote.close()


def test_tei_raw_scores_are_the_logits_and_openai_shapes_are_complete(
    server: ModelServer, local_reranker: Reranker, local_embedder: Embedder
):
    auth = {"Authorization": f"Bearer {KEY}"}
    raw = httpx.post(server.url + "/rerank", json={"query": "手表", "texts": TEXTS, "raw_scores": True}, headers=auth)
    assert raw.status_code == 200
    logits = local_reranker.score_logits("手表", TEXTS)
    got = {item["index"]: item["score"] for item in raw.json()}
    assert np.allclose([got[i] for i in range(len(TEXTS))], logits, atol=1e-4)
    assert [item["index"] for item in raw.json()] == sorted(range(len(TEXTS)), key=lambda i: -logits[i])
    body = {"model": local_embedder.model_id, "input": "蓝牙降噪耳机", "encoding_format": "base64"}
    answer = httpx.post(server.url + "/v1/embeddings", json=body, headers=auth).json()
    vector = np.frombuffer(__import__("base64").b64decode(answer["data"][0]["embedding"]), dtype="<f4")
    assert cosines(vector[None], local_embedder.encode_documents(["蓝牙降噪耳机"])).min() >= 0.9999
    assert answer["usage"]["prompt_tokens"] > 0 and answer["object"] == "list"
    models = httpx.get(server.url + "/v1/models", headers=auth).json()
    assert [m["id"] for m in models["data"]] == [local_embedder.model_id, local_reranker.model_id]
    info = httpx.get(server.url + "/info", headers=auth).json()
    assert info["model_id"] == local_embedder.model_id and info["model_type"]["embedding"]["pooling"] == "cls"


def test_keys_model_names_and_bad_bodies_are_one_clear_error(server: ModelServer, local_embedder: Embedder):
    with pytest.raises(RemoteModelError, match=r"embedder_api_key: .* wants an API key"):
        RemoteEmbedder(server.url + "/v1", api="openai", model=local_embedder.model_id)
    with pytest.raises(RemoteModelError, match=r"embedder_api_key: .* refused the API key"):
        RemoteEmbedder(server.url + "/v1", api="openai", model=local_embedder.model_id, api_key="wrong")
    with pytest.raises(
        RemoteModelError, match=r"embedder_model: 'bge-large-zh-v1.5' is not served .* serves: .*tiny-bge-zh"
    ):
        RemoteEmbedder(server.url + "/v1", api="openai", model="bge-large-zh-v1.5", api_key=KEY)
    with pytest.raises(RemoteModelError, match=r"reranker_model: .* does not serve 'other-reranker'"):
        RemoteReranker(server.url, api="cohere", model="other-reranker", api_key=KEY)
    auth = {"x-api-key": KEY}
    bad = httpx.post(
        server.url + "/v1/embeddings", json={"model": local_embedder.model_id, "input": [1, 2]}, headers=auth
    )
    assert bad.status_code == 422 and "input" in bad.json()["error"]["message"]
    tei = httpx.post(server.url + "/embed", json={"inputs": []}, headers=auth)
    assert tei.status_code == 400 and tei.json()["error"] == "inputs: must not be empty"
    missing = httpx.post(server.url + "/v1/search", json={"query": "x"}, headers=auth)
    assert missing.status_code == 404 and "model server" in missing.json()["error"]["message"]


def test_model_calls_go_through_the_batching_queue_and_caches(server: ModelServer, local_embedder: Embedder):
    auth = {"x-api-key": KEY}
    body = {"model": local_embedder.model_id, "input": ["缓存测试 一", "缓存测试 二"]}
    first = httpx.post(server.url + "/v1/embeddings", json=body, headers=auth).json()
    again = httpx.post(server.url + "/v1/embeddings", json=body, headers=auth).json()
    assert first["data"] == again["data"]
    text = httpx.get(server.url + "/metrics", headers=auth).text
    hits = [line for line in text.splitlines() if line.startswith("shopsearch_cache") and 'cache="embedding"' in line]
    assert any('result="hit"' in line and not line.endswith(" 0.0") for line in hits), hits
    assert "shopsearch_batch_size_count" in text and 'route="/v1/embeddings"' in text


def test_a_model_that_cannot_load_keeps_readiness_false_until_it_can(
    tiny_embedder_dir: Path, model_cache_dir: Path, tmp_path: Path
):
    later = tmp_path / "models" / "tiny-bge-zh"
    srv = ModelServer(tmp_path, model_env(later, "none", model_cache_dir))
    try:
        answer = srv.wait(ready=False, timeout_s=60)
        deadline = time.monotonic() + 60
        while answer.json()["checks"]["models"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.2)
            answer = srv.readiness() or answer
        line = answer.json()["checks"]["models"]
        assert str(later) in line and "\n" not in line, line
        assert httpx.get(srv.url + "/healthz").status_code == 200
        refused = httpx.post(srv.url + "/embed", json={"inputs": ["x"]}, headers={"x-api-key": KEY})
        assert refused.status_code == 503 and str(later) in refused.json()["error"]
        shutil.copytree(tiny_embedder_dir, later)  # the files arrive: the next try loads them
        srv.wait(ready=True, timeout_s=90)
        assert len(httpx.post(srv.url + "/embed", json={"inputs": ["x"]}, headers={"x-api-key": KEY}).json()) == 1
    finally:
        srv.close()


def test_models_check_compares_the_store_binding_with_the_served_model(
    server: ModelServer, local_embedder: Embedder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from middleware.backends.base import EmbedderBinding
    from middleware.backends.embedded import EmbeddedBackend
    from middleware.cli import main as cli_main

    def store(name: str, model: str) -> Path:
        data_dir = tmp_path / name
        backend = EmbeddedBackend(data_dir, dim=local_embedder.dim)
        backend.bind_embedder(EmbedderBinding(model=model, dim=local_embedder.dim))
        backend.close()
        return data_dir

    args = ["models", "check", "--embedder", server.url + "/v1", "--reranker", "none"]
    env = {"SHOPSEARCH_EMBEDDER_MODEL": local_embedder.model_id, "SHOPSEARCH_EMBEDDER_API_KEY": KEY}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        assert cli_main(["--data-dir", str(store("same", local_embedder.model_id)), *args]) == 0
        assert capsys.readouterr().out.startswith(f"embedder: ok {local_embedder.model_id!r} at ")
        assert cli_main(["--data-dir", str(store("other", "bge-large-zh-v1.5")), *args]) == 1
        line = capsys.readouterr().out.splitlines()[0]
        assert line.startswith(f"embedder: FAIL {local_embedder.model_id!r} at ")
        assert f"was indexed with ('bge-large-zh-v1.5', {local_embedder.dim}-d)" in line
