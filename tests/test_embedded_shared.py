"""Two embedded backends over one data directory, as two `serve --workers` processes hold it: each one
sees the other's writes (BM25 and kNN), and the saved vector index is never replaced by an older one."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from middleware.backends.embedded import EmbeddedBackend
from middleware.backends.embedded.vectors import _file_generation
from middleware.products import Product


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def eventually(check: Callable[[], bool], within_s: float = 1.0) -> None:
    """The lexical index of a backend that does not own its writer shows another's writes once the
    owner commits (its poll and commit intervals): well within a second."""
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "not visible within the interval"
        time.sleep(0.01)


def test_a_backend_sees_the_first_vectors_another_wrote_into_an_empty_store(tmp_path: Path) -> None:
    a, b = EmbeddedBackend(tmp_path), EmbeddedBackend(tmp_path)  # both opened while empty: no dimension yet
    try:
        vectors = _unit(3, 8, seed=1)
        a.upsert([Product(id=f"p{i}", title=f"蓝牙耳机 {i}") for i in range(3)], vectors)
        assert [c.id for c in b.knn(vectors[2], None, 1)] == ["p2"]
        eventually(lambda: {c.id for c in b.bm25("蓝牙耳机", None, 10)} == {"p0", "p1", "p2"})
        b.upsert([Product(id="q", title="保温杯")], _unit(1, 8, seed=2))  # b now knows the dimension too
        assert [c.id for c in a.knn(_unit(1, 8, seed=2)[0], None, 1)] == ["q"]
        a.delete(["p2"])
        assert "p2" not in {c.id for c in b.knn(vectors[2], None, 10)}
    finally:
        a.close()
        b.close()


def test_the_saved_vector_index_is_never_replaced_by_an_older_generation(tmp_path: Path) -> None:
    a, b = EmbeddedBackend(tmp_path), EmbeddedBackend(tmp_path)
    try:
        a.upsert([Product(id="p1", title="手表")], _unit(1, 4, seed=3))
        b.knn(_unit(1, 4, seed=3)[0], None, 1)  # b catches up: its index reflects generation 1
        a.upsert([Product(id="p2", title="耳机")], _unit(1, 4, seed=4))
        a.flush()
        saved = _file_generation(tmp_path / "vectors.faiss")
        assert saved == a.store.generation() == 2
        b.vectors.save()  # b is one write behind
        assert _file_generation(tmp_path / "vectors.faiss") == 2
        assert not list(tmp_path.glob("*.tmp"))
    finally:
        a.close()
        b.close()
    reopened = EmbeddedBackend(tmp_path)
    try:
        assert {c.id for c in reopened.knn(_unit(1, 4, seed=4)[0], None, 2)} == {"p1", "p2"}
    finally:
        reopened.close()
