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
