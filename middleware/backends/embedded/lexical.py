"""The embedded store's lexical index: BM25 in a tantivy index derived from the SQLite store.

SQLite stays the source of truth. Inside each write transaction the backend records, per product
pk, the analysed tokens (`product_text`, one space-joined string per lexical field of
`middleware.text`) and a row of `lexical_changes` (pk, lexical generation). The tantivy index in
`<data_dir>/lexical/` is derived from them, like `vectors.faiss`:

- it is stamped (`lexical/STAMP`) with the lexical generation and analysis version it reflects;
- it catches up by re-syncing every pk changed since its stamp: delete the pk's document, add what
  SQLite holds for it now. Re-syncing is idempotent, so a crash between SQLite's commit and
  tantivy's only means syncing again on the next open;
- it is rebuilt from SQLite when missing, unreadable, of another analysis version or schema, or
  stamped before the oldest change still logged.

One writer at a time: the process holding `lexical/writer.lock` (an flock, released by the kernel
when the process dies) owns tantivy's IndexWriter. It applies its own writes before they return
(except during a force merge, which applies them when it ends), and other processes' writes within
`poll_interval_s` (a background thread polls the store's lexical generation). Every process
searches; a process that does not own the writer reloads its reader when the stamp moves, and takes
the writer over when its owner is gone. A force merge asked in such a process is handed to the owner
(`MergeHandoff`), whose poller runs it.

Commits are coalesced: a tantivy commit fsyncs, a fixed cost per commit that would dominate bulk
loads. Applied changes are committed when the writes pause (`idle_commit_s`, longer than the gap
between a bulk load's batches), at the latest `max_commit_delay_s` after the first one (which bounds
how late other processes see a write), and at once before this process searches, so a process always
finds its own writes. Caveat: the first search after a write pays for that commit.

Bulk loads (`bulk`) commit at most every `bulk_commit_s`, and a search does not commit first:
every commit adds a segment, tantivy merges only runs of same-sized ones, and each segment of a
search is scored on its own (block-max WAND's threshold starts afresh per segment), so a load
committed every second leaves many segments and slower queries. Caveat: during a bulk load the
loaded products become searchable up to `bulk_commit_s` late, in this process too.

Queries are built from tokens (term queries), never parsed: user text cannot become query syntax.
Filters are non-scoring clauses inside the same query, so BM25 top-n is over the filtered set.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic_core
import tantivy

from middleware import text as analysis
from middleware.products import Filters, Product

log = logging.getLogger(__name__)

# Hostile or pasted-document queries: bound the tokens per field (the server truncates long text anyway).
MAX_QUERY_TOKENS = 512
INDEX_DIR = "lexical"
STAMP_NAME = "STAMP"
MERGE_HANDOFF_DIR = "lexical-merge"  # force merges asked of the writer's owner by other processes
MERGE_TAKE_S = 10.0  # how long a process without the writer waits for the owner to start its merge
_ANSWERS_KEPT_S = 24 * 3600.0  # answers nobody collected (their asker died) are swept after this
SUGGEST_FIELD = "suggest"  # title words as typed (text.suggest_terms): completions and typo corrections
KEY_SEPARATOR = "\x00"  # brand_key / category_key terms: casefolded value, separator, the value as stored
SCHEMA_REVISION = 3  # of the tantivy schema below; a change rebuilds the index
_ADD_BATCH = 2000  # pks re-synced per SQLite read
# The writer's heap while merging: a segment is flushed when it fills, so it bounds the segments a
# merge leaves. A budget, allocated as used; tantivy's limit is 4 GB per indexing thread.
MERGE_HEAP_BYTES = 1_000_000_000
# post-filtering (see TantivyLexicalIndex.top): only for filters at least this share of products pass
POST_FILTER_MIN_SHARE = 0.3
POST_FILTER_MARGIN = 1.5  # collect this many times the hits the filter's share predicts, plus a few
_SHARE_TTL_S = 30.0  # a filter's share of the products is an estimate: counted again after this long
_SHARES_KEPT = 256
_PREFIX_TERMS_KEPT = 64  # (field, first letter) term lists: a few MB at most


class LexicalWriterBusy(RuntimeError):
    """Another process holds the lexical index's writer."""


SCHEMA = """
CREATE TABLE IF NOT EXISTS product_text (
    pk INTEGER PRIMARY KEY,
    analysis INTEGER NOT NULL,
    fields TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lexical_changes (
    generation INTEGER NOT NULL,
    pk INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS lexical_changes_generation ON lexical_changes (generation);
-- the stale-analysis check on open reads this index, not the token rows
CREATE INDEX IF NOT EXISTS product_text_analysis ON product_text (analysis);
"""

# the SQLite FTS5 lexical index of earlier stores: dropped on open, the tantivy index is built instead
_LEGACY_FTS5 = """
DROP TRIGGER IF EXISTS product_text_ai;
DROP TRIGGER IF EXISTS product_text_ad;
DROP TRIGGER IF EXISTS product_text_au;
DROP TABLE IF EXISTS fts_words;
DROP TABLE IF EXISTS fts_cjk;
DROP TABLE IF EXISTS product_text;
"""


def migrate(conn: sqlite3.Connection) -> bool:
    """Drop an FTS5-era lexical index (its tokens are of another analysis); True when one was there."""
    legacy = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'fts_words'").fetchone() is not None
    if legacy:
        conn.executescript(_LEGACY_FTS5)
    return legacy


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    builder.add_unsigned_field("pk", stored=True, indexed=True, fast=True)
    for name in (*analysis.LEXICAL_FIELDS, SUGGEST_FIELD):
        builder.add_text_field(name, stored=False, tokenizer_name="whitespace")
    # case-insensitive prefixes of whole brand and category values, shown as stored
    builder.add_text_field("brand_key", stored=False, tokenizer_name="raw")
    builder.add_text_field("category_key", stored=False, tokenizer_name="raw")
    # filter and facet fields: exact values ("raw"), fast for aggregations
    builder.add_text_field("id", stored=False, tokenizer_name="raw")
    builder.add_text_field("brand", stored=False, fast=True, tokenizer_name="raw")
    builder.add_text_field("category", stored=False, fast=True, tokenizer_name="raw")
    builder.add_float_field("price", stored=False, indexed=True, fast=True)
    builder.add_unsigned_field("in_stock", stored=False, indexed=True, fast=True)
    builder.add_unsigned_field("sales", stored=False, indexed=False, fast=True)
    builder.add_unsigned_field("stock", stored=False, indexed=False, fast=True)  # absent: not tracked
    return builder.build()


@dataclass(slots=True)  # not frozen: a frozen dataclass sets each field through object.__setattr__
class TextRow:
    """What the tantivy document of one product is made of (tokens from product_text, the rest from products)."""

    pk: int
    fields: dict[str, str]
    id: str
    brand: str | None
    categories: list[str]
    price: float | None
    in_stock: bool
    sales: int = 0
    stock: int | None = None


def tokens_json(product: Product) -> str:
    """The product's analysed tokens as stored in product_text (the slow part of a write: jieba)."""
    return _tokens_json(product.title, product.search_text())


def _tokens_json(title: str, body: str) -> str:
    tokens, suggest = analysis.analyze_product_suggest(title, body)
    fields = {f: " ".join(tokens[f]) for f in analysis.LEXICAL_FIELDS}
    fields[SUGGEST_FIELD] = " ".join(suggest)
    return json.dumps(fields, ensure_ascii=False)


def analyse_texts(texts: Sequence[tuple[str, str]]) -> list[str]:
    """`tokens_json` of (title, body) pairs."""
    return [_tokens_json(title, body) for title, body in texts]


class ParallelAnalysis:
    """Analysis of large batches in worker processes: jieba is pure Python, so threads cannot share it
    out, and a bulk load without an embedder is bound by it. The workers are plain subprocesses
    (`analysis_worker`), not multiprocessing ones: those would fork this threaded process or re-run the
    caller's `__main__`. They start on first use and live until `close`; any failure falls back to
    analysing in this process."""

    def __init__(self, workers: int, min_batch: int = 256) -> None:
        self.workers = workers
        self.min_batch = min_batch
        self._procs: list[subprocess.Popen[str]] = []
        self._lock = threading.Lock()

    def tokens(self, products: Sequence[Product]) -> list[str]:
        """tokens_json of each product, in order."""
        texts = [(p.title, p.search_text()) for p in products]
        if self.workers < 1 or len(texts) < self.min_batch:
            return analyse_texts(texts)
        with self._lock:
            try:
                procs = self._ensure_workers()
                size = -(-len(texts) // len(procs))
                chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
                for proc, chunk in zip(procs, chunks, strict=False):  # every worker reads its input whole first
                    assert proc.stdin is not None
                    proc.stdin.write(json.dumps(chunk, ensure_ascii=False) + "\n")
                    proc.stdin.flush()
                out: list[str] = []
                for proc, chunk in zip(procs, chunks, strict=False):
                    assert proc.stdout is not None
                    readline = proc.stdout.readline
                    part = [readline() for _ in chunk]
                    if not all(line.startswith("{") and line.endswith("}\n") for line in part):
                        raise OSError(f"analysis worker {proc.pid} stopped or answered out of protocol")
                    out.extend(line[:-1] for line in part)
                return out
            except (OSError, ValueError) as exc:
                log.warning("parallel analysis unavailable (%s); analysing in this process", exc)
                self._stop()
                self.workers = 0
        return analyse_texts(texts)

    def _ensure_workers(self) -> list[subprocess.Popen[str]]:
        if not self._procs:
            package_root = str(Path(__file__).resolve().parents[3])  # this tree, wherever it is imported from
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
            }
            for _ in range(self.workers):
                self._procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "middleware.backends.embedded.analysis_worker"],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                        encoding="utf-8",
                        env=env,
                    )
                )
        return self._procs

    def _stop(self) -> None:
        for proc in self._procs:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs = []

    def close(self) -> None:
        with self._lock:
            self._stop()


def value_key(value: str) -> str:
    """The brand_key / category_key term of a value: its prefix-matchable form, then the value itself."""
    return analysis.normalize(value).casefold() + KEY_SEPARATOR + value


class _Stamp:
    """`lexical/STAMP`: the lexical generation, analysis version and schema revision the index reflects."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> tuple[int, int, int] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return int(data["generation"]), int(data["analysis"]), int(data["schema"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, generation: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        payload = {"generation": generation, "analysis": analysis.ANALYSIS_VERSION, "schema": SCHEMA_REVISION}
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def mtime_ns(self) -> int:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return -1


class MergeHandoff:
    """Force merges asked of the process owning the writer by processes that do not own it, through files
    in `<data_dir>/lexical-merge/`: an asker writes `pending/<id>`; the owner moves it to `taken/<id>`
    when its merge starts and answers in `done/<id>.json` (segments before and after, or the error).
    Files beside the store, not rows in it: a request is not catalog data, and the owner's poll then costs
    a directory listing. Caveat: a request whose asker died before the owner took it is still merged once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pending, self.taken, self.done = root / "pending", root / "taken", root / "done"

    def ask(self) -> str:
        request = f"{os.getpid()}-{uuid.uuid4().hex}"
        for folder in (self.pending, self.taken, self.done):
            folder.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{request}.tmp"
        tmp.write_bytes(b"")
        os.replace(tmp, self.pending / request)  # whole or absent: the owner never sees half a request
        return request

    def withdraw(self, request: str) -> bool:
        """Take back a request the owner has not taken; False when it already has."""
        try:
            (self.pending / request).unlink()
            return True
        except FileNotFoundError:
            return False

    def collect(self, request: str) -> dict[str, Any] | None:
        """The owner's answer to `request` (removed once read), or None while there is none."""
        path = self.done / f"{request}.json"
        try:
            answer = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        path.unlink(missing_ok=True)
        return answer if isinstance(answer, dict) else {"error": f"unreadable answer {answer!r}"}

    def take(self) -> list[str]:
        """(The owner, between its merges.) Every request not yet answered: the pending ones, and those
        a previous owner took but did not answer (it died merging)."""
        try:
            pending = [entry.name for entry in os.scandir(self.pending)]
        except FileNotFoundError:
            return []
        stale = [entry.name for entry in os.scandir(self.taken)] if self.taken.exists() else []
        taken = list(stale)
        for request in pending:
            try:
                os.replace(self.pending / request, self.taken / request)
                taken.append(request)
            except FileNotFoundError:  # withdrawn meanwhile
                pass
        if taken:
            self._sweep()
        return taken

    def answer(self, requests: Sequence[str], answer: dict[str, Any]) -> None:
        for request in requests:
            tmp = self.done / f".{request}.tmp"
            tmp.write_text(json.dumps(answer), encoding="utf-8")
            os.replace(tmp, self.done / f"{request}.json")
            (self.taken / request).unlink(missing_ok=True)

    def _sweep(self) -> None:
        cutoff = time.time() - _ANSWERS_KEPT_S
        for entry in os.scandir(self.done):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)


class TantivyLexicalIndex:
    """BM25 over the lexical fields of `middleware.text`, boosted per field, filters inside the query."""

    schema = SCHEMA

    def __init__(
        self,
        data_dir: Path,
        reader: Callable[[], contextlib.AbstractContextManager[sqlite3.Connection]],
        *,
        poll_interval_s: float = 0.05,
        idle_commit_s: float = 0.3,
        max_commit_delay_s: float = 0.8,
        bulk_commit_s: float = 60.0,
        writer_heap_bytes: int = 64_000_000,
        writer_threads: int = 1,
        field_boosts: dict[str, float] | None = None,
    ) -> None:
        """`reader`: a read-only SQLite connection of the store (a context manager, as SqliteStore.reader)."""
        self.dir = data_dir / INDEX_DIR
        boosts = dict(analysis.FIELD_BOOSTS if field_boosts is None else field_boosts)
        unknown = set(boosts) - set(analysis.LEXICAL_FIELDS)
        if unknown or any(b < 0 for b in boosts.values()) or not any(boosts.values()):
            raise ValueError(
                f"field_boosts: non-negative boosts of {analysis.LEXICAL_FIELDS}, not all 0; got {field_boosts!r}"
            )
        self.boosts = {name: float(boosts.get(name, 0.0)) for name in analysis.LEXICAL_FIELDS}
        self._reader = reader
        self.poll_interval_s = poll_interval_s
        self.idle_commit_s = idle_commit_s
        self.max_commit_delay_s = max_commit_delay_s
        self.bulk_commit_s = bulk_commit_s
        self._bulk_loads = 0  # open `bulk` contexts of this process
        self._bulk_count_lock = threading.Lock()
        self._merging = False  # a force merge holds `_lock` for its whole rewrite: writes do not wait for it
        self._writer_heap = writer_heap_bytes
        self._writer_threads = writer_threads
        self._schema = _schema()
        self._stamp = _Stamp(self.dir / STAMP_NAME)
        self._handoff = MergeHandoff(data_dir / MERGE_HANDOFF_DIR)
        self._lock = threading.RLock()  # writer, stamp and reload, within this process
        self._writer: tantivy.IndexWriter | None = None
        self._lock_fd: int | None = None
        self._index: tantivy.Index | None = None
        self.generation = -1  # the lexical generation this process's reader reflects (committed)
        self._applied = -1  # the generation applied to the writer (>= generation while a commit is due)
        self._first_pending = 0.0  # monotonic time of the oldest uncommitted change
        self._last_apply = 0.0
        self._stamp_seen = -2
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None
        self._shares: OrderedDict[str, tuple[float, float]] = OrderedDict()  # filters -> (share, when counted)
        self._shares_lock = threading.Lock()
        # (field, one character) -> (generation, its terms by count, the same terms as strings)
        self._prefix_terms: OrderedDict[tuple[str, str], tuple[int, list[tuple[str, int]], list[str]]] = OrderedDict()
        self._prefix_terms_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def open(self, store_generation: int) -> None:
        """Open the index (creating it), take the writer if free, and catch up with the store."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            locked = self._try_lock()
            stamp = self._stamp.read()
            usable = stamp is not None and stamp[1:] == (analysis.ANALYSIS_VERSION, SCHEMA_REVISION)
            if locked and not usable:
                self._wipe()  # only the writer may start the index afresh
            try:
                self._index = tantivy.Index(self._schema, path=str(self.dir), reuse=True)
            except (OSError, ValueError) as exc:
                if not locked:
                    raise
                log.warning("lexical index of %s is unreadable (%s); rebuilding", self.dir.parent, exc)
                usable = False
                self._wipe()
                self._index = tantivy.Index(self._schema, path=str(self.dir), reuse=True)
            self.generation = self._applied = stamp[0] if usable and stamp else -1
            self._stamp_seen = self._stamp.mtime_ns()
            if self._try_own():
                self._sync(store_generation)
                self._commit()
        self._start_poller()

    def _wipe(self) -> None:
        for path in self.dir.iterdir():
            if path.name != "writer.lock" and path.is_file():
                path.unlink()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._writer is not None:
                with contextlib.suppress(Exception):  # SQLite has the changes: the next open applies them
                    self._commit()
            self._release()
            self._index = None

    def _try_lock(self) -> bool:
        """Take `writer.lock` if no process holds it (the caller holds `_lock`)."""
        if self._lock_fd is not None:
            return True
        fd = os.open(self.dir / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _try_own(self) -> bool:
        """Hold the one writer role, taking it if no process holds it (the caller holds `_lock`)."""
        if self._writer is not None:
            return True
        if not self._try_lock():
            return False
        assert self._index is not None
        self._index.reload()  # the last owner's commits
        self._writer = self._index.writer(heap_size=self._writer_heap, num_threads=self._writer_threads)
        return True

    def _release(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.wait_merging_threads()
            self._writer = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    @property
    def owns_writer(self) -> bool:
        return self._writer is not None

    def _start_poller(self) -> None:
        ref = weakref.ref(self)
        closed = self._closed
        interval = self.poll_interval_s

        def poll() -> None:  # holds no reference to the index between rounds: it stops when collected
            while not closed.wait(interval):
                index = ref()
                if index is None:
                    return
                try:
                    index.refresh()
                    index.serve_merge_requests()
                except Exception:  # a failed round is retried on the next one
                    log.exception("lexical index refresh failed")
                del index

        self._poller = threading.Thread(target=poll, name="shopsearch-lexical-refresh", daemon=True)
        self._poller.start()

    # ------------------------------------------------------------------ writes

    @staticmethod
    def add(conn: sqlite3.Connection, rows: Sequence[tuple[int, str]], generation: int) -> None:
        """Record new products' tokens ((pk, `tokens_json`)) in the store's write transaction."""
        version = analysis.ANALYSIS_VERSION
        conn.executemany(
            "INSERT INTO product_text (pk, analysis, fields) VALUES (?, ?, ?)", [(pk, version, t) for pk, t in rows]
        )
        conn.executemany(
            "INSERT INTO lexical_changes (generation, pk) VALUES (?, ?)", [(generation, pk) for pk, _ in rows]
        )

    @staticmethod
    def remove(conn: sqlite3.Connection, pks: Sequence[int], generation: int) -> None:
        conn.executemany("DELETE FROM product_text WHERE pk = ?", [(pk,) for pk in pks])
        conn.executemany("INSERT INTO lexical_changes (generation, pk) VALUES (?, ?)", [(generation, pk) for pk in pks])

    @staticmethod
    def changed(conn: sqlite3.Connection, pk: int, generation: int) -> None:
        """A product's filter fields changed (price, stock): its document is re-synced."""
        conn.execute("INSERT INTO lexical_changes (generation, pk) VALUES (?, ?)", (generation, pk))

    def _lock_unless_merging(self) -> bool:
        """Take `_lock`, unless a force merge holds it: False then, at once (the merge, or the poll
        after it, applies what the store logs meanwhile)."""
        while not self._lock.acquire(timeout=0.01):
            if self._merging:
                return False
        return True

    def refresh(self, store_generation: int | None = None) -> None:
        """Catch up with the store: apply its changes when this process owns the writer (taking it over
        when free), else reload the reader when the owner has committed. During a force merge it
        returns at once: the change is in SQLite's log, and the merge's end applies it."""
        if self._closed.is_set() or not self._lock_unless_merging():
            return
        try:
            if self._index is None:
                return
            if store_generation is None:
                store_generation = self._store_generation()
            if self._try_own():
                if store_generation != self._applied:
                    self._sync(store_generation)
                self._commit_if_due()
                return
            seen = self._stamp.mtime_ns()
            if seen != self._stamp_seen:
                self._stamp_seen = seen
                stamp = self._stamp.read()
                self._index.reload()
                if stamp is not None:
                    self.generation = stamp[0]
        finally:
            self._lock.release()

    def _store_generation(self) -> int:
        with self._reader() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'lexical_generation'").fetchone()
        return 0 if row is None else int(row[0])

    def _sync(self, store_generation: int, *, rebuild: bool = False) -> None:
        """Bring the index to `store_generation` (the caller owns the writer and holds `_lock`);
        `rebuild`: write every product afresh even when the index is current."""
        assert self._writer is not None and self._index is not None
        applied = -1 if rebuild else self._applied
        with self._reader() as conn:
            conn.execute("BEGIN")  # one snapshot: the changes and the rows they point to
            try:
                target = conn.execute("SELECT value FROM meta WHERE key = 'lexical_generation'").fetchone()
                target_generation = 0 if target is None else int(target[0])
                if target_generation == applied:
                    return
                oldest = conn.execute("SELECT min(generation) FROM lexical_changes").fetchone()[0]
                full = applied < 0 or (oldest is not None and oldest > applied + 1)
                if target_generation < applied:
                    full = True  # the store went back (restored from a backup): trust only SQLite
                if full:
                    log.info("building the lexical index of %s from SQLite", self.dir.parent)
                    self._writer.delete_all_documents()
                    pks_iter: Iterator[list[int]] = _pages(conn, "SELECT pk FROM products ORDER BY pk")
                else:
                    pks_iter = _pages(
                        conn,
                        "SELECT DISTINCT pk FROM lexical_changes WHERE generation > ? ORDER BY pk",
                        (applied,),
                    )
                for pks in pks_iter:
                    if not full:  # (delete_documents_by_term does not match u64 terms in these bindings)
                        self._writer.delete_documents_by_query(tantivy.Query.term_set_query(self._schema, "pk", pks))
                    for row in _text_rows(conn, pks):
                        self._writer.add_document(self._document(row))
            except BaseException:
                # a half-applied change must not be committed: drop what is uncommitted, apply again later
                self._writer.rollback()
                self._applied = self.generation
                raise
            finally:
                conn.rollback()
        now = time.monotonic()
        if self._applied == self.generation:
            self._first_pending = now
        self._last_apply = now
        self._applied = target_generation

    def _commit(self, *, force: bool = False) -> None:
        """Publish what the writer holds (the caller owns the writer and holds `_lock`)."""
        assert self._writer is not None and self._index is not None
        if self._applied == self.generation and not force:
            return
        self._writer.commit()
        self._stamp.write(self._applied)
        self._stamp_seen = self._stamp.mtime_ns()
        self._index.reload()
        self.generation = self._applied

    def _commit_if_due(self) -> None:
        if self._writer is None or self._applied == self.generation:
            return
        now = time.monotonic()
        if self._bulk_loads:
            due = now - self._first_pending >= self.bulk_commit_s
        else:
            due = now - self._last_apply >= self.idle_commit_s or now - self._first_pending >= self.max_commit_delay_s
        if due:
            self._commit()

    @contextlib.contextmanager
    def bulk(self) -> Iterator[None]:
        """Within it, applied changes are committed every `bulk_commit_s` at most, and once when it ends
        (during a force merge, by the merge)."""
        with self._bulk_count_lock:
            self._bulk_loads += 1
        try:
            yield
        finally:
            with self._bulk_count_lock:
                self._bulk_loads -= 1
                last = not self._bulk_loads
            if last and self._lock_unless_merging():
                try:
                    if self._writer is not None and self._index is not None:
                        self._commit()
                except Exception:  # SQLite has the load: the poller's next commit publishes it
                    log.exception("lexical commit at the end of a bulk load failed; retried in the background")
                finally:
                    self._lock.release()

    def merge_segments(self, *, take_s: float = MERGE_TAKE_S) -> tuple[int, int]:
        """Rewrite the index from SQLite in one commit, so that a search scores few segments (one
        unless the merge heap fills); (segments before, after). Searches go on meanwhile, on the
        segments before, and so do writes: SQLite takes them, and the merge applies what they logged
        before its commit (after it, at its end). Caveat: what they change is searchable only once
        the merge ends, in this process too. Killed midway, the index is left as it was.

        Only the writer's owner merges. Another process asks it (`MergeHandoff`) and waits for its
        answer; LexicalWriterBusy when the owner has not started the merge within `take_s` (it is
        stopped, or busy), the request then withdrawn."""
        with self._lock:
            if self._index is None:
                raise RuntimeError("the lexical index is closed")
            if self._try_own():
                return self._merge_owned()
        return self._merge_by_owner(take_s)

    def serve_merge_requests(self) -> None:
        """(The writer's owner; its poller calls this.) Merge once for every request other processes
        have made since the last time, and answer them."""
        if self._writer is None or self._closed.is_set():
            return
        requests = self._handoff.take()
        if not requests:
            return
        try:
            before, after = self.merge_segments()
            answer: dict[str, Any] = {"segments_before": before, "segments_after": after}
        except Exception as exc:  # the askers get the error; this process goes on
            log.exception("force merge asked by another process failed")
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        self._handoff.answer(requests, answer)

    def _merge_by_owner(self, take_s: float) -> tuple[int, int]:
        try:
            request = self._handoff.ask()
        except OSError as exc:
            raise RuntimeError(f"cannot ask the process writing the lexical index to merge: {exc}") from exc
        give_up = time.monotonic() + take_s
        while True:
            answer = self._handoff.collect(request)
            if answer is not None:
                if "error" in answer:
                    failed = answer["error"]
                    raise RuntimeError(f"the force merge failed in the process writing the lexical index: {failed}")
                self.refresh()  # reload now: the merged segments, not the poller's next round
                return int(answer["segments_before"]), int(answer["segments_after"])
            closed = self._closed.is_set()
            if (closed or time.monotonic() > give_up) and self._handoff.withdraw(request):
                if closed:
                    raise RuntimeError("the lexical index is closed")
                raise LexicalWriterBusy(
                    f"another process writes the lexical index of {self.dir.parent} (a running `shopsearch "
                    f"serve`?) and did not start the merge within {take_s:g} s (stopped, or busy): try again"
                )
            self._closed.wait(0.02)  # taken: the merge runs, however long; its answer comes

    def _merge_owned(self) -> tuple[int, int]:
        """The merge itself (the caller holds `_lock` and the writer)."""
        assert self._index is not None and self._writer is not None
        self._sync(self._store_generation())
        self._commit()
        before = int(self._index.searcher().num_segments)
        if before <= 1:
            return before, before
        self._merging = True
        try:
            self._writer.wait_merging_threads()  # tantivy allows one writer: this one goes first
            self._writer = self._index.writer(heap_size=max(MERGE_HEAP_BYTES, self._writer_heap), num_threads=1)
            try:
                self._sync(self._store_generation(), rebuild=True)
                # what writes logged during the rewrite: deleted and added again within the same commit
                self._sync(self._store_generation())
                self._commit(force=True)
            finally:
                writer, self._writer = self._writer, None
                with contextlib.suppress(Exception):
                    writer.rollback()  # nothing is pending after a commit; after a failure, the rebuild goes
                writer.wait_merging_threads()
                self._writer = self._index.writer(heap_size=self._writer_heap, num_threads=self._writer_threads)
        finally:
            self._merging = False
        after = int(self._index.searcher().num_segments)
        # writes since the commit: applied now, so this process's next search finds them
        self._sync(self._store_generation())
        return before, after

    def _document(self, row: TextRow) -> tantivy.Document:
        doc = tantivy.Document()
        doc.add_unsigned("pk", row.pk)
        for name in (*analysis.LEXICAL_FIELDS, SUGGEST_FIELD):
            value = row.fields.get(name)
            if value:
                doc.add_text(name, value)
        doc.add_text("id", row.id)
        if row.brand is not None:
            doc.add_text("brand", row.brand)
            doc.add_text("brand_key", value_key(row.brand))
        for category in row.categories:
            doc.add_text("category", category)
            doc.add_text("category_key", value_key(category))
        if row.price is not None:
            doc.add_float("price", row.price)
        doc.add_unsigned("in_stock", 1 if row.in_stock else 0)
        doc.add_unsigned("sales", row.sales)
        if row.stock is not None:
            doc.add_unsigned("stock", row.stock)
        return doc

    def stamped_generation(self) -> int | None:
        """The generation the index on disk reflects (any process's commit), None when unknown."""
        stamp = self._stamp.read()
        return None if stamp is None else stamp[0]

    def prune_log(self, conn: sqlite3.Connection, keep_after: int) -> None:
        """Forget changes at or before generation `keep_after` (inside the store's write transaction)."""
        conn.execute("DELETE FROM lexical_changes WHERE generation <= ?", (keep_after,))

    # ------------------------------------------------------------------ queries

    def text_query(self, text: str) -> tantivy.Query | None:
        """Any of the text's tokens, BM25 per field times its boost; None when it has no token."""
        per_field = analysis.analyze_query(text)
        clauses: list[tuple[tantivy.Occur, tantivy.Query]] = []
        for name, boost in self.boosts.items():
            if boost <= 0:
                continue
            for token in per_field.get(name, [])[:MAX_QUERY_TOKENS]:
                term = tantivy.Query.term_query(self._schema, name, token)
                clauses.append((tantivy.Occur.Should, tantivy.Query.boost_query(term, boost) if boost != 1 else term))
        if not clauses:
            return None
        return tantivy.Query.boolean_query(clauses)

    def filter_query(self, filters: Filters | None) -> list[tantivy.Query]:
        """Non-scoring clauses equivalent to `Filters.matches`."""
        if filters is None or filters.is_empty():
            return []
        schema = self._schema
        out: list[tantivy.Query] = []
        if filters.category is not None:
            out.append(tantivy.Query.term_set_query(schema, "category", list(filters.category)))
        if filters.brand is not None:
            out.append(tantivy.Query.term_set_query(schema, "brand", list(filters.brand)))
        if filters.price_min is not None or filters.price_max is not None:
            out.append(
                tantivy.Query.range_query(
                    schema,
                    "price",
                    tantivy.FieldType.Float,
                    lower_bound=float(filters.price_min) if filters.price_min is not None else float("-inf"),
                    upper_bound=float(filters.price_max) if filters.price_max is not None else float("inf"),
                )
            )
        if filters.in_stock:
            out.append(tantivy.Query.term_query(schema, "in_stock", 1))
        if filters.ids is not None:
            out.append(tantivy.Query.term_set_query(schema, "id", list(filters.ids)))
        if filters.exclude:  # a product matching any exclude clause (each its fields together) is left out
            negative: list[tuple[tantivy.Occur, tantivy.Query]] = [(tantivy.Occur.Must, tantivy.Query.all_query())]
            for clause in filters.exclude:
                parts = self.filter_query(clause)
                together = (
                    parts[0]
                    if len(parts) == 1
                    else tantivy.Query.boolean_query([(tantivy.Occur.Must, q) for q in parts])
                )
                negative.append((tantivy.Occur.MustNot, together))
            out.append(tantivy.Query.boolean_query(negative))
        return out

    def match_query(self, text: str | None, filters: Filters | None, ids: Sequence[str] = ()) -> tantivy.Query | None:
        """(text's tokens OR ids) AND filters; every product when text is None (ids then add nothing).
        None: nothing can match (a text without tokens and no ids)."""
        schema = self._schema
        matching: tantivy.Query | None
        if text is None:
            matching = tantivy.Query.all_query()
        else:
            parts = []
            if text is not None and (query := self.text_query(text)) is not None:
                parts.append(query)
            if ids:
                parts.append(
                    tantivy.Query.const_score_query(tantivy.Query.term_set_query(schema, "id", list(ids)), 0.0)
                )
            if not parts:
                return None
            matching = (
                parts[0] if len(parts) == 1 else tantivy.Query.boolean_query([(tantivy.Occur.Should, p) for p in parts])
            )
        restrictions = self.filter_query(filters)
        if not restrictions:
            return matching
        clauses = [(tantivy.Occur.Must, matching)]
        clauses += [(tantivy.Occur.Must, tantivy.Query.const_score_query(q, 0.0)) for q in restrictions]
        return tantivy.Query.boolean_query(clauses)

    # ------------------------------------------------------------------ reads

    def top(self, text: str, filters: Filters | None, n: int) -> list[tuple[int, float]]:
        """BM25 top n of `text` among the products `filters` allow: (pk, score), best first, ties by pk.

        A filter inside the query is intersected with the text's matches, and tantivy then scores every
        match: block-max WAND prunes only a pure disjunction. A filter on price and stock alone that
        most products pass is therefore applied after an unfiltered, pruned search instead, reading the
        hits' price and stock from fast fields; the result is kept only when it is provably the same top
        n (the search was exhaustive, or n allowed hits score above the lowest collected one), else the
        filtered query runs."""
        if n <= 0:
            return []
        numeric = _fast_filter(filters)
        if numeric is not None:
            assert filters is not None
            share = self._share(filters)
            if share >= POST_FILTER_MIN_SHARE:
                query = self.match_query(text, None)
                if query is None:
                    return []
                limit = math.ceil(POST_FILTER_MARGIN * n / share) + 16
                found = self._post_filtered(query, numeric, n, limit)
                if found is not None:
                    return found
        query = self.match_query(text, filters)
        return [] if query is None else self.search(query, n)

    def _share(self, filters: Filters) -> float:
        """About what share of the products `filters` allow (a count, kept for a while per filter)."""
        key = filters.model_dump_json()
        now = time.monotonic()
        with self._shares_lock:
            kept = self._shares.get(key)
            if kept is not None and now - kept[1] < _SHARE_TTL_S:
                self._shares.move_to_end(key)
                return kept[0]
        searcher = self._searcher()
        total = int(searcher.num_docs)
        query = self.match_query(None, filters)
        share = 0.0 if not total or query is None else searcher.search(query, limit=1, count=True).count / total
        with self._shares_lock:
            self._shares[key] = (share, now)
            while len(self._shares) > _SHARES_KEPT:
                self._shares.popitem(last=False)
        return share

    def _post_filtered(
        self, query: tantivy.Query, numeric: _FastFilter, n: int, limit: int
    ) -> list[tuple[int, float]] | None:
        searcher = self._searcher()
        found = searcher.search(query, limit=limit, count=False).hits
        if not found:
            return []
        addrs = [addr for _, addr in found]
        pks = searcher.fast_field_values("pk", addrs)
        keep = [True] * len(found)
        if numeric.low is not None or numeric.high is not None:
            low = -math.inf if numeric.low is None else numeric.low
            high = math.inf if numeric.high is None else numeric.high
            prices = searcher.fast_field_values("price", addrs)
            keep = [k and p is not None and low <= p <= high for k, p in zip(keep, prices, strict=True)]
        if numeric.in_stock:
            stock = searcher.fast_field_values("in_stock", addrs)
            keep = [k and s == 1 for k, s in zip(keep, stock, strict=True)]
        hits = [(int(pk), float(score)) for (score, _), pk, k in zip(found, pks, keep, strict=True) if k]
        if len(found) >= limit:  # not exhaustive: only hits above the lowest collected score are sure
            lowest = float(found[-1][0])
            hits = [h for h in hits if h[1] > lowest]
            if len(hits) < n:
                return None
        hits.sort(key=lambda h: (-h[1], h[0]))
        return hits[:n]

    def _searcher(self) -> tantivy.Searcher:
        if self._writer is not None and self._applied != self.generation and not self._bulk_loads and not self._merging:
            with self._lock:  # this process's own writes are searchable once they return
                if self._writer is not None:
                    self._commit()
        index = self._index
        if index is None:
            raise RuntimeError("the lexical index is closed")
        return index.searcher()

    def search(self, query: tantivy.Query, n: int) -> list[tuple[int, float]]:
        """(pk, score) of the top n, best first, ties by pk."""
        if n <= 0:
            return []
        searcher = self._searcher()
        # tantivy breaks ties by document address: widen while a tie crosses the cut. Catalogues hold
        # many equal titles, so a cut inside a tie is common; collecting twice n at once is cheaper
        # than searching again.
        limit = 2 * n + 1
        while True:
            hits = self._hits(searcher, query, limit)
            if len(hits) < limit or hits[-1][1] != hits[n - 1][1]:
                break
            limit *= 2
        hits.sort(key=lambda h: (-h[1], h[0]))
        return hits[:n]

    @staticmethod
    def _hits(searcher: tantivy.Searcher, query: tantivy.Query, limit: int) -> list[tuple[int, float]]:
        found = searcher.search(query, limit=limit, count=False).hits
        pks = searcher.fast_field_values("pk", [addr for _, addr in found])
        return [(int(pk), float(score)) for (score, _), pk in zip(found, pks, strict=True)]

    def all_matches(self, query: tantivy.Query) -> list[tuple[int, float]]:
        """(pk, score) of every match, in no order."""
        searcher = self._searcher()
        total = searcher.search(query, limit=1, count=True).count
        if not total:
            return []
        return self._hits(searcher, query, total)

    def count(self, query: tantivy.Query) -> int:
        return int(self._searcher().search(query, limit=1, count=True).count)

    def aggregate(self, query: tantivy.Query, aggregations: dict[str, Any]) -> dict[str, Any]:
        """tantivy's aggregations (Elasticsearch's request and response shapes) over the query's matches."""
        return dict(self._searcher().aggregate(query, aggregations))

    def terms_with_prefix(
        self, field: str, prefix: str, limit: int | None, *, exact: bool = True
    ) -> list[tuple[str, int]]:
        """(term, documents holding it), most frequent first, ties by term. `exact`: deleted documents
        are not counted; else the term dictionary's document frequencies, which count deleted
        documents until their segment merges.

        Both walk the term dictionary only (asking tantivy to count live documents instead costs a
        pass over every document per call). The dictionary's frequencies are exact when the index
        holds no deleted document; otherwise they are upper bounds, and the terms are counted exactly
        in their order until no uncounted term can reach the `limit` best counted ones."""
        found, _ = self._dictionary(field, prefix)
        searcher = self._searcher()
        if not exact or not found or not self._holds_deleted(searcher):
            return list(found) if limit is None else found[:limit]  # a copy: `found` may be the kept list
        counted: list[tuple[str, int]] = []
        kth = 0  # the limit-th best exact count so far (0 until there are limit of them)
        for term, upper in found:
            if limit is not None and len(counted) >= limit and upper < kth:
                break
            live = int(searcher.search(tantivy.Query.term_query(self._schema, field, term), limit=1, count=True).count)
            if live > 0:
                counted.append((term, live))
                if limit is not None and len(counted) >= limit:
                    counted.sort(key=lambda tc: (-tc[1], tc[0]))
                    del counted[limit:]
                    kth = counted[-1][1]
        counted.sort(key=lambda tc: (-tc[1], tc[0]))
        return counted if limit is None else counted[:limit]

    def terms_starting(self, field: str, prefix: str) -> list[str]:
        """Every term of `field` starting with `prefix`, most frequent first; terms only deleted documents
        hold are in it until their segment merges (count them with `live_doc_freq`). Not to be modified:
        a one-character prefix's list is shared until the next commit."""
        return self._dictionary(field, prefix)[1]

    def _dictionary(self, field: str, prefix: str) -> tuple[list[tuple[str, int]], list[str]]:
        """The terms of `field` starting with `prefix`: (term, dictionary count) most frequent first, ties
        by term, and the terms alone. A one-character prefix walks a large part of the dictionary (every
        first keystroke of a search box, every typo lookup), so those are kept until the next commit."""
        self._searcher()  # commits this process's own writes first
        generation = self.generation  # read before the searcher: a newer searcher is only re-read later
        searcher = self._searcher()
        key = (field, prefix)
        if len(prefix) == 1:
            with self._prefix_terms_lock:
                kept = self._prefix_terms.get(key)
                if kept is not None and kept[0] == generation:
                    self._prefix_terms.move_to_end(key)
                    return kept[1], kept[2]
        found = sorted(((str(t), int(c)) for t, c in searcher.terms_with_prefix(field, prefix) if c > 0),
                       key=lambda tc: (-tc[1], tc[0]))  # fmt: skip
        terms = [t for t, _ in found]
        if len(prefix) == 1:
            with self._prefix_terms_lock:
                self._prefix_terms[key] = (generation, found, terms)
                self._prefix_terms.move_to_end(key)
                while len(self._prefix_terms) > _PREFIX_TERMS_KEPT:
                    self._prefix_terms.popitem(last=False)
        return found, terms

    def _holds_deleted(self, searcher: tantivy.Searcher) -> bool:
        """Whether the searcher's segments hold deleted documents: every document has exactly one
        `in_stock` term, and the dictionary counts deleted documents too."""
        stored = sum(int(searcher.doc_freq("in_stock", value)) for value in (0, 1))
        return stored != int(searcher.num_docs)

    def live_doc_freq(self, field: str, term: str) -> int:
        """Documents holding `term`, deleted ones not counted."""
        return self.count(tantivy.Query.term_query(self._schema, field, term))

    def num_docs(self) -> int:
        return int(self._searcher().num_docs)

    def details(self) -> dict[str, Any]:
        searcher = self._searcher()
        size = sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())
        return {
            "engine": "tantivy",
            "analysis_version": analysis.ANALYSIS_VERSION,
            "fields": dict(self.boosts),
            "documents": int(searcher.num_docs),
            "segments": int(searcher.num_segments),
            "generation": self.generation,
            "owns_writer": self.owns_writer,
            "size_bytes": size,
        }


@dataclass(frozen=True)
class _FastFilter:
    """A filter that fast fields answer: a price range (inclusive) and in stock."""

    low: float | None
    high: float | None
    in_stock: bool


def _fast_filter(filters: Filters | None) -> _FastFilter | None:
    """The filter as a `_FastFilter` when it restricts price and stock only, else None."""
    if filters is None:
        return None
    restricting = {name for name, value in filters.model_dump(exclude_none=True).items() if value is not False}
    if not restricting or not restricting <= {"price_min", "price_max", "in_stock"}:
        return None
    return _FastFilter(
        low=None if filters.price_min is None else float(filters.price_min),
        high=None if filters.price_max is None else float(filters.price_max),
        in_stock=bool(filters.in_stock),
    )


def _pages(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> Iterator[list[int]]:
    cursor = conn.execute(sql, params)
    while rows := cursor.fetchmany(_ADD_BATCH):
        yield [int(r[0]) for r in rows]


def _text_rows(conn: sqlite3.Connection, pks: Sequence[int]) -> Iterator[TextRow]:
    """The document makings of the pks that exist, re-analysing rows of another analysis version."""
    rows = conn.execute(  # the product itself only where its tokens must be made again
        "SELECT p.pk, p.id, CASE WHEN t.analysis IS ? AND t.fields IS NOT NULL THEN NULL ELSE p.doc END,"
        " p.brand, p.price, p.stock, p.sales, t.analysis, t.fields FROM products p"
        " LEFT JOIN product_text t ON t.pk = p.pk WHERE p.pk IN (SELECT value FROM json_each(?))",
        (analysis.ANALYSIS_VERSION, json.dumps(list(pks))),
    ).fetchall()
    categories: dict[int, list[str]] = {}
    for pk, category in conn.execute(
        "SELECT pk, category FROM product_categories WHERE pk IN (SELECT value FROM json_each(?))",
        (json.dumps(list(pks)),),
    ):
        categories.setdefault(int(pk), []).append(category)
    for pk, pid, doc, brand, price, stock, sales, version, fields in rows:
        if version != analysis.ANALYSIS_VERSION or fields is None:
            fields = tokens_json(Product.model_validate_json(doc))  # stale tokens: analyse again
        yield TextRow(
            pk=int(pk),
            fields=pydantic_core.from_json(fields),
            id=pid,
            brand=brand,
            categories=categories.get(int(pk), []),
            price=None if price is None else float(price),
            in_stock=stock is None or int(stock) > 0,
            sales=int(sales or 0),
            stock=None if stock is None else int(stock),
        )
