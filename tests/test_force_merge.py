"""`Backend.force_merge` on both backends: fewer segments, the same answers, writes still work."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from middleware.backends.base import Backend, BackendError, FacetSpec, MatchSet, WriterBusy
from middleware.backends.embedded import EmbeddedBackend, lexical
from middleware.products import Filters, Product, SignalUpdate
from tests.support.stores import SHARDS

REPO = Path(__file__).resolve().parents[1]
BATCHES = 4  # each written and searched on its own: one lexical commit, so one segment, each

WORDS = ["红色", "连衣裙", "手表", "皮鞋", "sneakers", "watch", "leather", "dress"]
BRANDS = ["Acme", "Borealis", "Cygnus"]


def product(i: int) -> Product:
    words = " ".join(WORDS[(i * k) % len(WORDS)] for k in (1, 3, 5))
    return Product(
        id=f"p{i:03d}",
        title=f"{words} {i % 7}",
        brand=BRANDS[i % len(BRANDS)],
        category=["apparel" if i % 2 else "shoes"],
        price=float(10 + i % 50),
        stock=i % 4,
        sales=i,
    )


def load_in_batches(backend: Backend, n: int = 120) -> None:
    size = n // BATCHES
    for start in range(0, n, size):
        backend.upsert([product(i) for i in range(start, start + size)], None)
        assert backend.count_matches(MatchSet(text="手表")) > 0  # searched: the batch is committed


def answers(backend: Backend) -> list[object]:
    out: list[object] = []
    for text, filters in (
        ("红色 手表", None),
        ("sneakers leather", Filters(brand=["Acme"])),
        ("连衣裙", Filters(price_max=30.0, in_stock=True)),
    ):
        found = [(c.id, round(c.bm25 or 0.0, 4)) for c in backend.bm25(text, filters, 200)]  # all: no tie crosses a cut
        out.append(sorted(found, key=lambda hit: (-hit[1], hit[0])))  # OpenSearch orders ties by segment
    match = MatchSet(text="手表 watch")
    out.append(backend.count_matches(match))
    out.append(backend.facets(match, [FacetSpec(field="brand", size=5)]))
    return out


def test_a_merge_keeps_every_answer_and_leaves_fewer_segments(empty_store: Backend) -> None:
    load_in_batches(empty_store)
    before_answers = answers(empty_store)
    before, after = empty_store.force_merge()
    assert after <= before
    assert after <= SHARDS  # one segment (per shard), or none on an empty shard
    assert answers(empty_store) == before_answers
    assert empty_store.force_merge()[1] == after  # a second merge has nothing to do


def test_writes_after_a_merge_are_searchable(empty_store: Backend) -> None:
    load_in_batches(empty_store)
    empty_store.force_merge()
    empty_store.upsert([Product(id="new", title="珐琅 手表 礼物", brand="Acme", price=99.0)], None)
    empty_store.delete(["p001"])
    assert [c.id for c in empty_store.bm25("珐琅", None, 5)] == ["new"]
    assert "p001" not in {c.id for c in empty_store.bm25(product(1).title, None, 200)}
    assert empty_store.get(["new", "p001"])[0].id == "new"


def test_an_empty_store_merges_to_nothing(empty_store: Backend) -> None:
    before, after = empty_store.force_merge()
    assert after <= before <= 1


# ------------------------------------------------------------------ embedded only


def test_embedded_merge_makes_one_segment(tmp_path: Path) -> None:
    from middleware.backends.embedded import EmbeddedBackend

    with EmbeddedBackend(tmp_path / "data") as store:
        load_in_batches(store)
        before, after = store.force_merge()
        assert before >= 2
        assert after == 1
        assert store.lexical.stamped_generation() == store.lexical.generation


def test_after_a_merge_deleted_products_no_longer_weigh_in_the_scores(tmp_path: Path) -> None:
    """Until a merge, a deleted product still counts in BM25's term statistics (as in Lucene);
    merged, the store scores exactly as one loaded without it."""
    from middleware.backends.embedded import EmbeddedBackend

    gone = [f"p{i:03d}" for i in range(0, 120, 3)]
    with EmbeddedBackend(tmp_path / "fresh") as fresh:
        fresh.upsert([p for p in map(product, range(120)) if p.id not in gone], None)
        want = answers(fresh)
    with EmbeddedBackend(tmp_path / "data") as store:
        load_in_batches(store)
        store.delete(gone)
        assert answers(store) != want
        store.force_merge()
        assert answers(store) == want


_WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
from middleware.backends.embedded import EmbeddedBackend
from tests.test_force_merge import load_in_batches

with EmbeddedBackend(sys.argv[2]) as store:
    if sys.argv[3] == "load":
        load_in_batches(store)
    print(store.lexical.owns_writer, store.lexical._searcher().num_segments, flush=True)
    sys.stdin.readline()  # holds the writer until told
    print(store.lexical._searcher().num_segments, flush=True)
"""


@contextlib.contextmanager
def writer_process(data_dir: Path, *, load: bool = True) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Another process owning the store's writer (as `shopsearch serve` does), loaded in several
    lexical commits when `load`; (the process, its segment count)."""
    args = [sys.executable, "-c", _WRITER, str(REPO), str(data_dir), "load" if load else "hold"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        owns, segments = proc.stdout.readline().split()
        assert owns == "True"
        yield proc, int(segments)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(30)


def finish(proc: subprocess.Popen[str]) -> int:
    """Let a `writer_process` end; the segment count it saw last."""
    out, _ = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
    return int(out.split()[-1])


def test_embedded_merge_asked_in_a_process_without_the_writer_is_run_by_the_writer(tmp_path: Path) -> None:
    """`shopsearch force-merge` (or a second server worker) while `shopsearch serve` writes the store:
    the serving process merges, and the asking one gets its figures and sees the merged index."""
    with writer_process(tmp_path) as (writer, segments):
        assert segments >= 2
        with EmbeddedBackend(tmp_path) as other:
            assert not other.lexical.owns_writer
            before_answers = answers(other)
            assert other.force_merge() == (segments, 1)
            assert other.lexical._searcher().num_segments == 1  # reloaded before returning
            assert answers(other) == before_answers
            assert not any((tmp_path / lexical.MERGE_HANDOFF_DIR / "done").iterdir())  # the answer was collected
        assert finish(writer) == 1


def test_embedded_merge_asked_of_a_stopped_writer_is_refused_by_name_and_withdrawn(tmp_path: Path) -> None:
    with writer_process(tmp_path) as (writer, segments):
        os.kill(writer.pid, signal.SIGSTOP)
        with (
            EmbeddedBackend(tmp_path, merge_take_s=0.3) as other,
            pytest.raises(WriterBusy, match=r"did not start the merge within 0.3 s"),
        ):
            other.force_merge()
        assert not any((tmp_path / lexical.MERGE_HANDOFF_DIR / "pending").iterdir())
        os.kill(writer.pid, signal.SIGCONT)
        time.sleep(0.5)  # ten of its poller's rounds: a request left behind would be merged by now
        assert finish(writer) == segments


def test_a_merge_that_cannot_be_asked_is_an_error_by_name(tmp_path: Path) -> None:
    with writer_process(tmp_path, load=False) as (writer, _):
        (tmp_path / lexical.MERGE_HANDOFF_DIR).write_text("not a folder")  # the request cannot be written
        with EmbeddedBackend(tmp_path) as other, pytest.raises(BackendError, match="cannot ask the process writing"):
            other.force_merge()
        assert finish(writer) == 0  # an empty store: no segment, nothing merged


def test_a_merge_asked_of_a_writer_that_dies_is_run_by_the_next_writer(tmp_path: Path) -> None:
    """The writer is killed before it takes the request: the asking process takes the writer over
    (the flock dies with its holder) and runs the merge it asked for."""
    with writer_process(tmp_path) as (writer, _):
        os.kill(writer.pid, signal.SIGSTOP)
        with EmbeddedBackend(tmp_path, merge_take_s=60) as other:
            merged: list[tuple[int, int]] = []
            asking = threading.Thread(target=lambda: merged.append(other.force_merge()))
            asking.start()
            time.sleep(0.2)
            assert asking.is_alive() and not merged
            writer.kill()
            writer.wait(30)
            asking.join(60)
            assert merged and merged[0][1] == 1 and other.lexical.owns_writer
            assert other.count() == 120


def test_embedded_merge_is_durable_across_a_reopen(tmp_path: Path) -> None:
    from middleware.backends.embedded import EmbeddedBackend

    with EmbeddedBackend(tmp_path / "data") as store:
        load_in_batches(store)
        store.force_merge()
        kept = answers(store)
    with EmbeddedBackend(tmp_path / "data") as store:
        assert store.lexical._searcher().num_segments == 1
        assert answers(store) == kept


def test_embedded_writes_during_a_merge_do_not_wait_and_land_in_it(tmp_path: Path) -> None:
    """The merge's rewrite is held midway while this process writes and searches: the writes return
    at once, searches answer from the segments before, and the merged index holds the writes."""
    from middleware.backends.embedded import EmbeddedBackend

    with EmbeddedBackend(tmp_path / "data") as store:
        load_in_batches(store)
        lex = store.lexical
        held, release = threading.Event(), threading.Event()
        document, seen = lex._document, []

        def holding(row: object) -> object:
            seen.append(row)
            if lex._merging and len(seen) == 50:  # part of the rewrite done, uncommitted
                held.set()
                release.wait(30)
            return document(row)

        lex._document = holding
        merged: list[tuple[int, int]] = []
        merging = threading.Thread(target=lambda: merged.append(store.force_merge()))
        merging.start()
        try:
            assert held.wait(30)
            store.upsert([Product(id="new", title="珐琅 手表 礼物", brand="Acme", price=99.0)], None)
            store.upsert([product(2).model_copy(update={"title": "景泰蓝 花瓶"})], None)
            store.delete(["p001"])
            store.update_signals([SignalUpdate(id="p003", stock=0)])
            with EmbeddedBackend(tmp_path / "data") as other:  # a second process's view: not the writer
                assert not other.lexical.owns_writer
                other.upsert([Product(id="other", title="琉璃 摆件", brand="Cygnus", price=12.0)], None)
            assert not release.is_set() and merging.is_alive()  # every write returned while the merge was held
            assert store.bm25("珐琅", None, 5) == []  # searchable once the merge ends
            # a deleted product is gone at once: hits are read back from SQLite
            assert "p001" not in {c.id for c in store.bm25(product(1).title, None, 200)}
        finally:
            release.set()
            merging.join(60)
        lex._document = document
        assert merged and merged[0][0] >= 2 and merged[0][1] == 1
        assert [c.id for c in store.bm25("珐琅", None, 5)] == ["new"]
        assert [c.id for c in store.bm25("景泰蓝", None, 5)] == ["p002"]
        assert [c.id for c in store.bm25("琉璃", None, 5)] == ["other"]
        assert "p002" not in {c.id for c in store.bm25(product(2).title, None, 200)}
        assert "p001" not in {c.id for c in store.bm25(product(1).title, None, 200)}
        assert "p003" not in {c.id for c in store.bm25(product(3).title, Filters(in_stock=True), 200)}
        assert store.count_matches(MatchSet()) == lex.num_docs() == 121  # 120 loaded, two added, one deleted
        assert lex._searcher().num_segments == 1  # the writes went into the merge's one commit


def test_embedded_merge_killed_midway_leaves_the_index_as_it_was(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from middleware.backends.embedded import EmbeddedBackend, lexical
        from tests.test_force_merge import load_in_batches

        sync = lexical.TantivyLexicalIndex._sync

        def dying_sync(self, generation, *, rebuild=False):
            if rebuild:  # the merge's rewrite: die with part of it written, uncommitted
                document, written = self._document, []

                def dying(row):
                    written.append(row.pk)
                    if len(written) == 50:
                        os._exit(9)  # no commit, no close: what SIGKILL leaves
                    return document(row)

                self._document = dying
            return sync(self, generation, rebuild=rebuild)

        lexical.TantivyLexicalIndex._sync = dying_sync
        store = EmbeddedBackend({str(tmp_path)!r})
        load_in_batches(store)
        store.force_merge()
        """
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120, cwd=REPO).returncode == 9
    with EmbeddedBackend(tmp_path) as store:
        assert store.count() == 120
        assert store.lexical._searcher().num_segments >= 2  # the segments before the merge, all there
        expected = sorted(f"p{i:03d}" for i in range(120) if "手表" in product(i).title)
        assert sorted(c.id for c in store.bm25("手表", None, 200)) == expected
        assert store.force_merge()[1] == 1
        assert sorted(c.id for c in store.bm25("手表", None, 200)) == expected
