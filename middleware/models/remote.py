"""Models behind an HTTP model server (TEI, infinity, vLLM, SGLang, OpenAI, Cohere, Jina).

`RemoteEmbedder` and `RemoteReranker` have the public surface of the local `Embedder` / `Reranker`
(`encode_queries`, `encode_documents`, `dim`, `model_id`; `score`, `score_pairs`, `rerank`), so the
pipeline, the server's batching queue and the loaders use them unchanged. What stays ours:
- the query instruction (the server never adds it), by the same name rule as the local embedder;
- L2 normalisation and the checks on what comes back (count, length, finite values);
- the sigmoid over raw reranker logits (TEI), so scores keep the local reranker's [0, 1] scale.

Every failure is a `RemoteModelError`: one line naming the setting to fix. A call never outlives
`remote_models.timeout_s`, retries and backoff included, so a slow server costs a search at most
that (the pipeline's deadline already answers from BM25 sooner).
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np

from middleware.models.embedder import default_query_instruction, l2_normalize
from middleware.models.errors import ModelLoadError
from middleware.models.reranker import sigmoid
from middleware.models.resolve import ResolvedModel
from middleware.models.tokenization import check_texts

if TYPE_CHECKING:
    from middleware.config import RemoteModelSettings, Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

EmbedderApi = Literal["openai", "tei"]
RerankerApi = Literal["tei", "cohere"]

# statuses worth another try: rate limited, or a proxy / server that is restarting or overloaded
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# the text embedded once at startup to learn the server's dimension and prove the route works
PROBE_TEXT = "shopsearch dimension probe"


class RemoteModelError(ModelLoadError):
    """A model server could not be used; the message names the setting to fix."""

    def __init__(self, message: str, *, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


class RemoteStatusError(RemoteModelError):
    """The server answered with an HTTP error that is not retried (4xx other than 429, or a 5xx)."""

    def __init__(self, message: str, *, setting: str, status: int, detail: str) -> None:
        super().__init__(message, setting=setting)
        self.status = status
        self.detail = detail


def is_remote(name: str | None) -> bool:
    """Whether an `embedder` / `reranker` setting names a model server rather than a model."""
    return isinstance(name, str) and name.strip().lower().startswith(("http://", "https://"))


def redact_url(url: str) -> str:
    """The URL without user:password, for messages, logs and the store's binding."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def query_instruction_for(model_name: str) -> str:
    """The instruction the local embedder would prepend for a model of this name (BGE zh models:
    为这个句子生成表示以用于检索相关文章：; others: ""). A remote model has no saved prompt to read."""
    return default_query_instruction(
        # a path that holds no sentence-transformers config, so only the name rule applies
        ResolvedModel(path=Path("/nonexistent/remote-model"), model_id=model_name, source="hub")
    )


def _tls_failure(err: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(cur) or "SSL" in type(cur).__name__:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _detail(response: httpx.Response) -> str:
    """A short, single-line account of an error body."""
    try:
        body = response.json()
    except ValueError:
        text = response.text
    else:
        if isinstance(body, dict):
            for key in ("error", "detail", "message"):
                if key in body:
                    value = body[key]
                    if isinstance(value, dict):
                        value = value.get("message", value)
                    text = str(value)
                    break
            else:
                text = str(body)
        else:
            text = str(body)
    return " ".join(text.split())[:300]


class RemoteClient:
    """One model server: pooled connections, a per-call time budget, retries with backoff."""

    def __init__(
        self,
        url: str,
        *,
        setting: str,
        key_setting: str,
        api_key: str | None = None,
        timeout_s: float = 5.0,
        connect_timeout_s: float = 2.0,
        max_retries: int = 2,
        backoff_s: float = 0.1,
        max_connections: int = 16,
        verify_certs: bool = True,
        ca_certs: str | Path | None = None,
    ) -> None:
        if not is_remote(url):
            raise RemoteModelError(f"{setting}: {url!r} is not an http(s) URL", setting=setting)
        self.base = url.strip().rstrip("/")
        self.display_url = redact_url(self.base)
        self.setting = setting
        self.key_setting = key_setting
        self.has_key = bool(api_key)
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        verify: bool | ssl.SSLContext = verify_certs
        if verify_certs and ca_certs is not None:
            verify = ssl.create_default_context(cafile=str(ca_certs))
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            headers=headers,
            verify=verify,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(timeout_s, connect=self.connect_timeout_s),
            follow_redirects=False,
        )

        # a long input list or a batch of several searches' rerank pairs goes out as concurrent requests
        self._parallel = max(1, min(max_connections, 8))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        self._http.close()

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """`[fn(item) for item in items]`, the calls made concurrently (one request each)."""
        if len(items) <= 1 or self._parallel == 1:
            return [fn(item) for item in items]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._parallel, thread_name_prefix="shopsearch-remote")
            pool = self._pool
        return list(pool.map(fn, items))

    def _fail(self, message: str) -> RemoteModelError:
        return RemoteModelError(f"{self.setting}: {message}", setting=self.setting)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON answer, or a RemoteModelError naming the setting."""
        url = self.base + path
        shown = self.display_url + path
        started = time.monotonic()
        attempt = 0
        while True:
            remaining = self.timeout_s - (time.monotonic() - started)
            if remaining <= 0:
                raise self._fail(f"{shown} did not answer within {self.timeout_s:g}s (remote_models.timeout_s)")
            retry_after: float | None = None
            try:
                response = self._http.request(
                    method,
                    url,
                    json=body,
                    timeout=httpx.Timeout(remaining, connect=min(self.connect_timeout_s, remaining)),
                )
            except httpx.TimeoutException:
                problem = f"{shown} did not answer within {self.timeout_s:g}s (remote_models.timeout_s)"
            except httpx.TransportError as err:
                if _tls_failure(err):
                    raise self._fail(
                        f"TLS error talking to {self.display_url}: {err} (set remote_models.ca_certs to the "
                        "server's CA, or remote_models.verify_certs=false for a test server)"
                    ) from None
                problem = f"cannot reach {self.display_url} ({err or type(err).__name__})"
            else:
                status = response.status_code
                if status < 300:
                    try:
                        return response.json()
                    except ValueError:
                        raise self._fail(
                            f"{shown} did not answer JSON (content-type {response.headers.get('content-type')!r}): "
                            "is it a model server, and is the URL's path right?"
                        ) from None
                if status in (401, 403):
                    where = f"{self.key_setting}: {self.display_url}"
                    if self.has_key:
                        msg = f"{where} refused the API key ({status}: {_detail(response)})"
                    else:
                        msg = f"{where} wants an API key ({status}); set {self.key_setting}"
                    raise RemoteModelError(msg, setting=self.key_setting)
                if status not in RETRY_STATUSES:
                    detail = _detail(response)
                    raise RemoteStatusError(
                        f"{self.setting}: {method} {shown} answered {status}: {detail}",
                        setting=self.setting,
                        status=status,
                        detail=detail,
                    )
                problem = f"{shown} answered {status} (overloaded or restarting)"
                header = response.headers.get("retry-after")
                if header:
                    try:
                        retry_after = float(header)
                    except ValueError:
                        retry_after = None
            if attempt >= self.max_retries:
                suffix = f" after {attempt} retries" if attempt else ""
                raise self._fail(problem + suffix)
            delay = retry_after if retry_after is not None else self.backoff_s * (2**attempt)
            remaining = self.timeout_s - (time.monotonic() - started)
            if delay >= remaining:
                raise self._fail(f"{problem}; no time left to retry within {self.timeout_s:g}s")
            log.debug("%s: %s, retrying in %.2fs", self.setting, problem, delay)
            time.sleep(delay)
            attempt += 1


def _client_options(cfg: RemoteModelSettings) -> dict[str, Any]:
    return {
        "timeout_s": cfg.timeout_s,
        "connect_timeout_s": cfg.connect_timeout_s,
        "max_retries": cfg.max_retries,
        "backoff_s": cfg.backoff_s,
        "max_connections": cfg.max_connections,
        "verify_certs": cfg.verify_certs,
        "ca_certs": cfg.ca_certs,
    }


class RemoteEmbedder:
    """`RemoteEmbedder(url, api="openai", model="bge-large-zh-v1.5").encode_queries(texts)` →
    float32 (n, dim), L2-normalised. Construction embeds one probe text: the dimension is learnt
    and a wrong URL, model name, key or certificate fails here, not on the first search."""

    runtime = "remote"
    precision = "remote"
    device = "remote"

    def __init__(
        self,
        url: str,
        *,
        api: EmbedderApi = "openai",
        model: str | None = None,
        api_key: str | None = None,
        query_instruction: str | None = None,
        max_batch_size: int = 32,
        **client_options: Any,
    ) -> None:
        if api not in ("openai", "tei"):
            raise RemoteModelError(f"embedder_api must be 'openai' or 'tei', got {api!r}", setting="embedder_api")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.api: EmbedderApi = api
        self.max_batch_size = max_batch_size
        self._client = RemoteClient(
            url, setting="embedder", key_setting="embedder_api_key", api_key=api_key, **client_options
        )
        self.url = self._client.display_url
        if model is None and api == "openai":
            self.close()
            raise RemoteModelError(
                "embedder_model: the OpenAI embeddings API needs the served model's name (e.g. bge-large-zh-v1.5)",
                setting="embedder_model",
            )
        try:
            self.model: str = model if model is not None else self._tei_model_name()
            # the vector space is the model's, wherever it is served: the URL is not part of the identity
            self.model_id: str = self.model
            self.query_instruction: str = (
                query_instruction_for(self.model) if query_instruction is None else query_instruction
            )
            self.dim: int = 0  # learnt from the probe below
            probe = self._embed_batch([PROBE_TEXT], dim=None)
            self.dim = int(probe.shape[1])
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"RemoteEmbedder({self.model!r}, api={self.api}, url={self.url!r}, dim={self.dim})"

    def close(self) -> None:
        self._client.close()

    def _tei_model_name(self) -> str:
        info = self._client.request("GET", "/info")
        name = info.get("model_id") if isinstance(info, dict) else None
        if not isinstance(name, str) or not name:
            raise RemoteModelError(
                f"embedder_model: {self.url}/info names no model_id; set embedder_model", setting="embedder_model"
            )
        return name

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Queries get the query instruction prepended, as the local embedder does."""
        texts = check_texts(texts, "texts")
        return self._encode([self.query_instruction + t for t in texts])

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Documents are sent as they are, never with the instruction."""
        return self._encode(check_texts(texts, "texts"))

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = [texts[i : i + self.max_batch_size] for i in range(0, len(texts), self.max_batch_size)]
        return np.concatenate(self._client.map(lambda chunk: self._embed_batch(chunk, dim=self.dim), chunks))

    def _embed_batch(self, texts: list[str], *, dim: int | None) -> np.ndarray:
        answer = self._post_openai(texts) if self.api == "openai" else self._post_tei(texts)
        return self._vectors(answer, len(texts), dim)

    def _post_openai(self, texts: list[str]) -> list[Any]:
        try:
            body = self._client.request("POST", "/embeddings", {"model": self.model, "input": texts})
        except RemoteStatusError as err:
            raise self._explain(err, "/embeddings") from None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise self._shape_error("/embeddings", "no 'data' list in the answer")
        if not all(isinstance(item, dict) and isinstance(item.get("index"), int) for item in data):
            raise self._shape_error("/embeddings", "'data' items need an integer 'index'")
        if sorted(item["index"] for item in data) != list(range(len(data))):
            raise self._shape_error("/embeddings", "'data' indices are not 0..n-1")
        return [item.get("embedding") for item in sorted(data, key=lambda item: item["index"])]

    def _post_tei(self, texts: list[str]) -> list[Any]:
        try:
            body = self._client.request("POST", "/embed", {"inputs": texts, "normalize": True, "truncate": True})
        except RemoteStatusError as err:
            raise self._explain(err, "/embed") from None
        if not isinstance(body, list):
            raise self._shape_error("/embed", "the answer is not a list of vectors")
        return body

    def _shape_error(self, path: str, problem: str) -> RemoteModelError:
        return RemoteModelError(
            f"embedder: {self.url}{path} is not an {self.api} embeddings answer ({problem}); check embedder_api",
            setting="embedder",
        )

    def _explain(self, err: RemoteStatusError, path: str) -> RemoteModelError:
        """Tell a wrong model name from a wrong URL: ask the server which models it serves."""
        if self.api == "openai":
            served = served_models(self._client)
            if served is not None and self.model not in served:
                return RemoteModelError(
                    f"embedder_model: {self.model!r} is not served by {self.url} (it serves: {', '.join(served)})",
                    setting="embedder_model",
                )
        if err.status in (404, 405):
            return RemoteModelError(
                f"embedder: {self.url} has no POST {path} route ({err.status}): not an {self.api} embeddings "
                f"server, or the URL's path is wrong (OpenAI-style servers usually live under /v1)",
                setting="embedder",
            )
        return err

    def _vectors(self, rows: list[Any], n: int, dim: int | None) -> np.ndarray:
        where = f"{self.url} ({self.model})"
        if len(rows) != n:
            raise RemoteModelError(f"embedder: {where} returned {len(rows)} vectors for {n} texts", setting="embedder")
        lengths = {len(row) if isinstance(row, list) else -1 for row in rows}
        if -1 in lengths:
            raise RemoteModelError(
                f"embedder: {where} returned a vector that is not a list of numbers", setting="embedder"
            )
        if len(lengths) != 1 or (dim is not None and lengths != {dim}):
            expected = f"{dim}-d, as at startup" if dim is not None else "one length"
            raise RemoteModelError(
                f"embedder: {where} returned vectors of length {sorted(lengths)}, expected {expected}",
                setting="embedder",
            )
        try:
            vectors = np.asarray(rows, dtype=np.float32)
        except (TypeError, ValueError):
            raise RemoteModelError(
                f"embedder: {where} returned non-numeric vector values", setting="embedder"
            ) from None
        if vectors.ndim != 2 or vectors.shape[1] < 1:
            raise RemoteModelError(f"embedder: {where} returned empty vectors", setting="embedder")
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            raise RemoteModelError(
                f"embedder: {where} returned NaN or infinite values (text {int(np.argmax(bad))} of {n})",
                setting="embedder",
            )
        zero = np.linalg.norm(vectors, axis=1) == 0
        if zero.any():
            raise RemoteModelError(
                f"embedder: {where} returned an all-zero vector (text {int(np.argmax(zero))} of {n})",
                setting="embedder",
            )
        return l2_normalize(vectors).astype(np.float32)


def served_models(client: RemoteClient) -> list[str] | None:
    """The model ids an OpenAI-style server lists at GET /models, or None when it lists none."""
    try:
        body = client.request("GET", "/models")
    except RemoteModelError:
        return None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    names = [item.get("id") for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)]
    return names or None


class RemoteReranker:
    """`RemoteReranker(url, api="tei").score(query, docs)` → scores in [0, 1], in the order of docs.

    TEI is asked for raw logits and we apply the sigmoid, as the local reranker does; Cohere-style
    servers (Cohere, Jina, vLLM, infinity) return relevance scores in [0, 1] already."""

    runtime = "remote"
    precision = "remote"
    device = "remote"

    def __init__(
        self,
        url: str,
        *,
        api: RerankerApi = "tei",
        model: str | None = None,
        api_key: str | None = None,
        max_batch_size: int = 32,
        **client_options: Any,
    ) -> None:
        if api not in ("tei", "cohere"):
            raise RemoteModelError(f"reranker_api must be 'tei' or 'cohere', got {api!r}", setting="reranker_api")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.api: RerankerApi = api
        self.model = model
        self.max_batch_size = max_batch_size
        self._client = RemoteClient(
            url, setting="reranker", key_setting="reranker_api_key", api_key=api_key, **client_options
        )
        self.url = self._client.display_url
        self.path = "/rerank" if api == "tei" else "/v1/rerank"
        if model is None and api == "cohere":
            self.close()
            raise RemoteModelError(
                "reranker_model: the Cohere rerank API needs the served model's name", setting="reranker_model"
            )
        self.model_id: str = model or self.url
        try:
            self.score(PROBE_TEXT, [PROBE_TEXT])  # a wrong URL, model, key or certificate fails here
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"RemoteReranker({self.model_id!r}, api={self.api}, url={self.url!r})"

    def close(self) -> None:
        self._client.close()

    def score(self, query: str, docs: Sequence[str]) -> np.ndarray:
        """Scores in [0, 1] per document, float32, in the order of `docs`."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        docs = check_texts(docs, "docs")
        if not docs:
            return np.zeros(0, dtype=np.float32)
        chunks = [docs[i : i + self.max_batch_size] for i in range(0, len(docs), self.max_batch_size)]
        return np.concatenate(self._client.map(lambda chunk: self._score_batch(query, chunk), chunks))

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Scores for (query, doc) pairs of possibly different queries, in input order (the server's
        batching queue hands several searches' pairs at once): the rerank APIs take one query per
        request, so each query's documents go as their own requests, concurrently."""
        by_query: dict[str, list[int]] = {}
        for i, (query, _doc) in enumerate(pairs):
            if not isinstance(query, str):
                raise TypeError(f"query must be a string, got {type(query).__name__}")
            by_query.setdefault(query, []).append(i)
        docs = check_texts([doc for _query, doc in pairs], "docs")
        # one unit per request (a query and at most max_batch_size of its documents), all sent at once
        units = [
            (query, indices[i : i + self.max_batch_size])
            for query, indices in by_query.items()
            for i in range(0, len(indices), self.max_batch_size)
        ]
        scores = self._client.map(lambda unit: self._score_batch(unit[0], [docs[i] for i in unit[1]]), units)
        out = np.zeros(len(pairs), dtype=np.float32)
        for (_query, indices), values in zip(units, scores, strict=True):
            out[indices] = values
        return out

    def rerank(self, query: str, docs: Sequence[str], top_n: int | None = None) -> list[tuple[int, float]]:
        """(index into docs, score), best first; equal scores keep their input order."""
        if top_n is not None and top_n < 0:
            raise ValueError(f"top_n must be >= 0, got {top_n}")
        scores = self.score(query, docs)
        order = np.argsort(-scores, kind="stable")
        if top_n is not None:
            order = order[:top_n]
        return [(int(i), float(scores[i])) for i in order]

    def _score_batch(self, query: str, docs: list[str]) -> np.ndarray:
        if self.api == "tei":
            body: dict[str, Any] = {"query": query, "texts": docs, "raw_scores": True, "truncate": True}
            items_key, score_key = None, "score"
        else:
            body = {"model": self.model, "query": query, "documents": docs, "top_n": len(docs)}
            items_key, score_key = "results", "relevance_score"
        try:
            answer = self._client.request("POST", self.path, body)
        except RemoteStatusError as err:
            raise self._explain(err) from None
        items = answer.get(items_key) if items_key and isinstance(answer, dict) else answer
        if not isinstance(items, list):
            raise self._shape_error(f"no {'results list' if items_key else 'list'} in the answer")
        scores = np.full(len(docs), np.nan, dtype=np.float64)
        for item in items:
            index = item.get("index") if isinstance(item, dict) else None
            value = item.get(score_key) if isinstance(item, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(docs) or not isinstance(value, (int, float)):
                raise self._shape_error(f"an item without a valid 'index' and '{score_key}'")
            if not math.isfinite(value):
                raise RemoteModelError(
                    f"reranker: {self.url} returned a non-finite score for document {index}", setting="reranker"
                )
            scores[index] = value
        if np.isnan(scores).any():
            raise self._shape_error(f"scores for {int((~np.isnan(scores)).sum())} of {len(docs)} documents")
        return sigmoid(scores) if self.api == "tei" else scores.astype(np.float32)

    def _shape_error(self, problem: str) -> RemoteModelError:
        return RemoteModelError(
            f"reranker: {self.url}{self.path} is not a {self.api} rerank answer ({problem}); check reranker_api",
            setting="reranker",
        )

    def _explain(self, err: RemoteStatusError) -> RemoteModelError:
        if self.model is not None and err.status in (400, 404, 422) and self.model in err.detail:
            return RemoteModelError(
                f"reranker_model: {self.url} does not serve {self.model!r} ({err.status}: {err.detail})",
                setting="reranker_model",
            )
        if err.status in (404, 405):
            return RemoteModelError(
                f"reranker: {self.url} has no POST {self.path} route ({err.status}): not a {self.api} rerank server, "
                "or the URL is wrong",
                setting="reranker",
            )
        return err


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def load_remote_embedder(settings: Settings) -> RemoteEmbedder:
    cfg = settings.remote_models
    return RemoteEmbedder(
        settings.embedder,
        api=settings.embedder_api,
        model=settings.embedder_model,
        api_key=_secret(settings.embedder_api_key),
        query_instruction=settings.query_instruction,
        max_batch_size=cfg.max_batch_size,
        **_client_options(cfg),
    )


def load_remote_reranker(settings: Settings) -> RemoteReranker:
    cfg = settings.remote_models
    return RemoteReranker(
        settings.reranker,
        api=settings.reranker_api,
        model=settings.reranker_model,
        api_key=_secret(settings.reranker_api_key),
        max_batch_size=cfg.max_batch_size,
        **_client_options(cfg),
    )
