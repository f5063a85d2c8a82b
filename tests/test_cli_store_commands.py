"""Commands that read a store (search, stats): one-line errors, and the store's own embedder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from middleware.backends.embedded import EmbeddedBackend
from middleware.cli import main
from middleware.config import Settings
from middleware.products import Product
from tests.test_loaders_pipeline import catalog, run_cli, write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, model_cache_dir: Path, tmp_path: Path) -> Path:
    """No SHOPSEARCH_* from the caller's shell; a private data dir; no reranker."""
    for key in list(os.environ):
        if key.startswith("SHOPSEARCH_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SHOPSEARCH_RERANKER", "none")
    monkeypatch.setenv("SHOPSEARCH_MODEL_CACHE_DIR", str(model_cache_dir))
    data_dir = tmp_path / "store"
    monkeypatch.setenv("SHOPSEARCH_DATA_DIR", str(data_dir))
    return data_dir


def _one_line(err: str) -> str:
    # a model's first use prints its one export progress line; the error is the one line after it
    lines = [line for line in err.splitlines() if line.strip() and "preparing the embedder" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_search_errors_are_one_line(
    tmp_path: Path, cli_env: Path, tiny_embedder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a missing data directory is named, and not created
    missing = tmp_path / "no-store"
    code, _, err = run_cli(capsys, "--data-dir", str(missing), "search", "手表", "--embedder", "none")
    assert code == 1 and _one_line(err) == f"shopsearch: no store at {missing}: run `shopsearch index FILE` first " \
        "(or pass --data-dir)"  # fmt: skip
    assert not missing.exists()

    source = write_jsonl(tmp_path / "c.jsonl", catalog(5))
    assert run_cli(capsys, "index", str(source), "--embedder", "none", "-q")[0] == 0
    code, _, err = run_cli(capsys, "search", "手表", "--retrieval", "vector", "--embedder", "none")
    assert code == 2 and "--retrieval vector needs an embedder" in _one_line(err)

    # vectors of another dimension than the embedder's
    odd = tmp_path / "odd"
    with EmbeddedBackend(odd) as store:
        store.upsert([Product(id="1", title="手表")], np.full((1, 8), 8**-0.5, np.float32))
    code, _, err = run_cli(capsys, "--data-dir", str(odd), "search", "手表", "--embedder", str(tiny_embedder_dir))
    line = _one_line(err)
    assert code == 2 and "8-d" in line and "32-d" in line


def test_stats_into_a_closed_pipe_exits_quietly(tmp_path: Path, cli_env: Path) -> None:
    with EmbeddedBackend(cli_env) as store:
        store.upsert([Product(id=str(i), title=f"手表 {i}") for i in range(3)], None)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # `shopsearch stats | head -0`: the reader is gone before the first line is written
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from middleware.cli import main; sys.exit(main())", "stats"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "BrokenPipeError" not in err and "Traceback" not in err and "Exception ignored" not in err


def test_in_process_main_still_prints(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with EmbeddedBackend(cli_env) as store:
        store.upsert([Product(id="1", title="手表")], None)
    assert main(["stats"]) == 0
    assert "products     1" in capsys.readouterr().out


def test_store_reading_commands_use_the_embedder_the_store_is_bound_to(
    tmp_path: Path, cli_env: Path, tiny_embedder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", catalog(6))
    assert run_cli(capsys, "index", str(source), "--embedder", str(tiny_embedder_dir), "-q")[0] == 0
    # no --embedder and no SHOPSEARCH_EMBEDDER: the configured default (a hub model, not available
    # offline) is not loaded; the store's own embedder is
    code, out, err = run_cli(capsys, "search", "手表", "--retrieval", "vector", "--json")
    assert code == 0, err
    assert len(json.loads(out)["hits"]) == 6
    code, out, _ = run_cli(capsys, "stats", "--json")
    assert code == 0 and json.loads(out)["embedder"] == str(tiny_embedder_dir.resolve())
    # serve reads the same store: it loads the store's embedder, not the configured default
    from middleware.cli.serve import _with_store_embedder

    assert _with_store_embedder(Settings()).embedder == str(tiny_embedder_dir.resolve())
    assert _with_store_embedder(Settings(embedder="none")).embedder == "none"  # told otherwise
    # a second load keeps the binding too (nothing re-embedded)
    code, out, err = run_cli(capsys, "index", str(source), "--json")
    assert code == 0, err
    assert json.loads(out)["unchanged"] == 6
    # told otherwise: the user's choice wins, and a lexical-only choice is honoured
    code, out, _ = run_cli(capsys, "search", "手表", "--embedder", "none", "--json")
    assert code == 0 and json.loads(out)["hits"]
    code, _, err = run_cli(capsys, "search", "手表", "--embedder", str(tmp_path / "no-such-model"))
    assert code == 1 and "no-such-model" in err


def test_readme_worked_catalog_answers_the_readme_search_example(
    tmp_path: Path, cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("$ cat catalog.jsonl\n", 1)[1].split("\n$ ", 1)[0]
    (tmp_path / "catalog.jsonl").write_text(block + "\n", encoding="utf-8")
    command = next(line for line in readme.splitlines() if line.startswith("shopsearch --data-dir ./shop search"))
    filters = [part for part in command.split() if "=" in part and not part.startswith("--")]
    assert filters == ["category=手表", "price_max=3000"]
    assert run_cli(capsys, "index", str(tmp_path / "catalog.jsonl"), "--embedder", "none", "-q")[0] == 3
    args = ["search", "适合送女友的轻奢小众手表", "--json"] + [a for f in filters for a in ("--filter", f)]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert sorted(hit["id"] for hit in json.loads(out)["hits"]) == ["w1", "w2"]


def test_index_force_merge_and_the_force_merge_command(
    tmp_path: Path, cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", catalog(60))
    for start in (0, 20, 40):  # three loads: three lexical commits at least
        part = write_jsonl(tmp_path / f"part{start}.jsonl", catalog(20, start=start))
        assert run_cli(capsys, "index", str(part), "--embedder", "none", "-q")[0] == 0
    code, out, err = run_cli(capsys, "force-merge", "--json")
    assert code == 0, err
    merged = json.loads(out)
    assert merged["segments_before"] >= 2 and merged["segments_after"] == 1
    code, out, err = run_cli(capsys, "index", str(source), "--embedder", "none", "--force-merge", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["force_merge"]["segments_after"] == 1  # one JSON document: the summary holds it
    code, out, _ = run_cli(capsys, "search", "欧米茄 手表", "--json")
    assert code == 0
    assert json.loads(out)["hits"][0]["product"]["brand"] == "欧米茄"

    with EmbeddedBackend(cli_env) as serving:  # a process owning the writer (a running server) merges for the CLI
        for i in range(2):  # two more lexical commits
            serving.upsert([Product(id=f"late{i}", title=f"珐琅彩 茶具 {i}")], None)
            assert serving.bm25("珐琅彩", None, 5)
        code, out, err = run_cli(capsys, "force-merge")
        assert code == 0, err
        assert out.startswith("lexical segments 3 -> 1 (")
        assert serving.lexical._searcher().num_segments == 1
