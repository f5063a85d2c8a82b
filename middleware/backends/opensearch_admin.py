"""OpenSearch cluster administration: install the templates and pipeline, check the cluster, rebuild.

The zero-downtime rebuild is a sequence of cluster steps around one loading step, which the caller
supplies (`rebuild(backend, load, ...)`): create the next versioned index with bulk-load settings →
`load(target)` writes into it through an `IndexLoader` → restore the settings and verify the count →
swap both aliases in one `_aliases` call → delete the old indexes. `reindex` is that rebuild fed
from an iterable of (product, vector) pairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from middleware.backends import opensearch_bodies as bodies
from middleware.backends.base import BackendError, EmbedderBinding
from middleware.backends.opensearch import BulkReport, OpenSearchBackend
from middleware.backends.opensearch_client import redact_url, translate_errors
from middleware.products import Product

KNN_PLUGIN = "opensearch-knn"
NEURAL_PLUGIN = "opensearch-neural-search"


# ---------------------------------------------------------------- reports


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


# ---------------------------------------------------------------- install and check


def install(backend: OpenSearchBackend) -> CheckReport:
    """Component + index templates and the search pipeline, idempotently; each verified by GET."""
    cfg, client = backend.cfg, backend.client
    report = CheckReport()
    analyzer = backend.word_analyzer
    report.add("OK", f"word analyzer: {analyzer} (+ cjk bigram sub-fields)")
    components = bodies.component_templates(cfg, backend.dim, analyzer)
    with translate_errors(cfg, "install component templates"):
        for name, body in components.items():
            client.cluster.put_component_template(name=name, body=body)
            got = client.cluster.get_component_template(name=name)["component_templates"][0]
            if got["component_template"].get("version") != bodies.TEMPLATE_VERSION:
                raise BackendError(f"component template {name} did not read back as installed")
            report.add("OK", f"component template {name}")
    with translate_errors(cfg, "install index template"):
        name = bodies.index_template_name(cfg)
        body = bodies.index_template(cfg, with_vector=bool(backend.dim))
        client.indices.put_index_template(name=name, body=body)
        got = client.indices.get_index_template(name=name)["index_templates"][0]["index_template"]
        if got.get("composed_of") != body["composed_of"]:
            raise BackendError(f"index template {name} did not read back as installed")
        report.add("OK", f"index template {name} -> {body['index_patterns'][0]}: {', '.join(body['composed_of'])}")
    if not backend.dim:
        report.add("WARN", "no vector dimension (embedder disabled): BM25-only mapping, no knn_vector field")
    _install_pipeline(backend, report)
    return report


def _install_pipeline(backend: OpenSearchBackend, report: CheckReport) -> None:
    cfg = backend.cfg
    pipeline = bodies.search_pipeline(cfg, backend.fusion)
    name = cfg.search_pipeline
    try:
        with translate_errors(cfg, f"install search pipeline {name}"):
            backend.client.search_pipeline.put(id=name, body=pipeline)
            got = backend.client.search_pipeline.get(id=name)
        if name not in got:
            raise BackendError(f"search pipeline {name} did not read back as installed")
        report.add("OK", f"search pipeline {name} ({cfg.hybrid_normalization})")
    except BackendError as err:
        status = "FAIL" if cfg.retrieval == "hybrid" else "WARN"
        report.add(status, f"search pipeline {name} not installed ({err}); needed only for retrieval=hybrid")


def plugins(backend: OpenSearchBackend) -> set[str]:
    with translate_errors(backend.cfg, "_cat/plugins"):
        rows = backend.client.cat.plugins(format="json")
    return {row.get("component", "") for row in rows or []}


def check(backend: OpenSearchBackend) -> CheckReport:
    """What the cluster has and lacks for this configuration, in plain words."""
    cfg = backend.cfg
    report = CheckReport()
    with translate_errors(cfg, "cluster info"):
        info = backend.client.info()
    version = info.get("version", {}).get("number", "?")
    report.add("OK", f"OpenSearch {version} at {', '.join(redact_url(u) for u in cfg.url)}")
    installed = plugins(backend)
    if KNN_PLUGIN in installed:
        report.add("OK", f"k-NN plugin ({KNN_PLUGIN})")
    elif backend.dim:
        report.add(
            "MISSING",
            f"k-NN plugin ({KNN_PLUGIN}): vector retrieval will fail; "
            "install it or set SHOPSEARCH_EMBEDDER=none for BM25 only",
        )
    else:
        report.add("WARN", f"k-NN plugin ({KNN_PLUGIN}) not installed (not needed: embedder disabled)")
    if NEURAL_PLUGIN in installed:
        report.add("OK", f"neural-search plugin ({NEURAL_PLUGIN}): hybrid query and search pipelines")
    elif cfg.retrieval == "hybrid":
        report.add(
            "MISSING",
            f"neural-search plugin ({NEURAL_PLUGIN}): retrieval=hybrid needs it; "
            "install it or set SHOPSEARCH_OPENSEARCH__RETRIEVAL=client",
        )
    else:
        report.add("WARN", f"neural-search plugin ({NEURAL_PLUGIN}) not installed: only retrieval=client works")
    try:
        report.add("OK", f"word analyzer: {backend.word_analyzer}")
    except BackendError as err:
        report.add("FAIL", str(err))
    for alias in (backend.read_alias, backend.write_alias):
        indexes = backend.alias_indexes(alias)
        if indexes:
            report.add("OK", f"alias {alias} -> {', '.join(indexes)}")
        else:
            report.add("WARN", f"alias {alias} missing: run `shopsearch opensearch reindex FILE` (or index)")
    report.add("OK", f"products: {backend.count()}")
    return report


# ---------------------------------------------------------------- zero-downtime rebuild


class IndexLoader:
    """The load target of a rebuild: writes straight into the new index (not through the aliases, no
    refresh), collecting every item's outcome in `report` instead of raising on failed documents."""

    def __init__(self, backend: OpenSearchBackend, index: str) -> None:
        self.backend = backend
        self.index = index
        self.report = BulkReport()

    def upsert(self, products: Sequence[Product], vectors: np.ndarray | None) -> None:
        """Index a batch; vectors: float32 [len(products), dim] of the index's dimension, or None."""
        if not products:
            return
        self.backend.check_dim(vectors)
        pairs = bodies.bulk_index_actions(self.index, products, vectors, require_alias=False)
        self.report.merge(self.backend.write_bulk(pairs, refresh="false"))


def create_next_index(backend: OpenSearchBackend, *, embedder: EmbedderBinding | None = None) -> str:
    """Create `<prefix>-v<N+1>` with bulk-load settings (no refresh, no replicas); no alias points to it."""
    new_index = backend.next_index()
    body = bodies.create_index(backend.cfg, backend.dim, backend.word_analyzer, bulk_load=True, embedder=embedder)
    with translate_errors(backend.cfg, f"create index {new_index}"):
        backend.client.indices.create(index=new_index, body=body)
    return new_index


def finish_load(backend: OpenSearchBackend, index: str) -> int:
    """Restore the serving settings on a bulk-loaded index, refresh it, and return its document count."""
    with translate_errors(backend.cfg, f"restore settings on {index}"):
        backend.client.indices.put_settings(index=index, body=bodies.restore_settings(backend.cfg))
        backend.client.indices.refresh(index=index)
        return int(backend.client.count(index=index)["count"])


def swap_aliases(backend: OpenSearchBackend, new_index: str, old_read: list[str], old_write: list[str]) -> None:
    """Point the read and write aliases at `new_index` in one atomic `_aliases` call."""
    swap = bodies.alias_swap(backend.read_alias, backend.write_alias, new_index, old_read=old_read, old_write=old_write)
    with translate_errors(backend.cfg, "swap aliases"):
        backend.client.indices.update_aliases(body=swap)


def rebuild(
    backend: OpenSearchBackend,
    load: Callable[[IndexLoader], None],
    *,
    keep_old: bool = False,
    max_failures: int = 0,
    progress: Callable[[str], None] | None = None,
    embedder: EmbedderBinding | None = None,
) -> ReindexReport:
    """Build a new versioned index with `load` and swap both aliases to it atomically.

    The index is created with `backend.dim` (set it first). Bulk-load settings (no refresh, no
    replicas) are restored before the swap; the count is verified first. On too many failed
    documents or a count mismatch, nothing is swapped and the new index is left for inspection.
    Writes sent to the write alias during the build land in the old index (they are not carried
    over). `embedder` is recorded in the new index's mapping.
    """
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    old_read = backend.alias_indexes(backend.read_alias)
    old_write = backend.alias_indexes(backend.write_alias)
    new_index = create_next_index(backend, embedder=embedder)
    say(f"created {new_index} (refresh_interval=-1, replicas=0); aliases still on {old_read or 'nothing'}")
    target = IndexLoader(backend, new_index)
    load(target)
    report = target.report
    say(f"bulk loaded {report.ok} documents, {len(report.errors)} failed")
    count = finish_load(backend, new_index)
    if len(report.errors) > max_failures:
        raise BackendError(f"reindex into {new_index} aborted, aliases unchanged: {report.summary()}")
    if count != report.ok:
        raise BackendError(f"reindex into {new_index} aborted, aliases unchanged: count {count} != {report.ok} indexed")
    swap_aliases(backend, new_index, old_read, old_write)
    backend.swapped_to(embedder)
    say(f"swapped {backend.read_alias} and {backend.write_alias} to {new_index} in one _aliases call")
    old = sorted(set(old_read) | set(old_write))
    deleted: list[str] = []
    if not keep_old and old:
        with translate_errors(backend.cfg, "delete old indexes"):
            backend.client.indices.delete(index=",".join(old))
        deleted = old
    return ReindexReport(
        new_index=new_index,
        old_indexes=old,
        indexed=report.ok,
        failed=report.errors,
        count=count,
        deleted_old=deleted,
        seconds=time.perf_counter() - started,
        aliases={a: backend.alias_indexes(a) for a in (backend.read_alias, backend.write_alias)},
    )


def reindex(
    backend: OpenSearchBackend,
    items: Iterable[tuple[Product, np.ndarray | None]],
    *,
    keep_old: bool = False,
    max_failures: int = 0,
    batch_size: int = 500,
    progress: Callable[[str], None] | None = None,
    embedder: EmbedderBinding | None = None,
) -> ReindexReport:
    """`rebuild` from (product, vector) pairs, in batches; the first batch fixes the vector dimension
    when the backend has none (every product of a batch has a vector, or none has)."""
    batches = _chunks(items, batch_size)
    first = next(batches, [])
    backend.check_dim(_stack([v for _, v in first]))  # before the index is created with that dimension

    def load(target: IndexLoader) -> None:
        for batch in _prepend(first, batches):
            target.upsert([p for p, _ in batch], _stack([v for _, v in batch]))

    return rebuild(backend, load, keep_old=keep_old, max_failures=max_failures, progress=progress, embedder=embedder)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


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
