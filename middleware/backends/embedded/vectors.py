"""The embedded store's vector index: faiss over the store's vectors, derived data kept beside SQLite.

It knows no SQL: it is fed `(pks, vectors)` batches and the store `generation` they reflect, from a
snapshot callable for full builds and from `apply` for each committed write. Keyed by the store's pk.

- `vectors.faiss` is stamped with the generation it reflects. Missing, unreadable or stale (a crash
  between the store's commit and the deferred save) → rebuilt from the store on open.
- Flat (exact) below `hnsw_threshold` vectors, HNSW above. HNSW cannot remove vectors, so a replaced
  or deleted vector stays in the graph as a dead id that searches exclude with an id selector until
  the next rebuild; the store gives a replaced product a new pk, so "dead" is never ambiguous.
- A filtered search over a small subset runs exactly over the HNSW graph's own flat storage: a
  selective filter starves an HNSW walk of allowed neighbours.
- Thread safety: `lock` is a readers-writer lock. Searches hold it for reading; a vector-changing
  write holds it for writing from before the store's commit until `apply` has mirrored the commit,
  so a search never sees the store and the index disagree within this process.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

FAISS_MAGIC = b"SHOPSEARCH-FAISS"  # 16 bytes, then <QQ generation, vector count, then faiss bytes
FAISS_HEADER = struct.Struct("<16sQQ")

# (generation, vector count, (pks int64, vectors float32) batches in pk order), from one consistent read
VectorSnapshot = tuple[int, int, Iterable[tuple[np.ndarray, np.ndarray]]]


class ReadWriteLock:
    """Many searches at once, or one writer changing the index."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (flock on `path`, created if missing; never replaced)."""
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _file_generation(path: Path) -> int | None:
    """The generation an index file is stamped with; None when missing or not ours."""
    try:
        with open(path, "rb") as f:
            magic, generation, _count = FAISS_HEADER.unpack(f.read(FAISS_HEADER.size))
    except (OSError, struct.error):
        return None
    return int(generation) if magic == FAISS_MAGIC else None


class AllowedIds:
    """The pks a filter allows (int64), and the faiss selector over them, built on first use: a holder
    that a cache can keep, so a repeated filter builds its selector once."""

    def __init__(self, pks: np.ndarray) -> None:
        self.pks = np.ascontiguousarray(pks, dtype=np.int64)
        self._selector: faiss.IDSelectorBatch | None = None

    @property
    def size(self) -> int:
        return int(self.pks.size)

    def selector(self) -> faiss.IDSelectorBatch:
        selector = self._selector
        if selector is None:  # two threads may both build one: either is right
            selector = self._selector = faiss.IDSelectorBatch(self.pks)
        return selector


def _sorted_hits(ids: Iterable[int], scores: Iterable[float]) -> list[tuple[int, float]]:
    hits = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if i >= 0]
    hits.sort(key=lambda h: (-h[1], h[0]))
    return hits


class VectorIndex:
    """Inner-product top-k over the store's vectors, by pk. Callers hold `lock` as each method says."""

    def __init__(
        self,
        path: Path,
        snapshot: Callable[[], AbstractContextManager[VectorSnapshot]],
        *,
        hnsw_threshold: int = 50_000,
        hnsw_m: int = 32,
        hnsw_ef_construction: int = 128,
        hnsw_ef_search: int = 128,
        exact_max: int = 20_000,
        save_interval_s: float = 30.0,
        save_every: int = 10_000,
    ) -> None:
        self.path = path
        self._snapshot = snapshot
        self.hnsw_threshold = hnsw_threshold
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construction = hnsw_ef_construction
        self.hnsw_ef_search = hnsw_ef_search
        self.exact_max = exact_max
        self.save_interval_s = save_interval_s
        self.save_every = save_every
        self.lock = ReadWriteLock()
        # guarded by `lock`
        self._index: faiss.Index | None = None
        self._kind: str | None = None
        self.generation = -1  # the store generation the in-memory index reflects
        self._dead: set[int] = set()
        self._dead_selector: tuple[faiss.IDSelectorBatch, faiss.IDSelectorNot] | None = None
        self._positions: tuple[np.ndarray, np.ndarray] | None = None  # HNSW exact path, see _exact_over
        self.unsaved = 0
        self._last_save = time.monotonic()

    # ------------------------------------------------------------------ state (read lock)

    @property
    def kind(self) -> str | None:
        """ "flat", "hnsw", or None when there is no index (no vectors)."""
        return self._kind

    @property
    def ntotal(self) -> int:
        """Vectors in the index, dead ones included."""
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def dead(self) -> int:
        return len(self._dead)

    # ------------------------------------------------------------------ building (write lock)

    def _new_index(self, dim: int, n_vectors: int) -> tuple[faiss.Index, str]:
        if n_vectors >= self.hnsw_threshold:
            hnsw = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = self.hnsw_ef_construction
            hnsw.hnsw.efSearch = self.hnsw_ef_search
            return faiss.IndexIDMap2(hnsw), "hnsw"
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), "flat"

    def reset(self) -> None:
        """Drop the in-memory index (it is rebuilt from the store on the next write or search)."""
        self._index, self._kind, self.generation = None, None, -1
        self._dead, self._dead_selector, self._positions = set(), None, None

    def rebuild(self) -> None:
        """Build the index from a snapshot of the store's vectors."""
        with self._snapshot() as (generation, n_vectors, batches):
            index: faiss.Index | None = None
            kind: str | None = None
            if n_vectors:
                for pks, vectors in batches:
                    if index is None:
                        index, kind = self._new_index(int(vectors.shape[1]), n_vectors)
                    index.add_with_ids(vectors, pks)
            self._index, self._kind = index, kind
        self._dead, self._dead_selector, self._positions = set(), None, None
        self.generation = generation
        self.unsaved = 1  # differs from the file (or there is no file yet)

    def open(self, generation: int, n_vectors: int, dim: int | None, live_pks: Callable[[], set[int]]) -> None:
        """Load vectors.faiss when it reflects the store (`generation`, `live_pks`), else rebuild and save."""
        with self.lock.write():
            if n_vectors == 0:
                self._index, self._kind, self.generation = None, None, generation
                self.path.unlink(missing_ok=True)
                return
            if self._try_load(generation, dim, live_pks):
                return
            log.info("rebuilding the vector index of %s from SQLite (%d vectors)", self.path.parent, n_vectors)
            self.rebuild()
            self.save()

    def _try_load(self, generation: int, dim: int | None, live_pks: Callable[[], set[int]]) -> bool:
        """Load vectors.faiss if it reflects exactly the store's current vectors."""
        try:
            with open(self.path, "rb") as f:
                magic, file_generation, _count = FAISS_HEADER.unpack(f.read(FAISS_HEADER.size))
                if magic != FAISS_MAGIC or file_generation != generation:
                    log.info(
                        "stale vector index in %s: generation %d, SQLite at %d",
                        self.path.parent,
                        file_generation,
                        generation,
                    )
                    return False
                index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        except FileNotFoundError:
            return False
        except (OSError, RuntimeError, struct.error) as exc:
            log.warning("vector index of %s is unreadable (%s); rebuilding", self.path.parent, exc)
            return False
        if not isinstance(index, faiss.IndexIDMap2) or index.d != dim:
            return False
        faiss_ids = set(faiss.vector_to_array(index.id_map).tolist())
        sql_ids = live_pks()
        kind = "hnsw" if isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW) else "flat"
        # a flat index holds exactly the store's vectors; an HNSW one may also hold dead (replaced) ids
        if not sql_ids <= faiss_ids or (kind == "flat" and faiss_ids != sql_ids):
            log.warning("vector index of %s disagrees with SQLite; rebuilding", self.path.parent)
            return False
        if kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = self.hnsw_ef_search
        self._index, self._kind, self.generation = index, kind, generation
        self._dead, self._dead_selector, self._positions = faiss_ids - sql_ids, None, None
        self.unsaved = 0
        return True

    def save(self) -> None:
        """Write the index atomically (tmp + fsync + rename), stamped with its generation.

        Processes sharing the store (`serve --workers N`) save one at a time, under a file lock beside
        the index, each through a tmp file of its own; a file stamped with a newer generation stays."""
        with _file_lock(self.path.with_name(self.path.name + ".lock")):
            on_disk = _file_generation(self.path)
            if on_disk is not None and on_disk > self.generation:
                self.unsaved = 0  # another process saved a later state; this one is derived again on open
                return
            if self._index is None:
                self.path.unlink(missing_ok=True)
                self.unsaved = 0
                return
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(FAISS_HEADER.pack(FAISS_MAGIC, self.generation, self._index.ntotal))
                faiss.write_index(self._index, faiss.PyCallbackIOWriter(f.write))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        self.unsaved = 0
        self._last_save = time.monotonic()

    def _maybe_save(self) -> None:
        due = time.monotonic() - self._last_save >= self.save_interval_s
        if self.unsaved and (self.unsaved >= self.save_every or due):
            self.save()

    def apply(self, removed: list[int], added_pks: list[int], added: np.ndarray | None, generation: int) -> None:
        """Mirror one committed write of the store (`generation`: the generation it committed)."""
        try:
            live = (self._index.ntotal - len(self._dead)) if self._index is not None else 0
            live_after = live - len(removed) + len(added_pks)
            needs_rebuild = (
                self._index is None
                or self.generation != generation - 1  # another process wrote in between
                or (self._kind == "flat" and live_after >= self.hnsw_threshold)
                or (self._kind == "hnsw" and live_after < self.hnsw_threshold // 2)
                or (self._kind == "hnsw" and len(self._dead) + len(removed) > 0.25 * max(live_after, 1))
            )
            if needs_rebuild:
                self.rebuild()
            else:
                assert self._index is not None
                if removed:
                    if self._kind == "flat":
                        self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(removed, dtype=np.int64)))
                    else:
                        self._dead.update(removed)
                        self._dead_selector = None
                if added_pks:
                    assert added is not None
                    self._index.add_with_ids(added, np.asarray(added_pks, dtype=np.int64))
                    self._positions = None
                self.generation = generation
                self.unsaved += len(removed) + len(added_pks)
        except Exception:
            # the store has committed; a half-applied change must not be served: rebuild on next use
            log.exception("updating the vector index failed; it will be rebuilt from SQLite")
            self._index, self.generation = None, -1
            return
        try:
            self._maybe_save()
        except OSError as exc:  # the in-memory index is right; a stale file is rebuilt on the next open
            log.warning("could not save the vector index of %s: %s", self.path.parent, exc)

    def catch_up(self, generation: int) -> None:
        """Rebuild when the index does not reflect `generation` (another process wrote, or a failed apply)."""
        if self.generation != generation:
            self.rebuild()

    # ------------------------------------------------------------------ search (read lock)

    def search(self, query: np.ndarray, allowed: np.ndarray | AllowedIds | None, n: int) -> list[tuple[int, float]]:
        """(pk, inner product) of the top n, best first, ties by pk; `allowed`: only these pks (int64)."""
        # one query gains nothing from OpenMP threads, and on a busy machine their spin-waits cost more
        # than the search itself: this thread searches alone (the setting is per thread, restored after)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self._search(query, allowed, n)
        finally:
            faiss.omp_set_num_threads(threads)

    def _search(self, query: np.ndarray, allowed: np.ndarray | AllowedIds | None, n: int) -> list[tuple[int, float]]:
        index = self._index
        if index is None or index.ntotal == 0:
            return []
        live = index.ntotal - len(self._dead)
        params: faiss.SearchParameters | None = None
        if allowed is not None:
            if not isinstance(allowed, AllowedIds):
                allowed = AllowedIds(allowed)
            if allowed.size == 0:
                return []
            k = min(n, allowed.size)
            if self._kind == "hnsw" and (allowed.size <= self.exact_max or allowed.size < 0.05 * live):
                return self._exact_over(query, allowed.pks, k)
            selector = allowed.selector()
            if self._kind == "hnsw":
                ef = max(self.hnsw_ef_search, k)
                ef = min(math.ceil(ef * live / allowed.size), 10 * ef)  # selective filter: look wider
                params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
            else:
                params = faiss.SearchParameters(sel=selector)
        else:
            k = min(n, live)
            if self._kind == "hnsw":
                params = faiss.SearchParametersHNSW(efSearch=max(self.hnsw_ef_search, k))
                if self._dead:
                    params.sel = self._exclude_dead()
        if k <= 0:
            return []
        scores, ids = index.search(query, k, params=params)
        return _sorted_hits(ids[0], scores[0])

    def _exclude_dead(self) -> faiss.IDSelectorNot:
        """A selector of every id but the dead ones, cached until the dead set changes."""
        cached = self._dead_selector
        if cached is None:
            # keep the inner selector referenced: IDSelectorNot does not own it
            inner = faiss.IDSelectorBatch(np.fromiter(self._dead, dtype=np.int64, count=len(self._dead)))
            cached = self._dead_selector = (inner, faiss.IDSelectorNot(inner))
        return cached[1]

    def _exact_over(self, query: np.ndarray, allowed: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Exact top-k over a filtered subset: brute force over the HNSW graph's own flat storage
        (no second copy of the vectors), restricted to the subset's positions."""
        assert self._index is not None
        if self._positions is None:  # pk of each position, and positions ordered by pk
            id_map = faiss.vector_to_array(self._index.id_map)
            self._positions = (id_map, np.argsort(id_map, kind="stable"))
        id_map, by_id = self._positions
        where = by_id[np.searchsorted(id_map, allowed, sorter=by_id).clip(0, len(by_id) - 1)]
        positions = where[id_map[where] == allowed]
        storage = faiss.downcast_index(faiss.downcast_index(self._index.index).storage)
        selector = faiss.IDSelectorBatch(positions.astype(np.int64))
        scores, found = storage.search(query, k, params=faiss.SearchParameters(sel=selector))
        return _sorted_hits((id_map[p] if p >= 0 else -1 for p in found[0]), scores[0])
