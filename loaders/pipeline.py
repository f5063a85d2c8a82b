"""The streaming machinery behind `loaders.indexer.Indexer.index`: read + validate → classify → embed →
write, one thread per stage.

    reader thread ──batch──▶ backend thread: classify (content hashes) ──▶ embed thread ──▶ backend thread: write
         ▲                                                                                         │
         └──────────────────── `max_inflight` slots (a semaphore): the bounded hand-off ◀──────────┘

The backend is only ever touched from the calling thread, which both classifies batches before
embedding and writes them after: one thread of backend calls keeps writes in read order, which is what
makes "last committed line" a correct resume point. Rows of a batch whose ids are
still in flight in an earlier batch are always rewritten, so a later duplicate id wins.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loaders.checkpoint import Checkpoint
from loaders.report import Progress, Summary
from loaders.sources import SourceRow
from loaders.validate import DeadLetters, Rejection, validate_product, validate_signal
from middleware.backends.base import Backend
from middleware.products import Product, SignalUpdate

log = logging.getLogger(__name__)

DEFAULT_MAX_PRUNE_SHARE = 0.5  # a snapshot that would delete more of the catalog than this is suspect
TRUNCATION_EXAMPLES = 20  # cut fields named in the summary (the count covers all)
DEFAULT_BATCH_SIZE = 512  # texts per embedder call: large enough for its length-sorted sub-batches
# rows per write when nothing is embedded: a write transaction's fsync is a fixed cost per batch
LEXICAL_BATCH_SIZE = 2048
_COUNTS = ("read", "indexed", "updated", "unchanged", "rejected", "duplicates", "embedded", "cache_hits", "truncated")


@dataclass
class Batch:
    seq: int
    last_line: int = 0
    rows: int = 0  # rows read into this batch (valid + rejected)
    rejections: list[Rejection] = field(default_factory=list)
    products: dict[str, Product] = field(default_factory=dict)  # by id: a later row replaces an earlier one
    duplicates: int = 0
    truncations: list[str] = field(default_factory=list)  # "line N: field cut from X to Y characters"
    skipped_ids: list[str] = field(default_factory=list)  # committed by a resumed run's earlier attempt
    # classify step
    to_write: list[Product] = field(default_factory=list)
    signal_updates: list[SignalUpdate] = field(default_factory=list)
    indexed: int = 0
    updated: int = 0
    unchanged: int = 0
    # embed step
    vectors: np.ndarray | None = None
    embedded: int = 0
    cache_hits: int = 0
    embed_seconds: float = 0.0

    def add(self, product: Product) -> None:
        """A valid product; a later one with the same id replaces the earlier, in the later position."""
        if product.id in self.products:
            self.duplicates += 1
            del self.products[product.id]
        self.products[product.id] = product

    def add_row(self, row: SourceRow) -> None:
        """A source row: validated, then added or rejected; fields cut to their bounds are noted."""
        self.rows += 1
        self.last_line = row.line
        result = validate_product(row)
        if isinstance(result, Rejection):
            self.rejections.append(result)
            return
        for name, length in result.truncated.items():
            cut = len(getattr(result, name) or "")
            self.truncations.append(f"line {row.line}: {name} cut from {length} to {cut} characters")
        self.add(result)


class _SeenIds:
    """Ids present in the snapshot, for --prune: a private temporary SQLite file, not a 10^7-entry set."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("")  # "" = an anonymous on-disk temporary database
        self._db.execute("CREATE TABLE seen (id TEXT PRIMARY KEY) WITHOUT ROWID")

    def add(self, ids: Iterable[str]) -> None:
        with self._db:
            self._db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", ((i,) for i in ids))

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM seen").fetchone()[0])

    def absent(self, ids: Sequence[str]) -> list[str]:
        marks = ",".join("?" * len(ids))
        present = {r[0] for r in self._db.execute(f"SELECT id FROM seen WHERE id IN ({marks})", list(ids))}
        return [i for i in ids if i not in present]

    def close(self) -> None:
        self._db.close()


class _Stop(Exception):
    pass


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# products -> (their vectors in order, or None for a lexical-only store; how many came from a cache)
Embed = Callable[[Sequence[Product]], "tuple[np.ndarray | None, int]"]


def index_rows(
    rows: Iterable[SourceRow],
    backend: Backend,
    embed: Embed,
    *,
    dead_letters: DeadLetters,
    checkpoint: Checkpoint | None = None,
    resume_state: dict[str, Any] | None = None,
    prune: bool = False,
    force_prune: bool = False,
    max_prune_share: float = DEFAULT_MAX_PRUNE_SHARE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_inflight: int = 4,
    progress: Progress | None = None,
    summary: Summary | None = None,
) -> Summary:
    """Index `rows` into `backend`, embedding changed products with `embed`. Returns the summary.

    With `prune`, stored products absent from `rows` are deleted afterwards, unless the snapshot looks
    incomplete (`summary.prune_refused` says why): it holds no valid product (always refused), rows were
    rejected, or it would delete more than `max_prune_share` of the store (both lifted by `force_prune`).

    Raises whatever the backend or the embedder raise (after stopping the worker threads); the
    checkpoint then holds the last committed line for `resume_state`.
    """
    started = time.monotonic()
    summary = summary or Summary()
    summary.dead_letter_path = str(dead_letters.path)
    resume_line = 0
    if resume_state:
        resume_line = int(resume_state.get("last_line", 0))
        for name, value in resume_state.get("counts", {}).items():
            if name in _COUNTS:
                setattr(summary, name, int(value))
        summary.resumed_from_line = resume_line
        summary.resumed_rows_skipped = summary.read
        dead_letters.count = summary.rejected
        dead_letters.drop_after(resume_line)
        if progress is not None:
            progress.resume_from(summary.read)
    committed_line = resume_line
    seen = _SeenIds() if prune else None

    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    to_embed: queue.Queue[Batch | None] = queue.Queue()
    slots = threading.Semaphore(max_inflight)
    stop = threading.Event()

    reader = threading.Thread(
        target=_read_stage,
        args=(rows, batch_size, resume_line, prune, slots, events, stop),
        name="shopsearch-read",
        daemon=True,
    )
    # a backend that analyses text before writing it (the embedded store) does so on the embed thread,
    # while this thread writes the previous batch
    prepare = getattr(backend, "prepare", None)
    embed_thread = threading.Thread(
        target=_embed_stage,
        args=(embed, to_embed, events, stop, prepare if callable(prepare) else None),
        name="shopsearch-embed",
        daemon=True,
    )
    pending: Counter[str] = Counter()  # ids classified but not yet written
    inflight = 0
    reading_done = False
    # a backend with a bulk mode (the embedded store) publishes the load in few large commits
    loading = contextlib.ExitStack()
    bulk_load = getattr(backend, "bulk_load", None)
    if callable(bulk_load):
        loading.enter_context(bulk_load())
    reader.start()
    embed_thread.start()
    try:
        while not (reading_done and inflight == 0):
            kind, payload = events.get()
            if kind == "error":
                raise payload
            if kind == "done":
                reading_done = True
            elif kind == "read":
                classify(payload, backend, pending)
                inflight += 1
                to_embed.put(payload)
            elif kind == "embedded":
                batch: Batch = payload
                commit_batch(batch, backend, summary, dead_letters, seen)
                for product in batch.to_write:
                    pending[product.id] -= 1
                for update in batch.signal_updates:
                    pending[update.id] -= 1
                pending += Counter()  # drops zero counts
                inflight -= 1
                slots.release()
                if checkpoint is not None and batch.last_line > committed_line:
                    committed_line = batch.last_line
                    checkpoint.save(
                        {
                            "last_line": committed_line,
                            "counts": {name: getattr(summary, name) for name in _COUNTS},
                            "dead_letter_path": str(dead_letters.path),
                            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        }
                    )
                if progress is not None:
                    progress.update(
                        batch.rows, indexed=summary.indexed, updated=summary.updated, rejected=summary.rejected
                    )
        if prune and seen is not None:
            doomed = _absent_ids(backend, seen)
            summary.prune_refused = _prune_refusal(
                seen.count(), len(doomed), backend.count(), summary.rejected, force_prune, max_prune_share
            )
            if summary.prune_refused is None:
                summary.deleted += _delete(backend, doomed)
                summary.pruned = True
        if checkpoint is not None:
            checkpoint.clear()  # complete: the next run starts from the top
    finally:
        stop.set()
        to_embed.put(None)
        embed_thread.join(timeout=60)
        if seen is not None:
            seen.close()
        if progress is not None:
            progress.close()
        loading.close()
    summary.dead_letter_path = str(dead_letters.path) if dead_letters.count else None
    summary.finish(time.monotonic() - started)
    return summary


def _read_stage(
    rows: Iterable[SourceRow],
    batch_size: int,
    resume_line: int,
    collect_skipped: bool,
    slots: threading.Semaphore,
    events: queue.Queue[tuple[str, Any]],
    stop: threading.Event,
) -> None:
    seq = 0

    def emit(batch: Batch) -> None:
        while not slots.acquire(timeout=0.2):
            if stop.is_set():
                raise _Stop
        events.put(("read", batch))

    try:
        batch = Batch(seq)
        for row in rows:
            if stop.is_set():
                return
            if row.line <= resume_line:
                # committed by the earlier attempt; only its id matters (a pruned snapshot must keep it)
                batch.last_line = row.line
                if collect_skipped:
                    result = validate_product(row)
                    if isinstance(result, Product):
                        batch.skipped_ids.append(result.id)
                    if len(batch.skipped_ids) >= 8 * batch_size:
                        emit(batch)
                        seq += 1
                        batch = Batch(seq)
                continue
            batch.add_row(row)
            if batch.rows >= batch_size:
                emit(batch)
                seq += 1
                batch = Batch(seq)
        if batch.rows or batch.skipped_ids:
            emit(batch)
        events.put(("done", None))
    except _Stop:
        return
    except BaseException as err:  # handed to the calling thread, which raises it
        events.put(("error", err))


def classify(batch: Batch, backend: Backend, pending: Counter[str]) -> None:
    """Sort a batch's products into new / changed (write + embed) / signals only / unchanged."""
    products = list(batch.products.values())
    stored_hashes = backend.content_hashes([p.id for p in products if p.id not in pending])
    same_content: list[Product] = []
    for product in products:
        if product.id in pending:
            # an earlier batch still in flight writes this id first; this later row must win
            batch.to_write.append(product)
            batch.updated += 1
            continue
        stored_hash = stored_hashes.get(product.id)
        if stored_hash is None:
            batch.to_write.append(product)
            batch.indexed += 1
        elif stored_hash != product.content_hash():
            batch.to_write.append(product)
            batch.updated += 1
        else:
            same_content.append(product)
    if same_content:
        # content hashes leave out price/sales/stock: compare those with the stored product
        stored = {p.id: p for p in backend.get([p.id for p in same_content])}
        for product in same_content:
            old = stored.get(product.id)
            if old is None:  # deleted between the two reads
                batch.to_write.append(product)
                batch.indexed += 1
            elif (product.price, product.sales, product.stock) == (old.price, old.sales, old.stock):
                batch.unchanged += 1
            elif (product.price is None and old.price is not None) or (product.stock is None and old.stock is not None):
                batch.to_write.append(product)  # a signal update cannot clear a value: rewrite (cache hit)
                batch.updated += 1
            else:
                batch.signal_updates.append(
                    SignalUpdate(id=product.id, price=product.price, sales=product.sales, stock=product.stock)
                )
                batch.updated += 1
    for product in batch.to_write:
        pending[product.id] += 1
    for update in batch.signal_updates:
        pending[update.id] += 1


def _embed_stage(
    embed: Embed,
    to_embed: queue.Queue[Batch | None],
    events: queue.Queue[tuple[str, Any]],
    stop: threading.Event,
    prepare: Callable[[Sequence[Product]], None] | None = None,
) -> None:
    while True:
        batch = to_embed.get()
        if batch is None or stop.is_set():  # after a failure, queued batches are not worth embedding
            return
        try:
            if prepare is not None and batch.to_write:
                prepare(batch.to_write)
            embed_batch(batch, embed)
            events.put(("embedded", batch))
        except BaseException as err:
            events.put(("error", err))
            return


def embed_batch(batch: Batch, embed: Embed) -> None:
    if not batch.to_write:
        return
    t0 = time.monotonic()
    batch.vectors, batch.cache_hits = embed(batch.to_write)
    batch.embed_seconds = time.monotonic() - t0
    if batch.vectors is not None:
        batch.embedded = len(batch.to_write) - batch.cache_hits


def commit_batch(
    batch: Batch,
    backend: Backend | None,
    summary: Summary,
    dead_letters: DeadLetters | None,
    seen: _SeenIds | None,
) -> None:
    """Write a classified, embedded batch (backend None: the caller writes it) and count it."""
    t0 = time.monotonic()
    if batch.to_write and backend is not None:
        backend.upsert(batch.to_write, batch.vectors)  # one transaction / one bulk request per batch
    if batch.signal_updates and backend is not None:
        missing = backend.update_signals(batch.signal_updates)
        if missing:  # deleted by someone else since classification: write them whole
            gone = set(missing)
            backend.upsert([p for p in batch.products.values() if p.id in gone], None)
            log.warning("%d products vanished during indexing and were re-added without vectors", len(gone))
    summary.seconds_writing += time.monotonic() - t0
    summary.seconds_embedding += batch.embed_seconds
    if dead_letters is not None:
        dead_letters.write(batch.rejections)
    if seen is not None:
        seen.add(batch.products)
        seen.add(batch.skipped_ids)
    summary.read += batch.rows
    summary.rejected += len(batch.rejections)
    summary.duplicates += batch.duplicates
    summary.truncated += len(batch.truncations)
    room = TRUNCATION_EXAMPLES - len(summary.truncated_examples)
    summary.truncated_examples.extend(batch.truncations[: max(room, 0)])
    summary.indexed += batch.indexed
    summary.updated += batch.updated
    summary.unchanged += batch.unchanged
    summary.embedded += batch.embedded
    summary.cache_hits += batch.cache_hits


def _absent_ids(backend: Backend, seen: _SeenIds) -> list[str]:
    """Stored ids that were not in the snapshot, all collected before anything is deleted."""
    doomed: list[str] = []
    for chunk in _chunks(iter(backend.iter_ids()), 500):
        doomed.extend(seen.absent(chunk))
    return doomed


def _prune_refusal(
    snapshot_ids: int, doomed: int, stored: int, rejected: int, force: bool, max_share: float
) -> str | None:
    """Why a prune must not run (one line), or None. An empty snapshot is refused even when forced."""
    if snapshot_ids == 0:
        return (
            f"the snapshot holds no valid product (an empty or header-only file?): pruning would delete all "
            f"{stored} stored products; refused even with --force-prune"
        )
    if force:
        return None
    if rejected:
        return (
            f"{rejected} rows were rejected, and pruning would delete the products those rows "
            "describe; fix them or pass --force-prune"
        )
    if stored and doomed > max_share * stored:
        return (
            f"pruning would delete {doomed} of {stored} stored products ({doomed / stored:.0%}), more than "
            f"the allowed {max_share:.0%} (--max-prune-share): check the snapshot is complete, or pass --force-prune"
        )
    return None


def _delete(backend: Backend, ids: list[str]) -> int:
    deleted = 0
    for i in range(0, len(ids), 1000):
        deleted += backend.delete(ids[i : i + 1000])
    return deleted


def apply_signal_rows(
    rows: Iterable[SourceRow],
    backend: Backend,
    *,
    dead_letters: DeadLetters,
    batch_size: int = 1000,
    progress: Progress | None = None,
    summary: Summary | None = None,
) -> Summary:
    """Apply price/sales/stock changes by id. No embedding; vectors and text are never touched.

    Rows for ids not in the store go to the dead-letter file (reason "no product with this id").
    Several rows for one id in a batch are merged in order: a later non-empty field wins.
    """
    started = time.monotonic()
    summary = summary or Summary(command="update-signals")
    summary.dead_letter_path = str(dead_letters.path)
    merged: dict[str, SignalUpdate] = {}
    lines: dict[str, tuple[int, Any]] = {}
    rejections: list[Rejection] = []
    rows_in_batch = 0

    def flush() -> None:
        nonlocal rows_in_batch
        t0 = time.monotonic()
        missing = backend.update_signals(list(merged.values())) if merged else []
        summary.seconds_writing += time.monotonic() - t0
        for product_id in missing:
            line, raw = lines[product_id]
            rejections.append(Rejection(line, raw, f"no product with id {product_id!r}"))
        summary.not_found += len(missing)
        summary.updated += len(merged) - len(missing)
        dead_letters.write(sorted(rejections, key=lambda r: r.line))
        if progress is not None:
            progress.update(rows_in_batch, updated=summary.updated, rejected=summary.rejected)
        merged.clear()
        lines.clear()
        rejections.clear()
        rows_in_batch = 0

    try:
        for row in rows:
            summary.read += 1
            rows_in_batch += 1
            result = validate_signal(row)
            if isinstance(result, Rejection):
                rejections.append(result)
                summary.rejected += 1
            else:
                previous = merged.get(result.id)
                if previous is not None:
                    summary.duplicates += 1
                    changes = {k: v for k, v in result.model_dump().items() if v is not None}
                    result = previous.model_copy(update=changes)
                merged[result.id] = result
                lines[result.id] = (row.line, row.raw)
            if rows_in_batch >= batch_size:
                flush()
        flush()
    finally:
        if progress is not None:
            progress.close()
    summary.dead_letter_path = str(dead_letters.path) if dead_letters.count else None
    summary.finish(time.monotonic() - started)
    return summary
