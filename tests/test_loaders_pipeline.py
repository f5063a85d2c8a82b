"""The indexing pipeline and the loader CLI on the embedded store, with a tiny real embedder."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loaders.checkpoint import Checkpoint
from loaders.embed_cache import EmbeddingCache
from loaders.indexer import Indexer
from loaders.report import Progress
from loaders.sources import read_rows
from loaders.validate import DeadLetters
from middleware.backends.embedded import DB_NAME, EmbeddedBackend
from middleware.cli import main
from middleware.products import Product
from tests.test_loaders_sources import BAD_CATALOG_LINES, EXPECTED_REJECTS

REPO = Path(__file__).resolve().parents[1]


class CountingEmbedder:
    """A real Embedder, wrapped to record which texts reach the model."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.texts: list[str] = []
        self.calls = 0

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        self.texts.extend(texts)
        return self.inner.encode_documents(texts)


@pytest.fixture(scope="module")
def real_embedder(tiny_embedder_dir: Path, model_cache_dir: Path) -> Any:
    from middleware.models import Embedder

    return Embedder(str(tiny_embedder_dir), cache_dir=model_cache_dir)


@pytest.fixture
def embedder(real_embedder: Any) -> CountingEmbedder:
    return CountingEmbedder(real_embedder)


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tiny_embedder_dir: Path, model_cache_dir: Path, tmp_path: Path) -> Path:
    """Environment for in-process CLI runs: the tiny model, a private model cache and data dir."""
    for key in list(os.environ):
        if key.startswith("SHOPSEARCH_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SHOPSEARCH_EMBEDDER", str(tiny_embedder_dir))
    monkeypatch.setenv("SHOPSEARCH_RERANKER", "none")
    monkeypatch.setenv("SHOPSEARCH_MODEL_CACHE_DIR", str(model_cache_dir))
    data_dir = tmp_path / "store"
    monkeypatch.setenv("SHOPSEARCH_DATA_DIR", str(data_dir))
    return data_dir


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def catalog(n: int, *, start: int = 0, suffix: str = "") -> list[dict[str, Any]]:
    brands = ["欧米茄", "卡西欧", "天梭", "华为", "小米"]
    return [
        {
            "id": f"p{i}",
            "title": f"{brands[i % 5]} 手表 型号 {i}{suffix}",
            "description": f"第 {i} 款 礼盒装",
            "brand": brands[i % 5],
            "category": "手表",
            "price": 100 + i,
            "sales": i * 3,
            "stock": i % 4,
        }
        for i in range(start, start + n)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def stored_rows(data_dir: Path) -> dict[str, tuple[int, bytes | None]]:
    """id → (SQLite rowid, vector blob): a rewrite gets a new rowid, so equal rowids mean untouched."""
    with sqlite3.connect(data_dir / DB_NAME) as conn:
        return {pid: (pk, vec) for pk, pid, vec in conn.execute("SELECT pk, id, vector FROM products")}


def run_index(
    path: Path, data_dir: Path, embedder: Any, *, batch_size: int = 16, **kw: Any
) -> tuple[Any, EmbeddedBackend]:
    backend = EmbeddedBackend(data_dir, dim=embedder.dim if embedder else None)
    cache = EmbeddingCache(data_dir / "cache.sqlite", embedder.model_id, embedder.dim) if embedder else None
    try:
        summary = Indexer(embedder, cache=cache, batch_size=batch_size).index(
            read_rows(str(path), "jsonl"), backend, dead_letters=DeadLetters(data_dir / "dead.jsonl"), **kw
        )
    finally:
        if cache:
            cache.close()
    return summary, backend


# ------------------------------------------------------------------------------------------ library level


def test_reindex_skips_unchanged_and_embeds_only_changed_text(tmp_path: Path, embedder: CountingEmbedder) -> None:
    data_dir = tmp_path / "store"
    source = write_jsonl(tmp_path / "c.jsonl", catalog(60))
    summary, backend = run_index(source, data_dir, embedder)
    backend.close()
    assert (summary.indexed, summary.updated, summary.unchanged, summary.rejected) == (60, 0, 0, 0)
    assert summary.embedded == 60 and embedder.calls >= 1
    before = stored_rows(data_dir)
    assert all(vec is not None for _, vec in before.values())

    embedder.texts.clear()
    embedder.calls = 0
    summary, backend = run_index(source, data_dir, embedder)  # the same file again
    backend.close()
    assert (summary.indexed, summary.updated, summary.unchanged) == (0, 0, 60)
    assert embedder.calls == 0 and summary.embedded == 0  # the model was never called
    assert stored_rows(data_dir) == before  # same rowids and vectors: nothing rewritten

    rows = catalog(60)
    for i in (3, 17, 42):
        rows[i]["title"] += " 新款"
    rows[5]["price"] = 1.5  # a signal-only change: applied in place, no embedding
    rows[6]["brand"] = "天梭"  # content changed but the embedded text did not: cache hit, no model call
    write_jsonl(source, rows)
    summary, backend = run_index(source, data_dir, embedder)
    assert (summary.indexed, summary.updated, summary.unchanged) == (0, 5, 55)
    assert sorted(embedder.texts) == sorted(rows[i]["title"] + "\n" + rows[i]["description"] for i in (3, 17, 42))
    assert summary.cache_hits == 1 and summary.embedded == 3
    after = stored_rows(data_dir)
    assert after["p5"] == before["p5"]  # signal update: same row, same vector
    assert backend.get(["p5"])[0].price == 1.5
    assert after["p3"][0] != before["p3"][0] and after["p3"][1] != before["p3"][1]
    assert after["p6"][1] == before["p6"][1]  # the cached vector of the unchanged text
    backend.close()

    embedder.texts.clear()
    write_jsonl(source, catalog(60))  # revert the titles: every text was embedded before
    summary, backend = run_index(source, data_dir, embedder)
    backend.close()
    assert embedder.texts == [] and summary.cache_hits == 4 and summary.updated == 5  # p5: signals only
    reverted = stored_rows(data_dir)
    assert reverted["p3"][1] == before["p3"][1]  # the same vector as the first run, from the cache


def test_embedding_cache_is_per_model_and_exact_text(tmp_path: Path, embedder: CountingEmbedder) -> None:
    texts = ["卡西欧 手表", "卡西欧 手表", "卡西欧 手表 "]  # a repeat, and a different text (trailing space)
    cache = EmbeddingCache(tmp_path / "c.sqlite", embedder.model_id, embedder.dim)
    vectors, hits = cache.encode(embedder, texts)
    assert hits == 0 and embedder.texts == ["卡西欧 手表", "卡西欧 手表 "] and cache.count() == 2
    again, hits = cache.encode(embedder, texts[:1])
    assert hits == 1 and len(embedder.texts) == 2 and np.array_equal(again[0], vectors[0])
    cache.close()
    other = EmbeddingCache(tmp_path / "c.sqlite", "another-model", embedder.dim)
    assert other.get_many([]) == {} and other.count() == 0  # another model's vectors are never served
    other.close()


def test_duplicate_ids_are_updates_last_row_wins(tmp_path: Path, embedder: CountingEmbedder) -> None:
    rows = catalog(40)
    rows.append({**rows[2], "title": "same batch? no: a later batch"})
    rows.insert(5, {**rows[4], "title": "superseded in its batch"})  # rows 4 and 5 share an id
    rows.insert(6, {**rows[4], "title": "p4 final"})
    source = write_jsonl(tmp_path / "c.jsonl", rows)
    summary, backend = run_index(source, tmp_path / "store", embedder, batch_size=16)
    assert backend.count() == 40
    assert backend.get(["p4"])[0].title == "p4 final"
    assert backend.get(["p2"])[0].title == "same batch? no: a later batch"
    assert summary.duplicates == 2 and summary.indexed == 40 and summary.updated == 1
    assert summary.read == summary.indexed + summary.updated + summary.unchanged + summary.duplicates
    backend.close()


class FailingBackend(EmbeddedBackend):
    """The real store, failing its k-th upsert as a crash would: nothing of that batch is committed."""

    fail_at = 3

    def upsert(self, products: Sequence[Product], vectors: np.ndarray | None) -> None:
        self.fail_at -= 1
        if self.fail_at == 0:
            raise OSError("disk unplugged")
        super().upsert(products, vectors)


def test_resume_after_failure_loses_and_duplicates_nothing(tmp_path: Path, embedder: CountingEmbedder) -> None:
    data_dir = tmp_path / "store"
    rows = catalog(100)
    source = write_jsonl(tmp_path / "c.jsonl", rows)
    checkpoint = Checkpoint(data_dir / "checkpoints", str(source))
    backend = FailingBackend(data_dir, dim=embedder.dim)
    with pytest.raises(OSError, match="disk unplugged"):
        Indexer(embedder, batch_size=10).index(
            read_rows(str(source), "jsonl"),
            backend,
            dead_letters=DeadLetters(data_dir / "dead.jsonl"),
            checkpoint=checkpoint,
        )
    assert backend.count() == 20
    backend.close()
    state = checkpoint.load()
    assert state is not None and state["last_line"] == 20 and state["counts"]["indexed"] == 20

    embedder.texts.clear()
    backend = EmbeddedBackend(data_dir, dim=embedder.dim)
    summary = Indexer(embedder, batch_size=10).index(
        read_rows(str(source), "jsonl"),
        backend,
        dead_letters=DeadLetters(data_dir / "dead.jsonl"),
        checkpoint=checkpoint,
        resume_state=state,
        progress=Progress("indexing", stream=(log := io.StringIO()), every_s=0.0),
    )
    # progress lines count the rows the first attempt committed too, as the counts beside them do
    last = log.getvalue().splitlines()[-1]
    assert last.startswith("indexing: 100 rows (") and last.endswith(", indexed 100, updated 0, rejected 0")
    assert sorted(backend.iter_ids()) == sorted(r["id"] for r in rows) and backend.count() == 100
    assert summary.indexed == 100 and summary.read == 100 and summary.resumed_from_line == 20
    assert len(embedder.texts) == 80  # rows 21..100 only
    assert checkpoint.load() is None  # a complete run clears its checkpoint
    backend.close()


def test_resumed_prune_keeps_products_committed_before_the_crash(tmp_path: Path) -> None:
    data_dir = tmp_path / "store"
    backend = EmbeddedBackend(data_dir)
    backend.upsert([Product(id="gone", title="下架商品")], None)  # not in the snapshot
    backend.close()
    source = write_jsonl(tmp_path / "c.jsonl", catalog(50))
    checkpoint = Checkpoint(data_dir / "checkpoints", str(source))
    failing = FailingBackend(data_dir)
    with pytest.raises(OSError):
        Indexer(None, batch_size=10).index(
            read_rows(str(source), "jsonl"),
            failing,
            dead_letters=DeadLetters(data_dir / "dead.jsonl"),
            checkpoint=checkpoint,
            prune=True,
        )
    failing.close()
    backend = EmbeddedBackend(data_dir)
    assert backend.count() == 21  # nothing pruned by the failed run
    summary = Indexer(None, batch_size=10).index(
        read_rows(str(source), "jsonl"),
        backend,
        dead_letters=DeadLetters(data_dir / "dead.jsonl"),
        checkpoint=checkpoint,
        resume_state=checkpoint.load(),
        prune=True,
    )
    # the rows skipped on resume still count as present in the snapshot: only "gone" is deleted
    assert summary.deleted == 1 and summary.resumed_from_line == 20
    assert sorted(backend.iter_ids()) == sorted(f"p{i}" for i in range(50))
    backend.close()


def test_bm25_only_indexing_without_embedder(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", catalog(10))
    summary, backend = run_index(source, tmp_path / "store", None)
    stats = backend.stats()
    assert summary.indexed == 10 and stats.products == 10 and stats.vectors == 0
    assert backend.bm25("卡西欧 手表", None, 3)
    backend.close()


# ------------------------------------------------------------------------------------------ CLI


def test_cli_bad_rows_go_to_dead_letters_and_exit_3(
    tmp_path: Path, cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join(BAD_CATALOG_LINES) + "\n", encoding="utf-8")
    dead = tmp_path / "dead.jsonl"
    report = tmp_path / "report.json"
    code, out, err = run_cli(capsys, "index", str(source), "--dead-letter", str(dead), "--report", str(report))
    assert code == 3, err
    records = [json.loads(line) for line in dead.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in records] == sorted(EXPECTED_REJECTS)
    for record in records:
        assert EXPECTED_REJECTS[record["line"]] in record["reason"]
        assert record["raw"] == BAD_CATALOG_LINES[record["line"] - 1]
    summary = json.loads(report.read_text())
    assert (summary["read"], summary["indexed"], summary["rejected"]) == (13, 2, 11)
    assert "rejected 11" in out
    code, out, _ = run_cli(capsys, "stats", "--json")
    stats = json.loads(out)
    assert code == 0 and stats["products"] == 2 and stats["vectors"] == 2
    assert stats["dim"] > 0 and stats["embedder"] and stats["last_index_run"]["rejected"] == 11


def test_cli_clean_csv_gbk_with_mapping_exits_0(
    tmp_path: Path, cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "gbk.csv"
    source.write_bytes("sku,name,sold\nc1,天梭 男士 机械表,5\nc2,小米 手表,7\n".encode("gbk"))
    code, out, err = run_cli(
        capsys, "index", str(source), "--encoding", "gbk", "--map", "id=sku,title=name,sales=sold", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["indexed"] == 2
    backend = EmbeddedBackend(cli_env)
    assert [(p.title, p.sales) for p in backend.get(["c1", "c2"])] == [("天梭 男士 机械表", 5), ("小米 手表", 7)]
    backend.close()
    assert not (cli_env / "dead-letters").exists()  # no rejects, no dead-letter file


def test_cli_parquet_and_stdin(
    tmp_path: Path, cli_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(catalog(30)), path)
    code, _, err = run_cli(capsys, "index", str(path))
    assert code == 0, err
    stdin = io.TextIOWrapper(io.BytesIO('{"id": "s1", "title": "stdin 手表"}\n'.encode()), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, err = run_cli(capsys, "index", "-", "--json")
    assert code == 0, err
    assert json.loads(out)["indexed"] == 1
    backend = EmbeddedBackend(cli_env)
    assert backend.count() == 31 and backend.stats().vectors == 31
    backend.close()


def test_cli_update_signals_leaves_text_and_vectors(
    tmp_path: Path, cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "index", str(write_jsonl(tmp_path / "c.jsonl", catalog(20))))[0] == 0
    before = stored_rows(cli_env)
    changes = tmp_path / "changes.csv"
    changes.write_text("id,price,stock,sold\np1,9.5,,\np2,,0,100\nnope,1,,\np3,-1,,\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "update-signals", str(changes), "--map", "sales=sold", "--json")
    assert code == 3, err  # one unknown id, one bad row
    summary = json.loads(out)
    assert (summary["updated"], summary["not_found"], summary["rejected"]) == (2, 1, 1)
    dead = [json.loads(line) for line in Path(summary["dead_letter_path"]).read_text().splitlines()]
    assert [(d["line"], d["reason"].split(":")[0]) for d in dead] == [(4, "no product with id 'nope'"), (5, "price")]
    backend = EmbeddedBackend(cli_env)
    p1, p2 = backend.get(["p1", "p2"])
    assert (p1.price, p1.stock, p1.title) == (9.5, 1, catalog(20)[1]["title"])
    assert (p2.price, p2.stock, p2.sales) == (102, 0, 100)
    backend.close()
    assert stored_rows(cli_env) == before  # same rows, same vector bytes


def test_cli_prune_refused_on_rejects_then_forced(
    tmp_path: Path, cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "index", str(write_jsonl(tmp_path / "full.jsonl", catalog(10))))[0] == 0
    snapshot = catalog(7)
    snapshot[6] = {"id": "p6", "title": ""}  # malformed, though p6 is still on sale
    path = write_jsonl(tmp_path / "snap.jsonl", snapshot)
    code, out, err = run_cli(capsys, "index", str(path), "--prune", "--json")
    assert code == 3 and "prune refused" in err
    assert json.loads(out)["deleted"] == 0
    backend = EmbeddedBackend(cli_env)
    assert backend.count() == 10
    backend.close()
    code, out, _ = run_cli(capsys, "index", str(path), "--prune", "--force-prune", "--json")
    assert code == 3 and json.loads(out)["deleted"] == 4  # p6..p9
    backend = EmbeddedBackend(cli_env)
    assert sorted(backend.iter_ids()) == [f"p{i}" for i in range(6)]
    backend.close()
    path = write_jsonl(tmp_path / "snap2.jsonl", catalog(3))
    code, out, _ = run_cli(capsys, "index", str(path), "--prune", "--json")
    assert code == 0 and json.loads(out)["deleted"] == 3


def test_cli_delete_by_ids_and_file(tmp_path: Path, cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "index", str(write_jsonl(tmp_path / "c.jsonl", catalog(6))))[0] == 0
    code, out, _ = run_cli(capsys, "delete", "--ids", "p0,p1,missing", "--json")
    assert code == 0 and json.loads(out) == {"requested": 3, "deleted": 2, "not_found": 1}
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("p2\n\np3\n")
    code, out, _ = run_cli(capsys, "delete", "--ids-file", str(ids_file), "--json")
    assert json.loads(out)["deleted"] == 2
    backend = EmbeddedBackend(cli_env)
    assert sorted(backend.iter_ids()) == ["p4", "p5"]
    backend.close()


def test_cli_idempotent_rerun(tmp_path: Path, cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", catalog(25))
    first = run_cli(capsys, "index", str(source), "--json", "--batch-size", "8")
    stored = stored_rows(cli_env)
    second = run_cli(capsys, "index", str(source), "--json", "--batch-size", "8")
    assert first[0] == second[0] == 0
    assert json.loads(second[1])["unchanged"] == 25
    assert stored_rows(cli_env) == stored


def test_cli_usage_and_fatal_exit_codes(tmp_path: Path, cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", catalog(2))
    assert run_cli(capsys, "index", str(tmp_path / "missing.jsonl"))[0] == 2
    code, _, err = run_cli(capsys, "index", str(source), "--map", "titel=name")
    assert code == 2 and "titel" in err
    (tmp_path / "c.txt").write_text(json.dumps(catalog(1)[0]))
    assert run_cli(capsys, "index", str(tmp_path / "c.txt"))[0] == 2  # unknown extension, no --format
    assert run_cli(capsys, "index", "-", "--resume")[0] == 2
    assert run_cli(capsys, "index", str(source), "--force-prune")[0] == 2
    assert run_cli(capsys, "index", str(source), "--encoding", "klingon")[0] == 2
    assert run_cli(capsys, "delete")[0] == 2
    code, _, err = run_cli(capsys, "index", str(source), "--embedder", str(tmp_path / "no-such-model"))
    assert code == 1 and "no-such-model" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "index", str(source), "--embedder", "none", "--json")
    assert code == 0 and json.loads(out)["embedded"] == 0
    code, _, err = run_cli(capsys, "index", str(source))  # the store is BM25-only now: no mixing
    assert code == 1 and "cannot be mixed" in err


def test_cli_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["index", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "exit codes" in out and "--force-prune" in out and "3  some rows were rejected" in out


# ------------------------------------------------------------------------------------------ kill -9

_KILLER = """
import os, signal, sys
from loaders import checkpoint

calls = 0
original = checkpoint.Checkpoint.save

def save_then_die(self, state):
    global calls
    calls += 1
    if calls == int(os.environ["KILL_AT_SAVE"]):
        # batch committed to the store, its checkpoint not yet written: the worst moment
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, state)

checkpoint.Checkpoint.save = save_then_die
from middleware.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a subprocess that loads the model
def test_kill_9_mid_run_then_resume(tmp_path: Path, cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = catalog(90)
    rows[40] = {"id": "p40", "title": ""}  # a reject in a checkpointed batch
    rows[64] = {"id": "p64", "price": 3}  # a reject in the batch committed but never checkpointed
    source = write_jsonl(tmp_path / "c.jsonl", rows)
    env = {**os.environ, "KILL_AT_SAVE": "4", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, "index", str(source), "--batch-size", "20", "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    backend = EmbeddedBackend(cli_env)
    assert backend.count() == 78  # four batches committed (two rejects), the fourth never checkpointed
    backend.close()
    code, out, err = run_cli(capsys, "index", str(source), "--batch-size", "20", "--resume", "--json")
    assert code == 3, err
    summary = json.loads(out)
    assert summary["resumed_from_line"] == 60
    assert summary["rejected"] == 2 and summary["read"] == 90
    backend = EmbeddedBackend(cli_env)
    ids = list(backend.iter_ids())
    assert len(ids) == len(set(ids)) == 88 and backend.stats().vectors == 88
    backend.close()
    dead = Path(summary["dead_letter_path"]).read_text().splitlines()
    assert [json.loads(d)["line"] for d in dead] == [41, 65]  # each once, though line 65 was rejected twice


def test_cli_prune_refuses_empty_snapshots_and_mass_deletes(
    tmp_path: Path, cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "index", str(write_jsonl(tmp_path / "full.jsonl", catalog(10))))[0] == 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    header_only = tmp_path / "header.csv"
    header_only.write_text("id,title,price\n")
    for path in (empty, header_only):
        for extra in ([], ["--force-prune"]):  # an empty snapshot is refused even when forced
            code, out, err = run_cli(capsys, "index", str(path), "--prune", "--json", *extra)
            assert code == 4
            assert json.loads(out)["deleted"] == 0
            lines = [line for line in err.splitlines() if line.startswith("shopsearch:")]
            assert lines == [
                "shopsearch: prune refused: the snapshot holds no valid product (an empty or header-only file?): "
                "pruning would delete all 10 stored products; refused even with --force-prune"
            ]
    backend = EmbeddedBackend(cli_env)
    assert backend.count() == 10
    backend.close()

    partial = write_jsonl(tmp_path / "partial.jsonl", catalog(4))  # would delete 6 of 10
    code, out, err = run_cli(capsys, "index", str(partial), "--prune", "--json")
    assert code == 4 and json.loads(out)["deleted"] == 0
    assert "would delete 6 of 10 stored products (60%), more than the allowed 50%" in err
    code, out, _ = run_cli(capsys, "index", str(partial), "--prune", "--max-prune-share", "0.6", "--json")
    assert code == 0 and json.loads(out)["deleted"] == 6  # a higher share allows it
    assert run_cli(capsys, "index", str(write_jsonl(tmp_path / "full.jsonl", catalog(10))))[0] == 0
    code, out, _ = run_cli(capsys, "index", str(partial), "--prune", "--force-prune", "--json")
    assert code == 0 and json.loads(out)["deleted"] == 6
    backend = EmbeddedBackend(cli_env)
    assert sorted(backend.iter_ids()) == [f"p{i}" for i in range(4)]
    backend.close()
    code, _, err = run_cli(capsys, "index", str(partial), "--prune", "--max-prune-share", "1.5")
    assert code == 2 and "--max-prune-share must be between 0 and 1" in err


def test_multi_megabyte_fields_are_bounded_and_reported(tmp_path: Path, embedder: CountingEmbedder) -> None:
    from middleware.products import MAX_DESCRIPTION_CHARS, MAX_LABEL_CHARS

    huge = ("小众设计师珐琅手表 waterproof steel " * 200_000)[:5_000_000]
    rows = [
        {"id": "long", "title": "珐琅手表", "description": huge},
        {"id": "bad-brand", "title": "手表", "brand": "b" * 1_000_000},
        *catalog(3),
    ]
    summary, backend = run_index(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "s", embedder)
    try:
        stored = backend.get(["long"])[0]
        # kept and searchable, with the description cut for analysis, the models and the store
        assert len(stored.description or "") <= MAX_DESCRIPTION_CHARS
        assert huge.startswith(stored.description or "-")
        assert [c.id for c in backend.bm25("珐琅手表", None, 5)][:1] == ["long"]
        assert max(len(t) for t in embedder.texts) <= MAX_DESCRIPTION_CHARS + len("珐琅手表\n")
        assert summary.indexed == 4 and summary.rejected == 1 and summary.truncated == 1
        assert summary.truncated_examples == [
            f"line 1: description cut from 5000000 to {len(stored.description)} characters"
        ]
        assert any(line.startswith("cut 1 over-long text fields") for line in summary.lines())
    finally:
        backend.close()
    # an exact-value field past its bound is a dead letter naming the field
    dead = [json.loads(line) for line in (tmp_path / "s" / "dead.jsonl").read_text().splitlines()]
    assert [(d["line"], d["reason"]) for d in dead] == [
        (2, f"brand: String should have at most {MAX_LABEL_CHARS} characters")
    ]


def test_id_rule_keeps_url_special_characters_and_rejects_control_characters(tmp_path: Path) -> None:
    reachable = ["a/b", "q?x=1", "frag#2", "100%", "two words", "斜杠/型号", "x" * 512]
    lines = [json.dumps({"id": pid, "title": "手表"}, ensure_ascii=False) for pid in reachable]
    bad = ["tab\there", "new\nline", "nul\u0000", "bell\u0007", "lone\ud800", "del\u007f", "   ", "y" * 513]
    lines += [json.dumps({"id": pid, "title": "手表"}) for pid in bad]
    source = tmp_path / "ids.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary, backend = run_index(source, tmp_path / "s", None)
    try:
        assert summary.indexed == len(reachable) and summary.rejected == len(bad)
        assert sorted(p.id for p in backend.get(reachable)) == sorted(reachable)
        assert backend.delete(["a/b", "q?x=1", "frag#2"]) == 3
    finally:
        backend.close()
    dead = [json.loads(line) for line in (tmp_path / "s" / "dead.jsonl").read_text().splitlines()]
    reasons = [d["reason"] for d in dead]
    assert reasons[:6] == [
        "id: id must not contain control characters (U+0009 at position 4)",
        "id: id must not contain control characters (U+000A at position 4)",
        "id: id must not contain control characters (U+0000 at position 4)",
        "id: id must not contain control characters (U+0007 at position 5)",
        "id: id must not contain control characters (U+D800 at position 5)",
        "id: id must not contain control characters (U+007F at position 4)",
    ]
    assert reasons[6:] == ["id: id must not be empty", "id: id must be at most 512 characters"]
