"""The loader CLI on the OpenSearch backend (osmem-server: in-memory, OpenSearch-compatible, no k-NN).

BM25-only (`--embedder none`), since osmem has no knn_vector: this checks that index / re-index /
update-signals / prune / delete / stats go through the same Backend protocol on a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from middleware.config import Settings
from tests.test_loaders_pipeline import catalog, run_cli, write_jsonl


@pytest.fixture
def os_env(osmem_clone, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    for key in list(os.environ):
        if key.startswith("SHOPSEARCH_"):
            monkeypatch.delenv(key)
    env = {
        "SHOPSEARCH_BACKEND": "opensearch",
        "SHOPSEARCH_OPENSEARCH__URL": osmem_clone.url,
        "SHOPSEARCH_OPENSEARCH__WRITE_REFRESH": "true",
        "SHOPSEARCH_OPENSEARCH__REPLICAS": "0",
        "SHOPSEARCH_EMBEDDER": "none",
        "SHOPSEARCH_RERANKER": "none",
        "SHOPSEARCH_DATA_DIR": str(tmp_path / "loader-state"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_index_update_prune_delete_stats_on_opensearch(
    os_env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = catalog(30)
    rows.append({"id": "bad", "title": "", "price": -1})
    source = write_jsonl(tmp_path / "c.jsonl", rows)
    code, out, err = run_cli(capsys, "index", str(source), "--json", "--batch-size", "8")
    assert code == 3, err
    first = json.loads(out)
    assert (first["indexed"], first["rejected"]) == (30, 1)

    code, out, _ = run_cli(capsys, "index", str(source), "--json", "--batch-size", "8")
    assert json.loads(out)["unchanged"] == 30  # content hashes read back from the cluster

    changes = write_jsonl(tmp_path / "s.jsonl", [{"id": "p1", "stock": 0, "price": 1}, {"id": "ghost", "sales": 1}])
    code, out, _ = run_cli(capsys, "update-signals", str(changes), "--json")
    assert code == 3 and (json.loads(out)["updated"], json.loads(out)["not_found"]) == (1, 1)

    snapshot = write_jsonl(tmp_path / "snap.jsonl", catalog(20))
    code, out, _ = run_cli(capsys, "index", str(snapshot), "--prune", "--json")
    assert code == 0 and json.loads(out)["deleted"] == 10

    code, out, _ = run_cli(capsys, "delete", "--ids", "p0,p19,nope", "--json")
    assert json.loads(out)["deleted"] == 2

    code, out, _ = run_cli(capsys, "stats", "--json")
    stats = json.loads(out)
    assert code == 0 and stats["backend"] == "opensearch" and stats["products"] == 18
    assert stats["embedder"] == "none" and stats["last_index_run"]["deleted"] == 10


def test_unreachable_cluster_is_one_line_exit_1(tmp_path: Path) -> None:
    # a subprocess: the real stderr, including what client libraries log, must be one line
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOPSEARCH_")}
    env.update(
        SHOPSEARCH_BACKEND="opensearch",
        SHOPSEARCH_OPENSEARCH__URL="http://127.0.0.1:9",  # the discard port: nothing listens
        SHOPSEARCH_OPENSEARCH__MAX_RETRIES="0",
        SHOPSEARCH_DATA_DIR=str(tmp_path / "state"),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    source = write_jsonl(tmp_path / "c.jsonl", catalog(3))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from middleware.cli import main; sys.exit(main())",
            "index",
            str(source),
            "--embedder",
            "none",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "unreachable" in proc.stderr, proc.stderr


def test_reindex_reads_csv_with_a_mapping_through_the_indexer(
    os_env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`opensearch reindex` writes by the loader's rules: any source format, --map, dead letters, cuts."""
    from middleware.backends.opensearch import OpenSearchBackend

    long_text = "珐琅 " * 8000
    csv_path = tmp_path / "export.csv"
    csv_path.write_text(
        "sku,name,description,price\n"
        "a1,珐琅手表,礼盒装,1299\n"
        f"a2,机械表,{long_text},799\n"
        "a3,,没有标题,10\n"
        "a1,珐琅手表 新款,礼盒装,1399\n",
        encoding="utf-8",
    )
    dead = tmp_path / "rejects.jsonl"
    code, out, err = run_cli(
        capsys, "opensearch", "reindex", str(csv_path), "--map", "id=sku,title=name", "--dead-letter", str(dead)
    )
    assert code == 3, err
    assert "built products-v1: 2 indexed" in out
    assert "cut 1 over-long text fields" in out and "duplicates 1" in out
    assert "1 rows rejected; first: line 4: title: Field required" in err
    assert [json.loads(line)["line"] for line in dead.read_text().splitlines()] == [4]
    backend = OpenSearchBackend.from_settings(os_env)
    try:
        a1, a2 = backend.get(["a1", "a2"])
        assert (a1.title, a1.price) == ("珐琅手表 新款", 1399.0)  # the later row of an id wins
        assert len(a2.description or "") <= 10_000
        assert backend.embedder_binding() is not None and backend.embedder_binding().model == "none"
    finally:
        backend.close()
