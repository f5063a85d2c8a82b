"""OpenSearch backend: the Backend Protocol over a versioned index behind read/write aliases.

Request bodies come from `opensearch_bodies` (pure, contract-tested against the API spec). This module
owns the connection, error translation (client errors become `BackendError`, never with secrets),
bulk writes (`streaming_bulk`, 429 retries), the template/pipeline install (`install`), the startup
`check`, and the zero-downtime `reindex` (new index → bulk load → verify → one atomic alias swap).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import opensearchpy
from opensearchpy import helpers

from middleware.backends import opensearch_bodies as bodies
from middleware.backends.base import BackendError, EmbedderBinding, EmbedderMismatch, StoreStats
from middleware.config import FusionSettings, OpenSearchSettings
from middleware.credentials import CredentialsError, resolve_cluster_credentials
from middleware.products import Candidate, Filters, Product, SignalUpdate

if TYPE_CHECKING:
    from middleware.config import Settings

log = logging.getLogger(__name__)

KNN_PLUGIN = "opensearch-knn"
NEURAL_PLUGIN = "opensearch-neural-search"
ANALYZER_PLUGINS = {"smartcn": "analysis-smartcn", "ik_smart": "analysis-ik"}
_PROBE_TEXT = "红色连衣裙 red dress"


# ---------------------------------------------------------------- connection


def redact_url(url: str) -> str:
    """The URL without user:password@ (for messages and logs)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def client_kwargs(cfg: OpenSearchSettings) -> dict[str, Any]:
    """Keyword arguments for the OpenSearch client from the settings (credentials by the one rule)."""
    kwargs: dict[str, Any] = {
        "hosts": list(cfg.url),
        "timeout": cfg.timeout_s,
        "max_retries": cfg.max_retries,
        "retry_on_timeout": cfg.max_retries > 0,
        "verify_certs": cfg.verify_certs,
        "ssl_show_warn": cfg.verify_certs,
        "http_compress": True,
    }
    if cfg.ca_certs:
        kwargs["ca_certs"] = str(cfg.ca_certs)
    try:
        creds = resolve_cluster_credentials(cfg)
    except CredentialsError as err:
        raise BackendError(str(err)) from None
    if creds.username is not None:
        kwargs["http_auth"] = (creds.username, creds.password)
    elif creds.api_key is not None:
        kwargs["headers"] = {"Authorization": f"ApiKey {creds.api_key}"}
    return kwargs


def make_client(cfg: OpenSearchSettings) -> opensearchpy.OpenSearch:
    return opensearchpy.OpenSearch(**client_kwargs(cfg))


def _reason(err: opensearchpy.TransportError) -> str:
    info = err.info if isinstance(err.info, dict) else {}
    error = info.get("error")
    if isinstance(error, dict):
        kind = error.get("type", "")
        reason = error.get("reason", "")
        caused = error.get("caused_by") or {}
        if isinstance(caused, dict) and caused.get("reason"):
            reason = f"{reason} (caused by: {caused['reason']})"
        return f"{kind}: {reason}".strip(": ")
    if isinstance(error, str):
        return error
    return str(err.error)


def is_not_found(err: Exception) -> bool:
    return isinstance(err, opensearchpy.NotFoundError)


@contextlib.contextmanager
def translate_errors(cfg: OpenSearchSettings, action: str) -> Iterator[None]:
    """Client exceptions → BackendError naming the action and the (redacted) hosts."""
    hosts = ", ".join(redact_url(u) for u in cfg.url)
    try:
        yield
    except BackendError:
        raise
    except opensearchpy.ConnectionTimeout:
        raise BackendError(
            f"OpenSearch at {hosts} timed out during {action} (opensearch.timeout_s={cfg.timeout_s})"
        ) from None
    except opensearchpy.SSLError:
        raise BackendError(
            f"TLS error talking to OpenSearch at {hosts} during {action}: check opensearch.ca_certs "
            "(or verify_certs=false for a local test cluster only)"
        ) from None
    except opensearchpy.ConnectionError:
        raise BackendError(
            f"OpenSearch unreachable at {hosts} ({action}): is it running? set SHOPSEARCH_OPENSEARCH__URL"
        ) from None
    except opensearchpy.AuthenticationException:
        raise BackendError(
            f"OpenSearch at {hosts} refused the credentials ({action}): check opensearch.username/password "
            "or opensearch.api_key"
        ) from None
    except opensearchpy.AuthorizationException as err:
        raise BackendError(f"OpenSearch denied {action}: {_reason(err)}") from None
    except opensearchpy.TransportError as err:
        raise BackendError(f"OpenSearch {action} failed ({err.status_code}): {_reason(err)}") from None


# ---------------------------------------------------------------- reports


@dataclass
class BulkReport:
    ok: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    not_found: list[str] = field(default_factory=list)
    results: dict[str, int] = field(default_factory=dict)  # "created"/"updated"/"deleted"/... counts

    def summary(self, limit: int = 5) -> str:
        head = "; ".join(f"{i}: {r}" for i, r in self.errors[:limit])
        more = f" (+{len(self.errors) - limit} more)" if len(self.errors) > limit else ""
        return f"{len(self.errors)} failed: {head}{more}"


@dataclass
class CheckReport:
    lines: list[tuple[str, str]] = field(default_factory=list)  # (status OK|WARN|MISSING|FAIL, text)

    def add(self, status: str, text: str) -> None:
        self.lines.append((status, text))

    @property
    def ok(self) -> bool:
        return not any(s in ("MISSING", "FAIL") for s, _ in self.lines)

    def render(self) -> str:
        return "\n".join(f"{s:7} {t}" for s, t in self.lines)


@dataclass
class ReindexReport:
    new_index: str
    old_indexes: list[str]
    indexed: int
    failed: list[tuple[str, str]]
    count: int
    deleted_old: list[str]
    seconds: float
    aliases: dict[str, list[str]]

    def render(self) -> str:
        kept = [i for i in self.old_indexes if i not in self.deleted_old]
        lines = [
            f"built {self.new_index}: {self.indexed} indexed, {len(self.failed)} failed, "
            f"count verified {self.count} ({self.seconds:.2f} s)",
            "aliases now: " + ", ".join(f"{a} -> {','.join(ix)}" for a, ix in self.aliases.items()),
        ]
        if self.deleted_old:
            lines.append("deleted old: " + ", ".join(self.deleted_old))
        if kept:
            lines.append("kept old: " + ", ".join(kept))
        return "\n".join(lines)


# ---------------------------------------------------------------- hits


def _hits(response: dict[str, Any]) -> list[dict[str, Any]]:
    return response.get("hits", {}).get("hits", [])


def candidates_from_hits(response: dict[str, Any], stage: str) -> list[Candidate]:
    """Hits → Candidates with the stage score and 1-based rank set (`stage`: bm25 | knn | fused)."""
    out: list[Candidate] = []
    for rank, hit in enumerate(_hits(response), start=1):
        product = Product.model_validate(hit["_source"]) if hit.get("_source") else None
        cand = Candidate(id=str(hit["_id"]), product=product)
        setattr(cand, stage, float(hit.get("_score") or 0.0))
        cand.ranks[stage] = rank
        out.append(cand)
    return out


def products_from_mget(response: dict[str, Any]) -> list[Product]:
    return [Product.model_validate(d["_source"]) for d in response.get("docs", []) if d.get("found")]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


_VERSION_RE = re.compile(r"-v(\d+)$")


# ---------------------------------------------------------------- the backend


class OpenSearchBackend:
    """Backend Protocol on OpenSearch. Reads go to the read alias, writes to the write alias."""

    def __init__(
        self,
        client: opensearchpy.OpenSearch,
        cfg: OpenSearchSettings,
        *,
        dim: int | None = None,
        fusion: FusionSettings | None = None,
    ) -> None:
        self.client = client
        self.cfg = cfg
        self.dim = dim
        self.fusion = fusion or FusionSettings()
        self.read_alias = bodies.read_alias(cfg)
        self.write_alias = bodies.write_alias(cfg)
        self._word_analyzer: str | None = None
        self._has_write_alias = False
        self._binding: EmbedderBinding | None = None  # recorded in the first index this backend creates

    @classmethod
    def from_settings(cls, settings: Settings, *, dim: int | None = None) -> OpenSearchBackend:
        cfg = settings.opensearch
        return cls(make_client(cfg), cfg, dim=dim, fusion=settings.fusion)

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        return translate_errors(self.cfg, action)

    # ------------------------------------------------------------ analyzers and templates

    def analyzer_available(self, analyzer: str) -> bool:
        with self._errors("_analyze"):
            try:
                tokens = self.client.indices.analyze(body=bodies.analyze(analyzer, _PROBE_TEXT))
            except opensearchpy.RequestError:
                return False  # "failed to find global analyzer"
        return bool(tokens.get("tokens"))

    @property
    def word_analyzer(self) -> str:
        """The words analyzer: the configured one (verified), or for "auto" the first the cluster has."""
        if self._word_analyzer is None:
            wanted = self.cfg.word_analyzer
            if wanted == "auto":
                self._word_analyzer = next((a for a in bodies.WORD_ANALYZERS if self.analyzer_available(a)), "standard")
            elif self.analyzer_available(wanted):
                self._word_analyzer = wanted
            else:
                plugin = ANALYZER_PLUGINS.get(wanted, wanted)
                raise BackendError(
                    f"word analyzer {wanted!r} is not available on the cluster: install the {plugin} plugin "
                    "or set SHOPSEARCH_OPENSEARCH__WORD_ANALYZER=auto (or standard)"
                )
        return self._word_analyzer

    def plugins(self) -> set[str]:
        with self._errors("_cat/plugins"):
            rows = self.client.cat.plugins(format="json")
        return {row.get("component", "") for row in rows or []}

    def install(self) -> CheckReport:
        """Component + index templates and the search pipeline, idempotently; each verified by GET."""
        report = CheckReport()
        analyzer = self.word_analyzer
        report.add("OK", f"word analyzer: {analyzer} (+ cjk bigram sub-fields)")
        components = bodies.component_templates(self.cfg, self.dim, analyzer)
        with self._errors("install component templates"):
            for name, body in components.items():
                self.client.cluster.put_component_template(name=name, body=body)
                got = self.client.cluster.get_component_template(name=name)["component_templates"][0]
                if got["component_template"].get("version") != bodies.TEMPLATE_VERSION:
                    raise BackendError(f"component template {name} did not read back as installed")
                report.add("OK", f"component template {name}")
        with self._errors("install index template"):
            name = bodies.index_template_name(self.cfg)
            body = bodies.index_template(self.cfg, with_vector=bool(self.dim))
            self.client.indices.put_index_template(name=name, body=body)
            got = self.client.indices.get_index_template(name=name)["index_templates"][0]["index_template"]
            if got.get("composed_of") != body["composed_of"]:
                raise BackendError(f"index template {name} did not read back as installed")
            report.add("OK", f"index template {name} -> {body['index_patterns'][0]}: {', '.join(body['composed_of'])}")
        if not self.dim:
            report.add("WARN", "no vector dimension (embedder disabled): BM25-only mapping, no knn_vector field")
        self._install_pipeline(report)
        return report

    def _install_pipeline(self, report: CheckReport) -> None:
        pipeline = bodies.search_pipeline(self.cfg, self.fusion)
        name = self.cfg.search_pipeline
        try:
            with self._errors(f"install search pipeline {name}"):
                self.client.search_pipeline.put(id=name, body=pipeline)
                got = self.client.search_pipeline.get(id=name)
            if name not in got:
                raise BackendError(f"search pipeline {name} did not read back as installed")
            report.add("OK", f"search pipeline {name} ({self.cfg.hybrid_normalization})")
        except BackendError as err:
            status = "FAIL" if self.cfg.retrieval == "hybrid" else "WARN"
            report.add(status, f"search pipeline {name} not installed ({err}); needed only for retrieval=hybrid")

    # ------------------------------------------------------------ index lifecycle

    def _alias_indexes(self, alias: str) -> list[str]:
        with self._errors(f"get alias {alias}"):
            try:
                return sorted(self.client.indices.get_alias(name=alias).keys())
            except opensearchpy.NotFoundError:
                return []

    def _versioned_indexes(self) -> list[str]:
        with self._errors("list indexes"):
            try:
                names = self.client.indices.get(index=bodies.index_pattern(self.cfg)).keys()
            except opensearchpy.NotFoundError:
                return []
        return sorted((n for n in names if _VERSION_RE.search(n)), key=lambda n: int(_VERSION_RE.search(n)[1]))

    def _next_index(self) -> str:
        versions = [int(_VERSION_RE.search(n)[1]) for n in self._versioned_indexes()]
        return bodies.index_name(self.cfg, max(versions, default=0) + 1)

    def ensure_index(self) -> None:
        """The first write creates `<prefix>-v1` with both aliases if the write alias is missing."""
        if self._has_write_alias:
            return
        if not self._alias_indexes(self.write_alias):
            name = self._next_index()
            body = bodies.create_index(self.cfg, self.dim, self.word_analyzer, aliases=True, embedder=self._binding)
            with self._errors(f"create index {name}"):
                self.client.indices.create(index=name, body=body)
            log.info("created %s with aliases %s, %s", name, self.read_alias, self.write_alias)
        self._has_write_alias = True

    def refresh(self) -> None:
        with self._errors("refresh"), contextlib.suppress(opensearchpy.NotFoundError):
            self.client.indices.refresh(index=self.read_alias)

    # ------------------------------------------------------------ bulk

    def write_bulk(self, pairs: Iterable[bodies.BulkPair], *, refresh: str | None = None) -> BulkReport:
        """Send (action, source) pairs through streaming_bulk (429s retried with backoff); report per item."""
        report = BulkReport()
        params = {}
        refresh = refresh if refresh is not None else self.cfg.write_refresh
        if refresh != "false":
            params["refresh"] = refresh
        with self._errors("_bulk"):
            for ok, item in helpers.streaming_bulk(
                self.client,
                pairs,
                chunk_size=self.cfg.bulk_chunk_size,
                expand_action_callback=lambda pair: pair,
                raise_on_error=False,
                max_retries=self.cfg.bulk_max_retries,
                initial_backoff=self.cfg.bulk_initial_backoff_s,
                **params,
            ):
                ((op, result),) = item.items()
                doc_id = str(result.get("_id"))
                outcome = result.get("result", "error")
                report.results[outcome] = report.results.get(outcome, 0) + 1
                if ok:
                    report.ok += 1
                elif result.get("status") == 404:
                    report.not_found.append(doc_id)
                else:
                    error = result.get("error") or {}
                    reason = error.get("reason", str(error)) if isinstance(error, dict) else str(error)
                    report.errors.append((doc_id, f"{op}: {reason}"))
        return report

    def _check_dim(self, vectors: np.ndarray | None) -> None:
        if vectors is None:
            return
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be 2-D [n, dim], got shape {vectors.shape}")
        if self.dim is None:
            self.dim = int(vectors.shape[1])
        elif vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, the index expects {self.dim}")

    # ------------------------------------------------------------ Backend Protocol: writes

    def upsert(self, products: Sequence[Product], vectors: np.ndarray | None) -> None:
        """Index or replace by id. OpenSearch bulk is per document, not atomic: failed items raise
        BackendError naming them, the others stay written."""
        if not products:
            return
        self._check_dim(vectors)
        self.ensure_index()
        report = self.write_bulk(bodies.bulk_index_actions(self.write_alias, products, vectors, require_alias=True))
        if report.errors:
            raise BackendError(f"upsert: {report.summary()}")

    def delete(self, ids: Sequence[str]) -> int:
        if not ids or not self._alias_indexes(self.write_alias):
            return 0
        report = self.write_bulk(bodies.bulk_delete_actions(self.write_alias, ids))
        if report.errors:
            raise BackendError(f"delete: {report.summary()}")
        return report.results.get("deleted", 0)

    def update_signals(self, updates: Sequence[SignalUpdate]) -> list[str]:
        """Partial `doc` updates (price/sales/stock) in one bulk call; text and vectors untouched."""
        if not updates:
            return []
        if not self._alias_indexes(self.write_alias):
            return [u.id for u in updates]
        report = self.write_bulk(bodies.bulk_update_actions(self.write_alias, updates, require_alias=True))
        if report.errors:
            raise BackendError(f"update_signals: {report.summary()}")
        return report.not_found

    # ------------------------------------------------------------ Backend Protocol: reads

    def _search(self, body: dict[str, Any], action: str, **params: Any) -> dict[str, Any]:
        with self._errors(action):
            try:
                return self.client.search(index=self.read_alias, body=body, params=params or None)
            except opensearchpy.NotFoundError:
                return {}  # no index behind the alias yet: an empty store

    def bm25(self, text: str, filters: Filters | None, n: int) -> list[Candidate]:
        if not text.strip() or n <= 0:
            return []
        return candidates_from_hits(self._search(bodies.bm25_search(text, filters, n), "bm25 search"), "bm25")

    def knn(self, vector: np.ndarray, filters: Filters | None, n: int) -> list[Candidate]:
        if n <= 0:
            return []
        body = bodies.knn_search(vector, filters, n, self.cfg.hnsw_ef_search)
        return candidates_from_hits(self._search(body, "knn search"), "knn")

    @property
    def fuses_server_side(self) -> bool:
        """True when configured for the hybrid query: the pipeline then calls hybrid() (HybridBackend)."""
        return self.cfg.retrieval == "hybrid"

    def hybrid(self, text: str, vector: np.ndarray, filters: Filters | None, n: int) -> list[Candidate]:
        """One hybrid query through the search pipeline; Candidate.fused is the pipeline's score."""
        if n <= 0:
            return []
        body = bodies.hybrid_search(text, vector, filters, n, self.cfg.hnsw_ef_search)
        response = self._search(body, "hybrid search", search_pipeline=self.cfg.search_pipeline)
        return candidates_from_hits(response, "fused")

    def get(self, ids: Sequence[str]) -> list[Product]:
        if not ids:
            return []
        with self._errors("mget"):
            try:
                response = self.client.mget(
                    index=self.read_alias,
                    body=bodies.ids_search(ids),
                    params={"_source_excludes": bodies.VECTOR_FIELD},
                )
            except opensearchpy.NotFoundError:
                return []
        return products_from_mget(response)

    def iter_ids(self, page_size: int = 1000) -> Iterator[str]:
        with self._errors("scan ids"):
            try:
                for hit in helpers.scan(self.client, index=self.read_alias, query=bodies.scan_all(), size=page_size):
                    yield str(hit["_id"])
            except opensearchpy.NotFoundError:
                return

    def content_hashes(self, ids: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for chunk in _chunks(ids, 1000):
            with self._errors("mget content hashes"):
                try:
                    response = self.client.mget(
                        index=self.read_alias,
                        body=bodies.ids_search(chunk),
                        params={"_source_excludes": bodies.VECTOR_FIELD},
                    )
                except opensearchpy.NotFoundError:
                    return {}
            for doc in response.get("docs", []):
                if doc.get("found"):
                    source = doc["_source"]
                    out[str(doc["_id"])] = source.get("content_hash") or Product.model_validate(source).content_hash()
        return out

    def _count(self, body: dict[str, Any] | None = None) -> int:
        with self._errors("count"):
            try:
                return int(self.client.count(index=self.read_alias, body=body)["count"])
            except opensearchpy.NotFoundError:
                return 0

    def count(self) -> int:
        return self._count()

    def _mappings(self, alias: str) -> dict[str, dict[str, Any]]:
        """index name -> its mapping, for the indexes behind `alias` ({} when there are none)."""
        with self._errors(f"get mapping {alias}"):
            try:
                response = self.client.indices.get_mapping(index=alias)
            except opensearchpy.NotFoundError:
                return {}
        return {name: body.get("mappings", {}) for name, body in sorted(response.items())}

    def embedder_binding(self) -> EmbedderBinding | None:
        """The binding recorded in the mapping `_meta` of the index behind the read alias."""
        for name, mapping in self._mappings(self.read_alias).items():
            return _recorded_binding(name, mapping)
        return None

    def bind_embedder(self, binding: EmbedderBinding) -> None:
        """Record the binding in the write index's mapping `_meta` (at creation when there is no index
        yet). A vector dimension the mapping cannot hold is a mismatch even on an empty index: a
        mapping's dimension is fixed, only a reindex changes it."""
        if not isinstance(binding, EmbedderBinding):
            raise TypeError(f"binding must be an EmbedderBinding, got {type(binding).__name__}")
        remedy = "rebuild the index with `shopsearch opensearch reindex`"
        if not self._alias_indexes(self.write_alias):
            if binding.dim is not None:
                self.dim = binding.dim
            self._binding = binding
            self.ensure_index()
        updates: dict[str, dict[str, Any]] = {}
        for name, mapping in self._mappings(self.write_alias).items():
            recorded = _recorded_binding(name, mapping)
            if recorded == binding:
                continue
            where = f"OpenSearch index {name}"
            if recorded is not None and self._index_count(name) > 0:
                raise EmbedderMismatch(where, recorded, binding, remedy)
            mapped_dim = _mapped_dim(mapping)
            if binding.dim is not None and mapped_dim != binding.dim:
                held = f"a mapping for {mapped_dim}-d vectors" if mapped_dim else "a mapping without vectors"
                raise EmbedderMismatch(where, held, binding, remedy)
            updates[name] = bodies.put_mapping_meta(mapping.get("_meta") or {}, binding)
        for name, body in updates.items():
            with self._errors(f"record the embedder in {name}"):
                self.client.indices.put_mapping(index=name, body=body)
        if binding.dim is not None:
            self.dim = binding.dim
        self._binding = binding

    def _index_count(self, index: str) -> int:
        """Documents in `index`, including writes not yet refreshed (a bind must see a fresh load)."""
        with self._errors(f"count {index}"):
            self.client.indices.refresh(index=index)
            return int(self.client.count(index=index)["count"])

    def stats(self) -> StoreStats:
        indexes = self._alias_indexes(self.read_alias)
        size_bytes = 0
        dim: int | None = None
        binding: EmbedderBinding | None = None
        details: dict[str, Any] = {
            "read_alias": self.read_alias,
            "write_alias": self.write_alias,
            "indexes": indexes,
            "retrieval": self.cfg.retrieval,
        }
        if indexes:
            with self._errors("index stats"):
                store = self.client.indices.stats(index=self.read_alias, metric="store")
                size_bytes = int(store["_all"]["total"]["store"]["size_in_bytes"])
            for name, mapping in self._mappings(self.read_alias).items():
                dim = _mapped_dim(mapping) or dim
                binding = binding or _recorded_binding(name, mapping)
                title = mapping.get("properties", {}).get("title", {})
                details["word_analyzer"] = title.get("analyzer", "standard")
        return StoreStats(
            backend="opensearch",
            products=self._count(),
            vectors=self._count(bodies.exists_query(bodies.VECTOR_FIELD)),
            dim=dim,
            size_bytes=size_bytes,
            embedder=binding,
            generation=None,
            details=details,
        )

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------ startup check

    def check(self) -> CheckReport:
        """What the cluster has and lacks for this configuration, in plain words."""
        report = CheckReport()
        with self._errors("cluster info"):
            info = self.client.info()
        version = info.get("version", {}).get("number", "?")
        report.add("OK", f"OpenSearch {version} at {', '.join(redact_url(u) for u in self.cfg.url)}")
        plugins = self.plugins()
        if KNN_PLUGIN in plugins:
            report.add("OK", f"k-NN plugin ({KNN_PLUGIN})")
        elif self.dim:
            report.add(
                "MISSING",
                f"k-NN plugin ({KNN_PLUGIN}): vector retrieval will fail; "
                "install it or set SHOPSEARCH_EMBEDDER=none for BM25 only",
            )
        else:
            report.add("WARN", f"k-NN plugin ({KNN_PLUGIN}) not installed (not needed: embedder disabled)")
        if NEURAL_PLUGIN in plugins:
            report.add("OK", f"neural-search plugin ({NEURAL_PLUGIN}): hybrid query and search pipelines")
        elif self.cfg.retrieval == "hybrid":
            report.add(
                "MISSING",
                f"neural-search plugin ({NEURAL_PLUGIN}): retrieval=hybrid needs it; "
                "install it or set SHOPSEARCH_OPENSEARCH__RETRIEVAL=client",
            )
        else:
            report.add("WARN", f"neural-search plugin ({NEURAL_PLUGIN}) not installed: only retrieval=client works")
        try:
            report.add("OK", f"word analyzer: {self.word_analyzer}")
        except BackendError as err:
            report.add("FAIL", str(err))
        for alias in (self.read_alias, self.write_alias):
            indexes = self._alias_indexes(alias)
            if indexes:
                report.add("OK", f"alias {alias} -> {', '.join(indexes)}")
            else:
                report.add("WARN", f"alias {alias} missing: run `shopsearch opensearch reindex FILE` (or index)")
        report.add("OK", f"products: {self.count()}")
        return report

    # ------------------------------------------------------------ zero-downtime rebuild

    def reindex(
        self,
        items: Iterable[tuple[Product, np.ndarray | None]],
        *,
        keep_old: bool = False,
        max_failures: int = 0,
        batch_size: int = 500,
        progress: Callable[[str], None] | None = None,
        embedder: EmbedderBinding | None = None,
    ) -> ReindexReport:
        """Build a new versioned index from a catalog and swap both aliases to it atomically.

        Bulk-load settings (no refresh, no replicas) are restored before the swap; the count is
        verified first. On too many failed documents or a count mismatch, nothing is swapped and the
        new index is left for inspection. Writes sent to the write alias during the build land in the
        old index (they are not carried over). `embedder` is recorded in the new index's mapping.
        """
        say = progress or (lambda _msg: None)
        started = time.perf_counter()
        old_read = self._alias_indexes(self.read_alias)
        old_write = self._alias_indexes(self.write_alias)
        new_index = self._next_index()
        # the first batch fixes the vector dimension when none was given
        batches = _chunks(items, batch_size)
        first = next(batches, [])
        first_vectors = _stack([v for _, v in first])
        self._check_dim(first_vectors)
        body = bodies.create_index(self.cfg, self.dim, self.word_analyzer, bulk_load=True, embedder=embedder)
        with self._errors(f"create index {new_index}"):
            self.client.indices.create(index=new_index, body=body)
        say(f"created {new_index} (refresh_interval=-1, replicas=0); aliases still on {old_read or 'nothing'}")

        def pairs() -> Iterator[bodies.BulkPair]:
            for batch in _prepend(first, batches):
                products = [p for p, _ in batch]
                vectors = _stack([v for _, v in batch])
                self._check_dim(vectors)
                yield from bodies.bulk_index_actions(new_index, products, vectors, require_alias=False)

        report = self.write_bulk(pairs(), refresh="false")
        say(f"bulk loaded {report.ok} documents, {len(report.errors)} failed")
        with self._errors(f"restore settings on {new_index}"):
            self.client.indices.put_settings(index=new_index, body=bodies.restore_settings(self.cfg))
            self.client.indices.refresh(index=new_index)
            count = int(self.client.count(index=new_index)["count"])
        if len(report.errors) > max_failures:
            raise BackendError(f"reindex into {new_index} aborted, aliases unchanged: {report.summary()}")
        if count != report.ok:
            raise BackendError(
                f"reindex into {new_index} aborted, aliases unchanged: count {count} != {report.ok} indexed"
            )
        swap = bodies.alias_swap(self.read_alias, self.write_alias, new_index, old_read=old_read, old_write=old_write)
        with self._errors("swap aliases"):
            self.client.indices.update_aliases(body=swap)
        self._has_write_alias = True
        self._binding = embedder
        say(f"swapped {self.read_alias} and {self.write_alias} to {new_index} in one _aliases call")
        old = sorted(set(old_read) | set(old_write))
        deleted: list[str] = []
        if not keep_old and old:
            with self._errors("delete old indexes"):
                self.client.indices.delete(index=",".join(old))
            deleted = old
        return ReindexReport(
            new_index=new_index,
            old_indexes=old,
            indexed=report.ok,
            failed=report.errors,
            count=count,
            deleted_old=deleted,
            seconds=time.perf_counter() - started,
            aliases={a: self._alias_indexes(a) for a in (self.read_alias, self.write_alias)},
        )


def _mapped_dim(mapping: dict[str, Any]) -> int | None:
    vector = mapping.get("properties", {}).get(bodies.VECTOR_FIELD)
    return int(vector["dimension"]) if vector and vector.get("dimension") else None


def _recorded_binding(index: str, mapping: dict[str, Any]) -> EmbedderBinding | None:
    recorded = (mapping.get("_meta") or {}).get(bodies.EMBEDDER_META_KEY)
    if recorded is None:
        return None
    try:
        return EmbedderBinding(recorded["embedder"], recorded["dim"])
    except (KeyError, TypeError, ValueError) as err:
        raise BackendError(
            f"OpenSearch index {index}: mapping _meta.{bodies.EMBEDDER_META_KEY} is not a shopsearch "
            f"embedder record ({err}): rebuild with `shopsearch opensearch reindex`"
        ) from None


def _stack(vectors: Sequence[np.ndarray | None]) -> np.ndarray | None:
    if not vectors or any(v is None for v in vectors):
        if any(v is not None for v in vectors):
            raise ValueError("either every product in a batch has a vector or none has")
        return None
    return np.vstack([np.asarray(v, dtype=np.float32).reshape(1, -1) for v in vectors])


def _prepend(first: list[Any], rest: Iterator[list[Any]]) -> Iterator[list[Any]]:
    if first:
        yield first
    yield from rest


# ---------------------------------------------------------------- async (for the server)


class AsyncOpenSearchBackend:
    """The read path on AsyncOpenSearch (bm25, knn, hybrid, get, count), same bodies as the sync one."""

    def __init__(self, client: Any, cfg: OpenSearchSettings) -> None:
        self.client = client
        self.cfg = cfg
        self.read_alias = bodies.read_alias(cfg)

    @classmethod
    def from_settings(cls, settings: Settings) -> AsyncOpenSearchBackend:
        try:
            client = opensearchpy.AsyncOpenSearch(**client_kwargs(settings.opensearch))
        except opensearchpy.ImproperlyConfigured as err:  # aiohttp missing
            raise BackendError(f"async OpenSearch client unavailable: {err}") from None
        return cls(client, settings.opensearch)

    async def _search(self, body: dict[str, Any], action: str, **params: Any) -> dict[str, Any]:
        with translate_errors(self.cfg, action):
            try:
                return await self.client.search(index=self.read_alias, body=body, params=params or None)
            except opensearchpy.NotFoundError:
                return {}

    async def bm25(self, text: str, filters: Filters | None, n: int) -> list[Candidate]:
        if not text.strip() or n <= 0:
            return []
        response = await self._search(bodies.bm25_search(text, filters, n), "bm25 search")
        return candidates_from_hits(response, "bm25")

    async def knn(self, vector: np.ndarray, filters: Filters | None, n: int) -> list[Candidate]:
        if n <= 0:
            return []
        body = bodies.knn_search(vector, filters, n, self.cfg.hnsw_ef_search)
        return candidates_from_hits(await self._search(body, "knn search"), "knn")

    async def hybrid(self, text: str, vector: np.ndarray, filters: Filters | None, n: int) -> list[Candidate]:
        if n <= 0:
            return []
        body = bodies.hybrid_search(text, vector, filters, n, self.cfg.hnsw_ef_search)
        response = await self._search(body, "hybrid search", search_pipeline=self.cfg.search_pipeline)
        return candidates_from_hits(response, "fused")

    async def get(self, ids: Sequence[str]) -> list[Product]:
        if not ids:
            return []
        with translate_errors(self.cfg, "mget"):
            try:
                response = await self.client.mget(
                    index=self.read_alias,
                    body=bodies.ids_search(ids),
                    params={"_source_excludes": bodies.VECTOR_FIELD},
                )
            except opensearchpy.NotFoundError:
                return []
        return products_from_mget(response)

    async def count(self) -> int:
        with translate_errors(self.cfg, "count"):
            try:
                return int((await self.client.count(index=self.read_alias))["count"])
            except opensearchpy.NotFoundError:
                return 0

    async def close(self) -> None:
        await self.client.close()
